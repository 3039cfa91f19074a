"""Benchmarks: the GPU benchmark's smoke run on CPU, the sampler benchmark at tiny settings, and
the analytic DiT FLOP count (the MFU numerator) against torch's FlopCounterMode."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

from svg_ray.flow.loss import FlowLoss
from svg_ray.models.dit import DiT, DiTConfig, count_params, dit_config

ROOT = Path(__file__).resolve().parents[1]


def _run(args: list[str], out: Path, timeout: float = 120) -> tuple[dict[str, Any], str]:
    """Run ``python -m benchmarks.<...>`` from the repo root on one thread; (JSON, stdout)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", *args, "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


def _positive(d: dict[str, Any], *keys: str) -> None:
    for k in keys:
        assert isinstance(d[k], (int, float)) and d[k] > 0, (k, d[k])


@pytest.fixture
def gpu_bench(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """benchmarks.gpu imported in-process (benchmarks/ is not an installed package)."""
    monkeypatch.syspath_prepend(str(ROOT))
    import benchmarks.gpu

    return benchmarks.gpu


SMOKE = ["--device", "cpu", "--model", "debug", "--train-batch", "2", "--sample-batches", "1", "2"]
SMOKE += ["--steps", "2", "--iters", "1", "--warmup", "0"]


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_gpu_benchmark_smoke_on_cpu(tmp_path: Path) -> None:
    """Every measurement runs and reports positive rates; no peak is known on CPU, so MFU is
    null; the FLOP counter (math attention) agrees with the formula exactly."""
    # The compiled step is left out: compile parity is tests/test_accel.py's (and costs ~30 s).
    r, stdout = _run(["benchmarks.gpu", *SMOKE, "--no-compile"], tmp_path / "gpu.json")
    assert r["status"] == "complete"
    assert stdout.strip().splitlines()[-1].startswith("bench gpu [cpu")
    env = r["env"]
    assert env["torch"] == torch.__version__ and env["device_name"].startswith("cpu")
    assert env["peak_bf16_tflops"] is None and r["precision"] == "fp32"
    assert r["model"]["name"] == "debug" and r["model"]["params_m"] > 0
    f = r["flops"]
    _positive(f, "train_per_image", "forward_per_image", "naive_6NT_per_image")
    assert f["train_per_step"] == 2 * f["train_per_image"] and "6*N*T" in f["formula"]
    m = r["measurements"]
    assert set(m) == {
        "train", "train_job_step", "flop_counter", "sample_b1", "sample_b2", "decoder_flops",
        "ema", "checkpoint",
        "decoder_share_by_steps",
    }  # fmt: skip
    for name in ("train", "train_job_step"):
        _positive(m[name], "images_per_s", "model_tflops_per_s", "wall_s")
        _positive(m[name]["step"], "median_ms")
        assert m[name]["batch"] == 2 and m[name]["timed_steps"] == 1
        assert m[name]["mfu"] is None
        assert "peak_memory_gib" not in m[name]  # CUDA only
    fc = m["flop_counter"]
    assert fc["math_sdpa"]["counted"] == fc["formula"] == f["train_per_step"]
    for bs in (1, 2):
        s = m[f"sample_b{bs}"]
        assert s["batch"] == bs and s["steps"] == 2 and s["timed_runs"] == 1
        _positive(s, "images_per_s", "ms_per_image", "dit_ms", "decode_ms", "dit_images_per_s")
        assert 0 < s["decoder_share"] < 1 and s["dit_mfu"] is None and s["outputs_finite"]
        assert s["image_shape"] == [bs, 256, 256, 3]  # uint8 pixels, as served
        assert (s["precision"], s["compiled"]) == ("fp32", False)
    _positive(m["decoder_flops"], "gflops_per_image", "params_m")
    _positive(m["ema"], "speedup", "tensors")
    c = m["checkpoint"]
    _positive(c, "checkpoint_gb", "async_stall_s")
    assert c["sync_stall_s"] >= c["async_stall_s"]
    # The decoder's share by step count, at the largest sample batch; it falls as steps grow.
    by_steps = m["decoder_share_by_steps"]
    assert by_steps["batch"] == 2 and by_steps["precision"] == "fp32"
    for n in ("1", "2", "4", "8", "25"):
        _positive(by_steps[n], "dit_ms", "decode_ms", "ms_per_image")
        assert 0 < by_steps[n]["decoder_share"] < 1
    assert by_steps["1"]["decoder_share"] > by_steps["25"]["decoder_share"]


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_gpu_benchmark_time_budget_still_writes_json(tmp_path: Path) -> None:
    """Over budget from the start: every measurement is recorded as skipped, not lost."""
    r, _ = _run(["benchmarks.gpu", *SMOKE, "--time-budget-s", "0"], tmp_path / "gpu.json")
    assert r["status"].startswith("partial: time budget")
    assert r["measurements"] and all("skipped" in v for v in r["measurements"].values())


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_sampler_benchmark_smoke(tmp_path: Path) -> None:
    """Tiny settings: all three ways of sampling give the same pixels at positive rates; Heun's
    model calls per second are Euler's within a loose factor (one timed round on a shared CPU)."""
    r, stdout = _run(["benchmarks.sampler", "--smoke"], tmp_path / "sampler.json")
    assert stdout.strip().splitlines()[-1].startswith("bench sampler [")
    assert r["config"]["images"] == 2 and r["config"]["steps"] == 2
    for name in ("batched", "per_image", "reference"):
        _positive(r["generate"][name], "images_per_s", "ms_per_image")
    assert r["generate"]["reference"]["forwards_per_round"] == 2 * 2 * 2  # steps x images x 2
    assert r["generate"]["batched"]["forwards_per_round"] == 2
    _positive(r, "ratio_batched_over_reference", "ratio_batched_over_per_image")
    assert max(r["max_abs_pixel_diff_vs_batched"].values()) < 1e-4
    eh = r["euler_vs_heun"]
    _positive(eh["euler"], "steps_per_s", "model_calls_per_s")
    assert 0.25 < eh["heun_over_euler_model_calls_per_s"] < 4
    # The serving code's split at few steps (smoke: 1 and 2), eager only without --compile.
    fs = r["few_step"]
    assert set(fs["eager"]) == {"1", "2"} and fs["compile_warmup_s"] is None
    for row in fs["eager"].values():
        _positive(row, "dit_ms", "decode_ms", "ms_per_image")
        assert 0 < row["decoder_share"] < 1


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_speed_benchmark_smoke(tmp_path: Path) -> None:
    """Tiny settings: each speed-up is timed against its baseline, and the checkpoint stall comes
    from a real two-worker Ray Train run (one sync and one async checkpoint per rank)."""
    args = ["--model", "debug", "--batch", "4", "--windows", "1", "--window", "1"]
    args += ["--ema-model", "debug", "--ema-rounds", "1", "--ckpt-model", "debug", "--ckpts", "1"]
    r, stdout = _run(["benchmarks.speed", *args, "--no-s3"], tmp_path / "speed.json", 280)
    assert stdout.strip().splitlines()[-1].startswith("bench speed: compiled step")
    _positive(r["step"], "eager_s_per_step", "compiled_s_per_step", "speedup", "compile_s")
    assert len(r["step"]["windows"]["on"]) == len(r["step"]["windows"]["off"]) == 1
    e = r["ema"]
    assert e["tensors"] == len(list(DiT(dit_config("debug")).parameters()))
    _positive(e, "loop_ms", "foreach_ms", "speedup")
    (c,) = r["checkpoint"]
    assert c["storage"] == "local" and c["checkpoint_gb"] > 0
    assert [len(rank["sync"]) + len(rank["async"]) for rank in c["per_rank"]] == [2, 2]
    _positive(c, "sync_stall_s", "async_stall_s", "run_wall_s")


ODD = DiTConfig(
    depth=3, width=32, heads=2, mlp_ratio=2.0, in_channels=24, grid=4, num_classes=7,
    learn_sigma=False,
)  # fmt: skip


@pytest.mark.parametrize(
    ("cfg", "device"),
    [
        (dit_config("debug"), "cpu"),  # 392 channels x 16x16 tokens, learn_sigma (784 outputs)
        (ODD, "cpu"),  # no learn_sigma, MLP ratio 2, other channel/grid/class counts
        (dit_config("SVG-XL"), "meta"),  # the real shapes; meta tensors: counted, not computed
    ],
    ids=["debug", "odd-shapes", "SVG-XL"],
)
def test_flop_formula_matches_flop_counter(
    gpu_bench: ModuleType, cfg: DiTConfig, device: str
) -> None:
    """The formula counts exactly the matmuls FlopCounterMode counts (2 per multiply-add, the
    same integer products), so the tolerance is zero. Attention runs on the math SDPA backend:
    on CPU the counter has no formula for the fused kernel (it would count no attention at
    all), and on CUDA it would add the fused backward's recompute, which model FLOPs leave out."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    B = 3
    flops = gpu_bench.dit_flops(cfg)
    with torch.device(device):
        model = DiT(cfg)
        x = torch.randn(B, cfg.grid**2, cfg.in_channels)
        y = torch.randint(0, cfg.num_classes, (B,))
        t = torch.rand(B)
    with sdpa_kernel(SDPBackend.MATH):
        with FlopCounterMode(display=False) as fwd, torch.no_grad():
            model(x, t, y)
        with FlopCounterMode(display=False) as train:
            FlowLoss()(model, x, y).backward()
    assert fwd.get_total_flops() == B * flops["forward_per_image"]
    assert train.get_total_flops() == B * flops["train_per_image"]


def test_naive_six_n_t_overstates_svg_xl(gpu_bench: ModuleType) -> None:
    """6 * count_params * T would overstate SVG-XL's training FLOPs by ~1.46x: a third of its
    675M weights are adaLN modulations, applied once per image rather than per token."""
    cfg = dit_config("SVG-XL")
    with torch.device("meta"):
        params = count_params(DiT(cfg))
    flops = gpu_bench.dit_flops(cfg)
    assert 675e6 < params < 677e6
    assert 6 * params * flops["tokens"] / flops["train_per_image"] == pytest.approx(1.456, abs=1e-3)


def test_peak_table(gpu_bench: ModuleType) -> None:
    """Dense bf16 peaks by device name; unknown cards get none (then MFU is null)."""
    peak = gpu_bench.peak_bf16_tflops
    assert peak("NVIDIA H100 80GB HBM3")[0] == 989.0
    assert peak("NVIDIA H100 PCIe")[0] == 756.0
    assert peak("NVIDIA H200")[0] == 989.0
    assert peak("NVIDIA A100-SXM4-80GB")[0] == 312.0
    assert peak("NVIDIA L4")[0] == 121.0
    assert peak("NVIDIA L40S") == (None, None)
    assert peak("AMD EPYC") == (None, None)


def test_gpu_benchmark_records_oom_and_goes_on(
    gpu_bench: ModuleType, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """An OOM in one measurement is recorded in the JSON; the measurements after it still run."""

    def oom(*_: object) -> dict[str, Any]:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 GiB")

    monkeypatch.setattr(gpu_bench, "bench_sample", oom)
    out = tmp_path / "gpu.json"
    args = ["--device", "cpu", "--model", "debug", "--train-batch", "2", "--sample-batches", "1"]
    args += ["--steps", "1", "--iters", "1", "--warmup", "0", "--out", str(out)]
    assert gpu_bench.main([*args, "--no-compile"]) == 1  # a unit test: no compiler processes
    r = json.loads(out.read_text())
    m = r["measurements"]
    assert m["sample_b1"]["error"] == "out of memory" and "64.00 GiB" in m["sample_b1"]["message"]
    assert m["decoder_flops"]["gflops_per_image"] > 0 and m["train"]["images_per_s"] > 0
    assert r["status"] == "errors in ['sample_b1']"


@pytest.mark.integration  # runs the benchmark as a subprocess
def test_quality_benchmark_smoke_and_skip(tmp_path: Path) -> None:
    """On a tiny random bundle: the judge is good on held-out real digits (so the metric means
    something), every setting gets a row, and a missing bundle is a clean skip (exit code 3)."""
    from test_serve_lib import make_bundle

    bundle = make_bundle(tmp_path / "bundle")
    args = ["benchmarks.quality", "--bundle", str(bundle), "--per-class", "8", "--steps", "1", "2"]
    r, stdout = _run([*args, "--cfg", "1", "3"], tmp_path / "quality.json", timeout=300)
    assert stdout.strip().splitlines()[-1].startswith("quality: best FD")
    assert "| Euler steps | CFG |" in stdout
    base = r["baseline_real_held_out"]
    assert base["accuracy"] > 0.9 and base["images"] == 80 and base["fd"] > 0
    assert [(row["steps"], row["cfg_scale"]) for row in r["results"]] == [
        (1, 1.0), (2, 1.0), (1, 3.0), (2, 3.0),
    ]  # fmt: skip
    for row in r["results"]:
        assert row["images"] == 80 and 0 <= row["accuracy"] <= 1
        # random weights make no digits: far from the real ones
        assert row["fd_ratio"] > 2, row
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.quality", "--bundle", str(tmp_path / "none")],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 3 and "make demo" in proc.stdout
