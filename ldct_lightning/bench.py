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
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ldct_lightning.allocator import keep_freed_memory
from ldct_lightning.atomic import write_text_atomic

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


# the inference paths of ldct-denoise measured side by side: name -> (CLI flags, Denoiser kwargs)
DENOISE_VARIANTS: dict[str, tuple[list[str], dict[str, Any]]] = {
    "torch_plain": (["--plain"], {}),
    "torch_folded_channels_last": ([], {"fold_bn": True, "channels_last": True}),
    "onnxruntime": (["--backend", "onnxruntime"], {"backend": "onnxruntime"}),
    "torch_bf16": (["--precision", "bf16"], {"fold_bn": True, "channels_last": True, "half": "bf16"}),
}
DENOISE_TARGETS = {"e2e_slices_per_s_512": 2.0, "e2e_slices_per_s_512_goal": 3.0}
DENOISE_BATCH = 2  # ldct-denoise's default


def _ct_slices(n: int, size: int = 512, seed: int = 0) -> np.ndarray:
    """``n`` CT-like slices in HU: phantom anatomy (air, fat, soft tissue, bone) plus LDCT-like noise."""
    from ldct_lightning.data.phantom import random_anatomy, render_slices

    rng = np.random.default_rng(seed)
    n_distinct = min(n, 4)  # rendering is slow; further slices repeat them with fresh noise
    hu, _ = render_slices(
        random_anatomy(rng), list(np.linspace(-20, 20, n_distinct)), size, 0.7, supersample=1
    )
    clean = hu.numpy()[np.arange(n) % n_distinct]
    return (clean + rng.normal(0, 40, clean.shape)).astype(np.float32)


def _bench_checkpoint(path: Path, seed: int = 0) -> Path:
    """A checkpoint of the full-size generator with random weights (same cost as a trained one)."""
    torch.manual_seed(seed)
    state = {f"generator.{k}": v for k, v in _generator().state_dict().items()}
    torch.save({"state_dict": state}, path)
    return path


def _write_bench_series(volume: np.ndarray, out: Path) -> Path:
    from ldct_lightning.data.dicom_write import CTSeriesSpec, write_ct_series

    write_ct_series(volume, CTSeriesSpec(patient_id="BENCH"), [1.25 * i for i in range(len(volume))], out)
    return out


def _denoise_subprocess(series_dir: Path, checkpoint: Path, out: Path, flags: list[str]) -> dict[str, Any]:
    """Run ``ldct-denoise`` in a fresh process; its wall time (start to exit) and peak RSS (ru_maxrss)."""
    cmd = [
        sys.executable,
        "-m",
        "ldct_lightning.bench",
        "--denoise-child",
        str(out) + ".json",
        "--",
        str(series_dir),
        str(out),
        "--checkpoint",
        str(checkpoint),
        "--batch-size",
        str(DENOISE_BATCH),
        *flags,
    ]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    child = json.loads(Path(str(out) + ".json").read_text())
    return {"process_wall_s": wall, **child}


def matmul_gflops(dtype: torch.dtype, n: int = 4096, repeat: int = 3) -> float:
    """Measured GFLOP/s of an ``n`` x ``n`` matmul in ``dtype`` on the bench device: the roofline the network
    is compared with (oneDNN/MKL run matmuls near the cores' peak)."""
    device = _device()
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)

    def mm() -> None:
        a @ b
        _sync()

    return 2 * n**3 / _timeit(mm, repeat=repeat) / 1e9


def roofline(s_per_slice: dict[str, float], gflops_per_slice: float) -> dict[str, Any]:
    """Each path's achieved GFLOP/s against the matmul speed of its precision, and the network-only ceiling.

    Args:
        s_per_slice: path name -> network-only seconds per slice (``torch_bf16`` is compared with bf16 matmuls).
        gflops_per_slice: the generator's GFLOPs per slice as it runs (eval margin included).

    Returns:
        The matmul GFLOP/s per precision, and per path GFLOP/s, share of that matmul speed and slices/s.
    """
    peak = {"float32": matmul_gflops(torch.float32), "bfloat16": matmul_gflops(torch.bfloat16)}
    paths = {}
    for name, seconds in s_per_slice.items():
        ref = peak["bfloat16" if name == "torch_bf16" else "float32"]
        achieved = gflops_per_slice / seconds
        paths[name] = {"gflop_per_s": achieved, "share_of_matmul": achieved / ref}
    return {
        "matmul_gflop_per_s": peak,
        "generator_gflops_per_slice": gflops_per_slice,
        "network_ceiling_slices_per_s_at_matmul_speed": {k: v / gflops_per_slice for k, v in peak.items()},
        "paths": paths,
    }


