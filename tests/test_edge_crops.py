"""Edge crops (``data.edge_crop_fraction``): some training crops may show the air / skin edge."""

from __future__ import annotations

import numpy as np

from ldct_lightning.data.datasets import EDGE_MIN_FOREGROUND, PatientVolumes, SimulatedDataset
from ldct_lightning.data.noise import GaussianNoise
from ldct_lightning.data.normalize import unit_to_hu


def body_fractions(edge_fraction: float, n: int = 200) -> np.ndarray:
    volume = np.full((2, 64, 64), -1000.0, dtype=np.float32)
    volume[:, :, 16:] = 40.0  # body on the right three quarters, air on the left
    dataset = SimulatedDataset(
        [PatientVolumes("p", ndct=volume)],
        GaussianNoise(0.0),
        crop_size=32,
        samples_per_epoch=n,
        augment=False,
        min_foreground=0.9,
        max_tries=50,
    )
    dataset.edge_fraction = edge_fraction
    targets = [unit_to_hu(dataset[i]["target"]).numpy() for i in range(n)]
    return np.array([(t > -500).mean() for t in targets])


def test_edge_crops_lower_the_body_fraction_of_some_crops_only() -> None:
    plain = body_fractions(0.0)
    assert plain.min() >= 0.9  # every crop held to min_foreground
    mixed = body_fractions(0.5)
    edge = mixed < 0.9
    # about half the crops may be edge crops (uniform positions often have >= 90 % body anyway)
    assert 0.05 < edge.mean() < 0.5, edge.mean()
    assert mixed.min() >= EDGE_MIN_FOREGROUND
