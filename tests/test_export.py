"""Tests of ldct-export: TorchScript and ONNX files reproduce the PyTorch generator at other sizes."""

from __future__ import annotations

import builtins
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ldct_lightning.cli import export as cli
from ldct_lightning.models.generator import AttentionResUNet

TINY = {"base_channels": 8}


@pytest.fixture
def checkpoint(lightning_run) -> tuple[Path, AttentionResUNet]:
    """A real stage-2 Lightning checkpoint (a tiny fit: generator and critic) in a run folder whose
    run_info.yaml names the architecture, and the trained generator it holds."""
    trained = lightning_run("run", stage="second", **TINY)
    return trained.checkpoint, trained.generator


def _inputs() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    # the tracing size, another multiple of 16, and sizes that need padding
    return [torch.rand(shape, generator=g) for shape in [(1, 1, 32, 32), (3, 1, 48, 64), (2, 1, 37, 45)]]


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
def test_torchscript_round_trip(checkpoint, tmp_path, capsys):
    path, generator = checkpoint
    out = tmp_path / "export/model.pt"
    assert cli.main([str(path), str(out), "--format", "torchscript", "--size", "32"]) == 0
    assert "max |exported - PyTorch|" in capsys.readouterr().out
    extra = {cli.META_FILE: ""}
    loaded = torch.jit.load(str(out), _extra_files=extra)
    meta = json.loads(extra[cli.META_FILE])
    assert float(meta["hu_min"]) == -1024 and float(meta["hu_max"]) == 3071
    with torch.no_grad():
        for x in _inputs():
            torch.testing.assert_close(loaded(x), generator(x), atol=1e-5, rtol=1e-5)


def test_onnx_runtime_matches_pytorch(checkpoint, tmp_path, capsys):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    path, generator = checkpoint
    out = tmp_path / "model.onnx"
    assert cli.main([str(path), str(out), "--format", "onnx", "--size", "32"]) == 0, capsys.readouterr().err
    proto = onnx.load(str(out))
    assert max(op.version for op in proto.opset_import if op.domain in ("", "ai.onnx")) >= 17
    dims = [d.dim_param for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", "", "height", "width"]
    assert {p.key: p.value for p in proto.metadata_props}["hu_max"] == "3071.0"
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        for x in _inputs():
            got = session.run(None, {"input": x.numpy()})[0]
            np.testing.assert_allclose(got, generator(x).numpy(), atol=1e-4)


def test_missing_onnx_gives_a_clear_message(checkpoint, tmp_path, capsys, monkeypatch):
    real_import = builtins.__import__

    def no_onnx(name, *args, **kwargs):
        if name.split(".")[0] in ("onnx", "onnxruntime"):
            raise ImportError(f"No module named {name!r}", name=name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_onnx)
    rc = cli.main([str(checkpoint[0]), str(tmp_path / "m.onnx"), "--format", "onnx"])
    err = capsys.readouterr().err
    assert rc == 2 and "pip install 'ldct-lightning[export]'" in err and "Traceback" not in err
    assert not (tmp_path / "m.onnx").exists()


def test_bad_checkpoint_gives_exit_code_2(tmp_path, capsys):
    bad = tmp_path / "bad.ckpt"
    torch.save({"state_dict": {"generator.x": torch.zeros(1)}}, bad)
    rc = cli.main([str(bad), str(tmp_path / "m.pt"), "--format", "torchscript", "--size", "32"])
    err = capsys.readouterr().err
    assert rc == 2 and str(bad) in err and len(err.strip().splitlines()) == 1