def bench_denoise(quick: bool) -> dict[str, Any]:
    """Network-only s/slice of each inference path on 512x512, the roofline, and the quality cost of bf16."""
    from ldct_lightning.inference import Denoiser
    from ldct_lightning.models import count_flops

    device = _device()
    n = DENOISE_BATCH if quick else 2 * DENOISE_BATCH
    hu = _ct_slices(n)
    generator = _generator()
    out: dict[str, Any] = {
        "device": device,
        "batch_size": DENOISE_BATCH,
        "slices": n,
        "network_s_per_slice": {},
    }
    outputs = {}
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["LDCT_CACHE_DIR"] = tmp  # the ONNX export is made here, before timing
        for name, (_, kwargs) in DENOISE_VARIANTS.items():
            if device != "cpu" and kwargs.get("backend") == "onnxruntime":
                continue
            denoiser = Denoiser(generator, device=device, batch_size=DENOISE_BATCH, **kwargs)
            x = torch.rand(DENOISE_BATCH, 1, 512, 512, device=device)
            amp = torch.autocast(device, dtype=torch.bfloat16) if kwargs.get("half") else _nullcontext()

            def forward(denoiser: Denoiser = denoiser, x: torch.Tensor = x, amp: Any = amp) -> None:
                with torch.inference_mode(), amp:
                    denoiser.network(x)
                _sync()

            seconds = _timeit(forward, repeat=1 if quick else 3)
            out["network_s_per_slice"][name] = seconds / DENOISE_BATCH
            outputs[name] = denoiser.denoise(hu)
    out["roofline"] = roofline(out["network_s_per_slice"], count_flops(generator).gflops)
    ref = outputs["torch_plain"]
    out["max_abs_diff_hu_vs_torch_plain"] = {k: float(np.abs(v - ref).max()) for k, v in outputs.items()}
    bf16 = outputs["torch_bf16"]
    rmse = float(np.sqrt(np.mean((bf16.astype(np.float64) - ref) ** 2)))
    out["bf16_quality"] = {
        "rmse_hu_vs_fp32": rmse,
        "mean_abs_hu_vs_fp32": float(np.abs(bf16 - ref).mean()),
        "psnr_db_vs_fp32_range_4095": float(20 * np.log10(4095 / rmse)) if rmse > 0 else float("inf"),
        "note": "random-weight generator on phantom slices; with a trained checkpoint: section bf16_quality",
    }
    return out


def bench_bf16_quality(quick: bool) -> dict[str, Any]:
    """PSNR against the NDCT of fp32 and bf16 inference with a trained checkpoint on its test patients.

    Needs ``--quality-checkpoint CKPT --quality-data ROOT`` (a run's checkpoint and the data set it was trained
    on, with its ``split.yaml``); the per-slice PSNR (eq. 11, normalised) of the bf16 fast path is compared
    with the plain float32 path on the same slices.
    """
    ckpt, root = os.environ.get("LDCT_BENCH_CHECKPOINT"), os.environ.get("LDCT_BENCH_DATA")
    if not ckpt or not root:
        return {"unmeasured": "no trained checkpoint given (--quality-checkpoint CKPT --quality-data ROOT)"}
    import yaml

    from ldct_lightning.data.datamodule import LDCTDataModule
    from ldct_lightning.data.normalize import hu_to_unit, unit_to_hu
    from ldct_lightning.eval.metrics import paper_psnr
    from ldct_lightning.inference import Denoiser

    split = yaml.safe_load((Path(root) / "split.yaml").read_text())["params"]
    with tempfile.TemporaryDirectory() as tmp:
        dm = LDCTDataModule(
            root,
            cache_dir=tmp,
            n_val=split["n_val"],
            n_test=split["n_test"],
            split_seed=split["seed"],
            num_workers=0,
            write_split=False,
        )
        dm.setup("test")
        fp32 = Denoiser.from_checkpoint(ckpt, batch_size=DENOISE_BATCH)
        bf16 = Denoiser.from_checkpoint(
            ckpt, batch_size=DENOISE_BATCH, half="bf16", fold_bn=True, channels_last=True
        )
        psnr32, psnr16, diffs, n = [], [], [], 0
        for batch in dm.test_dataloader():
            ldct = unit_to_hu(batch["input"].float()).squeeze(1).numpy()
            # synthetic sets carry the noise-free truth as "reference"; else the (registered) NDCT
            reference = "reference" if "reference" in batch else "ndct"
            ndct = batch[reference].float().squeeze(1).numpy()
            a, b = fp32.denoise(ldct), bf16.denoise(ldct)
            diffs.append(float(np.abs(a - b).max()))
            for pa, pb, ref in zip(hu_to_unit(a), hu_to_unit(b), ndct, strict=True):
                psnr32.append(paper_psnr(pa, ref))
                psnr16.append(paper_psnr(pb, ref))
            n += len(ldct)
            if quick and n >= 16:
                break
    delta = np.asarray(psnr32) - np.asarray(psnr16)
    return {
        "checkpoint": Path(ckpt).name,
        "data": Path(root).name,
        "test_slices": n,
        "reference": reference,
        "psnr_fp32_db_mean": float(np.mean(psnr32)),
        "psnr_bf16_db_mean": float(np.mean(psnr16)),
        "psnr_loss_db_mean": float(delta.mean()),
        "psnr_loss_db_sd": float(delta.std(ddof=1)) if len(delta) > 1 else 0.0,
        "psnr_loss_db_max": float(delta.max()),
        "max_abs_diff_hu": max(diffs),
        "target_psnr_loss_db": 0.05,
    }


