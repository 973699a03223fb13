"""VGG-19 weights: the configured file, else torchvision's torch hub cache, else one checked download; offline, a
clear message. No network: conftest's ``_offline_torch_hub`` points TORCH_HOME to an empty folder and makes
downloads fail."""

from __future__ import annotations

import urllib.error
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from ldct_lightning.data.split_defaults import CONF_DIR
from ldct_lightning.models.vgg import VGG19_URL, VGG19Features, build_vgg19_features, hub_cache_file


def _torchvision_state(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return {f"features.{k}": v for k, v in build_vgg19_features().state_dict().items()}


def _no_download(*args, **kwargs):
    raise AssertionError("downloaded although the weights were in the hub cache")


def test_hub_cache_follows_torch_home(_offline_torch_hub: Path) -> None:
    assert hub_cache_file() == _offline_torch_hub / "hub" / "checkpoints" / "vgg19-dcbb9e9d.pth"


def test_missing_file_falls_back_to_the_hub_cache(tmp_path: Path, monkeypatch) -> None:
    state = _torchvision_state(seed=5)
    hub_cache_file().parent.mkdir(parents=True)
    torch.save(state, hub_cache_file())
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", _no_download)
    vgg = VGG19Features(tmp_path / "weights" / "vgg19-dcbb9e9d.pth", layer="relu1_2")
    assert torch.equal(vgg.features[2].weight, state["features.2.weight"])


def test_download_once_with_the_hash_checked(tmp_path: Path, monkeypatch) -> None:
    state = _torchvision_state(seed=6)
    calls = []

    def download(url, model_dir=None, map_location=None, progress=True, check_hash=False, **kwargs):
        calls.append((url, check_hash))
        hub_cache_file().parent.mkdir(parents=True, exist_ok=True)
        torch.save(state, hub_cache_file())  # what torch.hub does after checking the hash prefix
        return state

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", download)
    for _ in range(2):
        vgg = VGG19Features(tmp_path / "missing.pth", layer="relu1_1")
        assert torch.equal(vgg.features[0].weight, state["features.0.weight"])
    assert calls == [(VGG19_URL, True)]


def test_offline_gives_the_clear_message(tmp_path: Path) -> None:
    missing = tmp_path / "weights" / "vgg19-dcbb9e9d.pth"
    with pytest.raises(FileNotFoundError) as err:
        VGG19Features(missing)
    message = str(err.value)
    assert message.startswith(f"{missing}: VGG-19 weights file not found")
    assert str(hub_cache_file()) in message and "URLError" in message and "offline" in message
    assert isinstance(err.value.__cause__, urllib.error.URLError)


def test_experiment_paper_finds_the_weights_in_the_hub_cache(tmp_path: Path, monkeypatch) -> None:
    state = _torchvision_state(seed=7)
    hub_cache_file().parent.mkdir(parents=True)
    torch.save(state, hub_cache_file())
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", _no_download)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["experiment=paper", f"paths.root_dir={tmp_path}"])
    assert not Path(cfg.model.vgg.weights).exists()  # <root>/weights/vgg19-dcbb9e9d.pth: nobody has it
    loss = instantiate(cfg.stages.first.module.loss)
    assert torch.equal(loss.perceptual.vgg.features[0].weight, state["features.0.weight"])
