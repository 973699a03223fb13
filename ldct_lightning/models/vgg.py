"""A frozen VGG-19 feature extractor for the perceptual loss, laid out exactly like torchvision's ``vgg19().features``.

The layers are defined here (torchvision is not a dependency) with the same indices, so a torchvision state dict
(``features.N.weight``/``features.N.bias``; ``classifier.*`` is ignored) loads with strict key matching. Weights
come from the given file; when it does not exist, from the torch hub cache
(``torch.hub.get_dir()/checkpoints/vgg19-dcbb9e9d.pth``, i.e. ``$TORCH_HOME/hub`` or ``~/.cache/torch/hub``),
where torchvision keeps them; otherwise they are downloaded there once, with the file's hash checked, as
torchvision does.
"""

from __future__ import annotations

import logging
import pickle
from pathlib import Path

import torch
from torch import nn

logger = logging.getLogger(__name__)

# torchvision's configuration "E" (VGG-19): conv widths, "M" = 2x2 max pooling
VGG19_CFG: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M",
)  # fmt: skip
VGG19_WEIGHTS_FILE = "vgg19-dcbb9e9d.pth"
VGG19_URL = f"https://download.pytorch.org/models/{VGG19_WEIGHTS_FILE}"
_HOW_TO_GET = (
    f"Put torchvision's ImageNet VGG-19 weights ({VGG19_WEIGHTS_FILE}) there or in the torch hub cache; offline, "
    "copy the file from ~/.cache/torch/hub/checkpoints/ of a machine where torchvision fetched it, or from "
    f"{VGG19_URL}; or set the weights to 'random' (tests only)"
)


def vgg19_layer_names() -> list[str]:
    """Names of the layers of ``vgg19().features`` by index: ``conv1_1, relu1_1, ..., pool5``."""
    names: list[str] = []
    block, conv = 1, 1
    for item in VGG19_CFG:
        if item == "M":
            names.append(f"pool{block}")
            block, conv = block + 1, 1
        else:
            names += [f"conv{block}_{conv}", f"relu{block}_{conv}"]
            conv += 1
    return names


def vgg19_layer_index(layer: str | int) -> int:
    """Index of the last layer kept when truncating at ``layer``.

    Args:
        layer: ``convB_L`` or ``reluB_L`` (both: the output of that convolution *after* its ReLU, the
            convention of Yang et al. 2018's conv5_4 features), ``poolB``, or an index into ``features``
            (e.g. 34 for conv5_4 before its ReLU).

    Returns:
        The index (the extractor keeps ``features[: index + 1]``).
    """
    names = vgg19_layer_names()
    if isinstance(layer, int):
        if not 0 <= layer < len(names):
            raise ValueError(f"VGG-19 layer index {layer}: must be in [0, {len(names) - 1}]")
        return layer
    key = layer.replace("conv", "relu") if layer.startswith("conv") else layer
    if key not in names:
        raise ValueError(f"VGG-19 layer {layer!r}: unknown. Use e.g. conv5_4, relu3_4, pool4 or an index")
    return names.index(key)


def build_vgg19_features() -> nn.Sequential:
    """The 37 layers of torchvision's ``vgg19().features``, with torchvision's random initialisation."""
    layers: list[nn.Module] = []
    previous = 3
    for item in VGG19_CFG:
        if item == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            conv = nn.Conv2d(previous, int(item), kernel_size=3, padding=1)
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(conv.bias)
            layers += [conv, nn.ReLU(inplace=True)]
            previous = int(item)
    return nn.Sequential(*layers)