def _nullcontext() -> Any:
    from contextlib import nullcontext

    return nullcontext()


def bench_denoise_e2e(quick: bool) -> dict[str, Any]:
    """``ldct-denoise`` end to end (own process: start, checkpoint, scan, read, network, write) per path."""
    n = 8 if quick else 32
    out: dict[str, Any] = {"slices": n, "size": 512, "batch_size": DENOISE_BATCH, "targets": DENOISE_TARGETS}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        os.environ["LDCT_CACHE_DIR"] = str(root / "cache")
        series = _write_bench_series(_ct_slices(n), root / "in")
        ckpt = _bench_checkpoint(root / "bench.ckpt")
        from ldct_lightning.inference import Denoiser

        Denoiser.from_checkpoint(ckpt, backend="onnxruntime")  # ONNX cache filled once, as after a first run
        for name, (flags, _) in DENOISE_VARIANTS.items():
            if _device() != "cpu" and "onnxruntime" in flags:
                continue
            run = _denoise_subprocess(series, ckpt, root / f"out-{name}", [*flags, "--device", _device()])
            if "error" not in run:
                run["slices_per_s"] = n / run["process_wall_s"]
                run["slices_per_s_in_run"] = n / run["run_s"]
            out[name] = run
    return out


def bench_denoise_memory(quick: bool) -> dict[str, Any]:
    """Peak RSS of ``ldct-denoise`` (default path) for a long and a short 512x512 series: streaming keeps it flat."""
    lengths = (10, 60) if quick else (30, 300)
    out: dict[str, Any] = {"size": 512, "batch_size": DENOISE_BATCH, "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        ckpt = _bench_checkpoint(root / "bench.ckpt")
        slices = _ct_slices(4)
        for n in lengths:
            series = _write_bench_series(slices[np.arange(n) % len(slices)], root / f"in-{n}")
            run = _denoise_subprocess(series, ckpt, root / f"out-{n}", ["--device", _device()])
            out["runs"][str(n)] = run
            shutil.rmtree(series)
            shutil.rmtree(root / f"out-{n}", ignore_errors=True)
    long_run, short_run = out["runs"][str(lengths[1])], out["runs"][str(lengths[0])]
    if "peak_rss_mb" in long_run and "peak_rss_mb" in short_run:
        out["series_slices"] = lengths[1]
        out["denoise_peak_rss_mb"] = long_run["peak_rss_mb"]  # (peak_rss_mb is this section's own)
        out["denoise_peak_rss_growth_mb"] = long_run["peak_rss_mb"] - short_run["peak_rss_mb"]
        out["whole_series_float32_mb"] = lengths[1] * 512 * 512 * 4 / 2**20
    return out


def bench_gpu(quick: bool) -> dict[str, Any]:
    """Stage-1 and stage-2 training throughput on one GPU at the paper's 128x128 crops (bf16 autocast)."""
    if not torch.cuda.is_available():
        return {"unmeasured": "no CUDA device"}
    from ldct_lightning.losses import Stage1Loss, gradient_penalty
    from ldct_lightning.models.critic import WGANCritic

    torch.backends.cudnn.benchmark = True
    crop = 128
    gen = _generator().cuda().to(memory_format=torch.channels_last)
    loss = Stage1Loss(perceptual_weight=1.0, vgg_weights="random").cuda()
    opt = torch.optim.Adam(gen.parameters(), lr=1e-3, betas=(0.5, 0.999))
    out: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0),
        "precision": "bf16 autocast",
        "crop": crop,
    }
    torch.cuda.reset_peak_memory_stats()
    x = torch.rand(16, 1, crop, crop, device="cuda").contiguous(memory_format=torch.channels_last)
    y = torch.rand_like(x)

    def step1() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            total, _ = loss(gen(x), y)
        total.backward()
        opt.step()

    n_steps = 5 if quick else 30
    seconds = _timeit(lambda: ([step1() for _ in range(n_steps)], _sync()), repeat=3, warmup=1) / n_steps
    out["stage1_patches_per_s_batch16"] = 16 / seconds
    out["stage1_peak_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
    critic = WGANCritic(patch_size=crop).cuda().to(memory_format=torch.channels_last)
    opt_c = torch.optim.Adam(critic.parameters(), lr=1e-5, betas=(0.5, 0.999))
    ld = torch.rand(20, 1, crop, crop, device="cuda").contiguous(memory_format=torch.channels_last)
    nd = torch.rand_like(ld)
    torch.cuda.reset_peak_memory_stats()

    def step2() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            fake = gen(ld)
        for _ in range(3):
            opt_c.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss_c = critic(fake.detach()).float().mean() - critic(nd).float().mean()
            (loss_c + 10.0 * gradient_penalty(critic, nd, fake.detach().float())).backward()
            opt_c.step()
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            g_loss = -critic(fake).float().mean()
        g_loss.backward()
        opt.step()

    seconds = _timeit(lambda: ([step2() for _ in range(n_steps)], _sync()), repeat=3, warmup=1) / n_steps
    out["stage2_patches_per_s_batch20"] = 20 / seconds
    out["stage2_peak_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
    out["note"] = "network steps only (no data loading); the data path is measured in the data section"
    return out


SECTIONS: dict[str, Callable[[bool], dict[str, Any]]] = {
    "data": bench_data,
    "synthetic": bench_synthetic,
    "model": bench_model,
    "stage2": bench_stage2,
    "denoise": bench_denoise,
    "denoise_e2e": bench_denoise_e2e,
    "denoise_memory": bench_denoise_memory,
    "bf16_quality": bench_bf16_quality,
    "gpu": bench_gpu,
}
# sections that time inference in this process: glibc malloc set as in ldct-denoise (allocator.py)
INFERENCE_SECTIONS = ("denoise", "bf16_quality")


def _run_section(name: str, quick: bool) -> dict[str, Any]:
    """Run one section in a subprocess; returns its results plus wall time and peak RSS."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        result_file = f.name
    cmd = [sys.executable, "-m", "ldct_lightning.bench", "--section", name, "--section-out", result_file]
    if quick:
        cmd.append("--quick")
    load_before = os.getloadavg()[0]
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
    result["load_average_1min_before_after"] = [load_before, os.getloadavg()[0]]
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
        "load_average_1_5_15_min": list(os.getloadavg()),
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
    parser.add_argument("--quality-checkpoint", type=Path, help="bf16_quality: a trained checkpoint")
    parser.add_argument("--quality-data", type=Path, help="bf16_quality: its data set (with split.yaml)")
    parser.add_argument("--denoise-child", help=argparse.SUPPRESS)
    parser.add_argument("denoise_args", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.denoise_child:  # child process: one ldct-denoise run, its time and peak RSS
        from ldct_lightning.cli.denoise import main as denoise_main

        t0 = time.perf_counter()
        rc = denoise_main(args.denoise_args)
        result = {"rc": rc, "run_s": time.perf_counter() - t0}
        result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        Path(args.denoise_child).write_text(json.dumps(result))
        return rc

    if args.section:  # child process: run one section, write its JSON, report peak RSS
        # as ldct-denoise does (the training sections measure train.py, which leaves malloc as it is)
        kept = keep_freed_memory() if args.section in INFERENCE_SECTIONS else False
        result = {"keep_freed_memory": kept, **SECTIONS[args.section](args.quick)}
        result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        Path(args.section_out).write_text(json.dumps(result))
        return 0

    if args.quality_checkpoint and args.quality_data:  # sections run in subprocesses: pass them on
        os.environ["LDCT_BENCH_CHECKPOINT"] = str(args.quality_checkpoint.resolve())
        os.environ["LDCT_BENCH_DATA"] = str(args.quality_data.resolve())
    names = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in names if s not in SECTIONS]
    if unknown:
        parser.error(f"unknown section(s) {unknown}; choose from {list(SECTIONS)}")
    results: dict[str, Any] = {"machine": machine(), "quick": args.quick}
    for name in names:
        print(f"[bench] {name} ...", flush=True)
        results[name] = _run_section(name, args.quick)
        print(json.dumps(results[name], indent=2), flush=True)
    write_text_atomic(args.out, json.dumps(results, indent=2))
    print(f"[bench] wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
