"""Speed benchmarks (`make bench`): data pipeline, synthetic data, training steps, inference.

Each section runs in its own subprocess so its peak memory (max RSS) is its own; results are merged into
one JSON file with the machine description. Targets live here, never in tests:
cache build >= 100 slices/s (512x512, 2 cores), >= 5,000 random 128x128 crops/s per worker.

Usage: ``python -m ldct_lightning.bench --out bench/results.json [--sections data,model] [--quick]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

TARGETS = {"cache_slices_per_s": 100.0, "crops_per_s_one_worker": 5000.0}


def _timeit(fn: Callable[[], Any], repeat: int, warmup: int = 1) -> float:
    """Median wall time of ``fn`` in seconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------------------- sections


def bench_data(quick: bool) -> dict[str, Any]:
    """DICOM -> cache slices/s (512x512) and random 128x128 crops/s from the cache, one worker."""
    from ldct_lightning.data.cache import SeriesCache
    from ldct_lightning.data.datasets import PatientVolumes, SimulatedDataset
    from ldct_lightning.data.dicom import scan_dicom_folder
    from ldct_lightning.data.dicom_write import CTSeriesSpec, write_ct_series
    from ldct_lightning.data.noise import GaussianNoise

    n = 32 if quick else 128
    rng = np.random.default_rng(0)
    volume = rng.normal(40, 200, size=(n, 512, 512)).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_ct_series(
            volume, CTSeriesSpec(patient_id="BENCH"), [1.25 * i for i in range(n)], root / "dicom"
        )
        series = scan_dicom_folder(root / "dicom")[0]
        t0 = time.perf_counter()
        cached = SeriesCache(root / "cache").get(series)
        build_s = time.perf_counter() - t0
        patient = PatientVolumes(patient_key="bench", ldct=cached, ndct=cached)
        dataset = SimulatedDataset(
            [patient], crop_size=128, noise=GaussianNoise(25.0), samples_per_epoch=10**6
        )
        n_crops = 2000 if quick else 10000
        t0 = time.perf_counter()
        for i in range(n_crops):
            dataset[i]
        crop_s = time.perf_counter() - t0
    return {
        "cache_slices": n,
        "cache_slices_per_s": n / build_s,
        "crops_per_s_one_worker": n_crops / crop_s,
        "crop_size": 128,
        "targets": TARGETS,
    }


def bench_synthetic(quick: bool) -> dict[str, Any]:
    """Synthetic-set generation time per slice for the tiny and demo presets."""
    from dataclasses import replace

    from ldct_lightning.data.synthetic import PRESETS, generate_dataset

    out: dict[str, Any] = {}
    for name in ("tiny",) if quick else ("tiny", "demo"):
        cfg = PRESETS[name]
        if name == "demo":
            cfg = replace(cfg, n_patients=2)  # per-slice time does not depend on the patient count
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            generate_dataset(Path(tmp) / "set", cfg, progress=False)
            seconds = time.perf_counter() - t0
        slices = cfg.n_patients * cfg.n_slices * 2  # an LDCT and an NDCT series per patient
        out[name] = {
            "image_size": cfg.image_size,
            "slices": slices,
            "seconds": seconds,
            "seconds_per_slice": seconds / slices,
        }
    return out


def _generator(base: int = 32):
    from ldct_lightning.models.generator import AttentionResUNet

    return AttentionResUNet(base_channels=base)


def bench_model(quick: bool) -> dict[str, Any]:
    """Generator size, GFLOPs per 512x512 slice, stage-1 step time, inference s/slice."""
    from ldct_lightning.losses import Stage1Loss
    from ldct_lightning.models import count_flops, count_parameters

    device = _device()
    gen = _generator().to(device)
    flops = count_flops(_generator(), (1, 1, 512, 512))
    out: dict[str, Any] = {
        "device": device,
        "generator_parameters": count_parameters(gen),
        "generator_gflops_per_512_slice": flops.gflops,
        "flops_convention": "2 FLOPs per multiply-accumulate, convolutions and matmuls only",
        "stage1_loss": "eq. 8 with the VGG-19 perceptual term (random weights, same cost), Adam",
    }
    loss = Stage1Loss(perceptual_weight=1.0, vgg_weights="random").to(device)
    opt = torch.optim.Adam(gen.parameters(), lr=1e-3, betas=(0.5, 0.999))
    for crop in [64] if quick else [64, 128]:
        batch = 16
        x = torch.rand(batch, 1, crop, crop, device=device)
        y = torch.rand(batch, 1, crop, crop, device=device)

        def step(x: torch.Tensor = x, y: torch.Tensor = y) -> None:
            opt.zero_grad(set_to_none=True)
            total, _ = loss(gen(x), y)
            total.backward()
            opt.step()
            _sync()

        seconds = _timeit(step, repeat=2 if quick else 3)
        out[f"stage1_step_s_batch{batch}_crop{crop}"] = seconds
        out[f"stage1_patches_per_s_crop{crop}"] = batch / seconds
    gen.eval()
    x = torch.rand(1, 1, 512, 512, device=device)
    with torch.inference_mode():
        seconds = _timeit(lambda: (gen(x), _sync()), repeat=1 if quick else 3)
    out["inference_s_per_512_slice"] = seconds
    return out