def hub_cache_file() -> Path:
    """Where torchvision keeps the VGG-19 weights: ``torch.hub.get_dir()/checkpoints/vgg19-dcbb9e9d.pth``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / VGG19_WEIGHTS_FILE


def find_vgg19_weights(weights: str | Path) -> Path:
    """The VGG-19 weights file: ``weights`` when it exists, else the torch hub cache, else downloaded there once.

    Args:
        weights: the configured path (``paths.vgg19_weights``).

    Returns:
        A file that exists.

    Raises:
        FileNotFoundError: none found and the download failed (offline); the message says what to do.
    """
    path, cached = Path(weights), hub_cache_file()
    if path.is_file():
        return path
    if not cached.is_file():
        logger.info("VGG-19 weights: %s not found; downloading %s to %s", path, VGG19_URL, cached)
        try:
            torch.hub.load_state_dict_from_url(VGG19_URL, map_location="cpu", check_hash=True, progress=False)
        except Exception as e:  # no network, proxy, hash mismatch, disk full: all end in the same advice
            reason = " ".join(f"{type(e).__name__}: {e}".split())[:200]
            raise FileNotFoundError(
                f"{path}: VGG-19 weights file not found, nor in the torch hub cache ({cached}), and the "
                f"download failed ({reason}). {_HOW_TO_GET}"
            ) from e
        if not cached.is_file():
            raise FileNotFoundError(f"{path}: VGG-19 weights file not found. {_HOW_TO_GET}")
    logger.info("VGG-19 weights: %s not found; using the torch hub cache %s", path, cached)
    return cached


def load_vgg19_features_state(path: str | Path) -> dict[str, torch.Tensor]:
    """Read the ``features`` part of a torchvision-format VGG-19 state dict.

    Args:
        path: a ``.pth`` file holding ``{"features.N.weight": ..., "classifier.*": ...}`` (or only the
            features, with keys ``N.weight``).

    Returns:
        The features' tensors, keyed ``N.weight`` / ``N.bias``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: VGG-19 weights file not found. {_HOW_TO_GET}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
        raise ValueError(
            f"{path}: cannot be read as a torch state dict ({type(e).__name__}). {_HOW_TO_GET}"
        ) from e
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{path}: holds a {type(state).__name__}, not a state dict. {_HOW_TO_GET}")
    features = {k[len("features.") :]: v for k, v in state.items() if k.startswith("features.")}
    if not features and all(k.split(".", 1)[0].isdigit() for k in state):
        features = dict(state)
    if not features:
        raise ValueError(f"{path}: has no 'features.*' keys, not a VGG-19 state dict. {_HOW_TO_GET}")
    return features


class VGG19Features(nn.Module):
    """Frozen VGG-19 features up to ``layer`` (default conv5_4 after its ReLU).

    Parameters never require gradients and the module stays in eval mode even when a parent calls
    ``.train()``; gradients still flow to the input. The input is a 3-channel, ImageNet-normalised image
    (see :func:`ldct_lightning.losses.gray_to_vgg_input`).

    Args:
        weights: path to a torchvision-format VGG-19 ``.pth`` (``vgg19-dcbb9e9d.pth``; when missing, the torch
            hub cache's, downloaded once if needed, see :func:`find_vgg19_weights`), or ``"random"`` (random
            features, logged as a warning; for tests only).
        layer: where to truncate (see :func:`vgg19_layer_index`).
    """

    def __init__(self, weights: str | Path, layer: str | int = "conv5_4") -> None:
        super().__init__()
        last = vgg19_layer_index(layer)
        features = build_vgg19_features()
        if str(weights) == "random":
            logger.warning(
                "VGG19Features: weights='random': the perceptual loss uses random, untrained features. "
                "Give the path of %s for meaningful perceptual features",
                VGG19_WEIGHTS_FILE,
            )
        else:
            weights = find_vgg19_weights(weights)
            state = load_vgg19_features_state(weights)
            try:
                features.load_state_dict(state, strict=True)
            except RuntimeError as e:
                problem = " ".join(str(e).split())[:300]
                raise ValueError(
                    f"{weights}: not a torchvision VGG-19 state dict ({problem}). {_HOW_TO_GET}"
                ) from e
        self.layer = layer
        self.features = features[: last + 1]
        for p in self.parameters():
            p.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> VGG19Features:
        """Stay in eval mode whatever ``mode`` says (a frozen feature extractor)."""
        return super().train(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Features of a batch.

        Args:
            x: ImageNet-normalised RGB images (B, 3, H, W).

        Returns:
            The activations of the chosen layer.
        """
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"VGG19Features: expected (B, 3, H, W) input, got {tuple(x.shape)}")
        return self.features(x)