def bench_stage2(quick: bool) -> dict[str, Any]:
    """One stage-2 step: 3 critic updates (with gradient penalty) + 1 generator update."""
    from ldct_lightning.losses import gradient_penalty
    from ldct_lightning.models.critic import WGANCritic

    device = _device()
    crop, batch = 64, 8
    gen, critic = _generator().to(device), WGANCritic(patch_size=crop).to(device)
    opt_g = torch.optim.Adam(gen.parameters(), lr=1e-5, betas=(0.5, 0.999))
    opt_c = torch.optim.Adam(critic.parameters(), lr=1e-5, betas=(0.5, 0.999))
    ld = torch.rand(batch, 1, crop, crop, device=device)
    nd = torch.rand(batch, 1, crop, crop, device=device)

    def step() -> None:
        fake = gen(ld)
        for _ in range(3):
            opt_c.zero_grad(set_to_none=True)
            loss_c = critic(fake.detach()).mean() - critic(nd).mean()
            (loss_c + 10.0 * gradient_penalty(critic, nd, fake.detach())).backward()
            opt_c.step()
        opt_g.zero_grad(set_to_none=True)
        (-critic(fake).mean()).backward()
        opt_g.step()
        _sync()

    seconds = _timeit(step, repeat=2 if quick else 3)
    return {
        "device": device,
        "stage2_step_s": seconds,
        "stage2_patches_per_s": batch / seconds,
        "batch": batch,
        "crop": crop,
        "n_critic": 3,
    }


def bench_denoise(quick: bool) -> dict[str, Any]:
    """Denoiser throughput on 512x512 slices (the Python API ldct-denoise uses)."""
    from ldct_lightning.inference import Denoiser

    device = _device()
    n = 2 if quick else 8
    denoiser = Denoiser(_generator(), device=device, batch_size=4)
    hu = np.random.default_rng(0).normal(40, 200, size=(n, 512, 512)).astype(np.float32)
    denoiser.denoise(hu[:1])
    t0 = time.perf_counter()
    denoiser.denoise(hu)
    seconds = time.perf_counter() - t0
    out = {"device": device, "slices": n, "slices_per_s": n / seconds}
    if device == "cuda":
        out["peak_gpu_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


SECTIONS: dict[str, Callable[[bool], dict[str, Any]]] = {
    "data": bench_data,
    "synthetic": bench_synthetic,
    "model": bench_model,
    "stage2": bench_stage2,
    "denoise": bench_denoise,
}


def _run_section(name: str, quick: bool) -> dict[str, Any]:
    """Run one section in a subprocess; returns its results plus wall time and peak RSS."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        result_file = f.name
    cmd = [sys.executable, "-m", "ldct_lightning.bench", "--section", name, "--section-out", result_file]
    if quick:
        cmd.append("--quick")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    try:
        if proc.returncode != 0:
            return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
        result = json.loads(Path(result_file).read_text())
    finally:
        os.unlink(result_file)
    result["section_wall_s"] = wall
    return result


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ldct_lightning.bench", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results.json"), help="JSON file to write")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list of {list(SECTIONS)}")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions and smaller sizes")
    parser.add_argument("--section", help=argparse.SUPPRESS)
    parser.add_argument("--section-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.section:  # child process: run one section, write its JSON, report peak RSS
        result = SECTIONS[args.section](args.quick)
        result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        Path(args.section_out).write_text(json.dumps(result))
        return 0

    names = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in names if s not in SECTIONS]
    if unknown:
        parser.error(f"unknown section(s) {unknown}; choose from {list(SECTIONS)}")
    results: dict[str, Any] = {"machine": machine(), "quick": args.quick}
    for name in names:
        print(f"[bench] {name} ...", flush=True)
        results[name] = _run_section(name, args.quick)
        print(json.dumps(results[name], indent=2), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2))
    os.replace(tmp, args.out)
    print(f"[bench] wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
