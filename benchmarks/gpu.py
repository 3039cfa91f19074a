"""GPU benchmark: SVG-XL training-step throughput and MFU, 25-step CFG sampling throughput (bf16
against fp32, compiled against eager), and the decoder's share of sampling time by step count, on
one CUDA device.

    timeout 480 python -m benchmarks.gpu [--model SVG-XL] [--train-batch 32] [--sample-batches 1 64]
        [--steps 25] [--few-steps 1 2 4 8 25] [--sample-variants auto] [--warmup 3] [--iters 20]
        [--no-compile] [--time-budget-s 360] [--out outputs/bench/gpu.json]

Smoke run without a GPU (what tests/test_benchmarks.py runs):

    python -m benchmarks.gpu --device cpu --model debug --train-batch 2 --sample-batches 1 2 \
        --steps 2 --iters 1 --warmup 0

Weights are random (no network, no pretrained weights; every parameter is nudged off DiT's zero
init, as benchmarks/serve.py does): the arithmetic and so the throughput do not depend on them.
Measurements, in order, each guarded (an OOM or any error is recorded in the JSON, the next one
still runs; the JSON is rewritten after each, so a timeout leaves what was measured):

- ``train``: the core training step on a fixed random batch of (B, 256, 392) latent tokens and
  labels of 1000 classes (no data loading): FlowLoss (t shift 0.4) forward under bf16 autocast,
  backward, AdamW (lr 1e-4, betas 0.9/0.999, wd 0: the job's settings). Images/s and MFU
  against the card's dense bf16 peak.
- ``train_job_step``: the job's own step (``training/diffusion.py``'s ``diffusion_step``): fused
  AdamW, the gradient norm (``clip_grad_norm_`` with an infinite limit) and the foreach EMA.
- ``flop_counter``: one forward+backward under ``torch.utils.flop_counter.FlopCounterMode``, with
  the math SDPA backend (must equal the formula below exactly) and with the default backend
  (fused kernels: the counter adds their backward's recompute of QK^T, 2 L T^2 D per image).
- ``sample_b{N}`` per --sample-batches: the served sampling code,
  ``svg_ray.serving.sampler.SamplingPath`` (Euler, 25 steps, time shift 0.15, constant CFG 4:
  conditional and null passes in one 2N batch, integrated in fp32) with the SVG conv decoder
  (``ae_preset('svg').decoder`` at 256 px, the only part of the autoencoder decoding needs) down
  to uint8 pixels on the host, at the bench's precision (bf16 autocast on CUDA); the DiT is the
  trained model in eval mode (an EMA copy has the same cost). Images/s, ms/image, DiT and
  decoder time, decoder share.
- ``sample_b{N}_fp32`` and ``sample_b{N}_compiled`` (--sample-variants; by default on CUDA only):
  the same in fp32 (TF32 matmuls; on CPU the other precision is bf16), and at the bench's
  precision with ``server.compile`` on (copies of the models, compiled by the served load-time
  warm-up, whose seconds are ``compile_warmup_s``).
- ``decoder_flops``: the decoder's FLOPs per image (FlopCounterMode, one image).
- ``decoder_share_by_steps`` (and ``_compiled`` with the variants): DiT and decoder time at each
  of --few-steps (1, 2, 4, 8, 25) at the largest sample batch: where few-step sampling spends.
- ``ema``: one EMA update of the DiT, foreach (``EMA.update``) against the per-tensor loop.
- ``checkpoint``: the job's state (DiT, EMA, AdamW moments) written to a local folder (what the
  ranks wait for with asynchronous upload) and copied to a second one (what synchronous upload
  adds, at least).
- ``train_compiled`` (unless --no-compile): ``train_job_step`` with the DiT's blocks compiled in
  place as ``--compile on`` does (the compile is timed apart, not in the warm-up).

Each measurement resets and records ``torch.cuda.max_memory_allocated``. Every timed call has a
``torch.cuda.synchronize`` on both sides (sampling also between DiT and decoder); training rates
are images over the sum of timed steps, sampling rates use the median run (sampling runs at most
1 untimed and 5 timed times per setting: a 25-step batch of 64 takes seconds). On an H100 the
default run should take ~4 min, most of it compiling SVG-XL and the decoder for the compiled
rows; --time-budget-s skips whatever would start after it.
"""

from __future__ import annotations

import argparse
import copy
import functools
import gc
import platform
import re
import signal
import sys
import time
import traceback
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.common import cpu_model, loop_ema_update, machine, write_json
from svg_ray.data.latents import LatentStats
from svg_ray.flow.loss import FlowLoss
from svg_ray.flow.samplers import SamplerConfig
from svg_ray.models.autoencoder import ae_preset
from svg_ray.models.decoder import Decoder
from svg_ray.models.dit import DIT_SIZES, DiT, DiTConfig, count_params, dit_config
from svg_ray.models.ema import EMA
from svg_ray.serving.sampler import SamplingPath
from svg_ray.training.accel import compile_blocks, optimizer_impl
from svg_ray.training.diffusion import DiffusionParts, diffusion_step

# Dense (no 2:4 sparsity) bf16 tensor-core peaks from NVIDIA's datasheets, matched against
# torch.cuda.get_device_name(); first match wins. Anything else needs --peak-tflops.
PEAK_BF16_TFLOPS: list[tuple[str, float]] = [
    (r"H100.*PCIe", 756.0),
    (r"H100.*NVL", 835.0),
    (r"H100", 989.0),  # SXM ("NVIDIA H100 80GB HBM3")
    (r"H200.*NVL", 835.0),
    (r"H200", 989.0),  # also GH200
    (r"A100", 312.0),
    (r"\bL4\b", 121.0),  # not L40/L40S
]

TIME_FREQ_DIM = 256  # TimestepEmbedder's sinusoid width (svg_ray/models/dit.py)

FLOP_FORMULA = (
    "matmul FLOPs (2 per multiply-add) per image, T = grid^2 tokens, D width, L depth, F MLP "
    "hidden, C_in/C_out latent channels in/out: N_tok = C_in*D + L*(4*D^2 + 2*D*F) + D*C_out "
    "(Linear weights applied to every token: patch embedding, qkv, proj, fc1, fc2, final linear); "
    "N_img = 256*D + D^2 + 6*L*D^2 + 2*D^2 (applied once per image: timestep MLP, adaLN "
    "modulations); forward = 2*(T*N_tok + N_img) + 4*L*T^2*D (QK^T and AV); train = 3*forward "
    "- 2*T*C_in*D - 2*256*D (backward = 2x forward less the input gradients of the two Linears "
    "whose inputs need none). I.e. the standard 6*N*T + 12*L*T^2*D with N = per-token weights; "
    "elementwise ops, the optimiser and fused-attention recompute are not counted (model FLOPs, "
    "as PaLM's MFU)."
)


# --------------------------------------------------------------------------------------------
# FLOPs and peaks
# --------------------------------------------------------------------------------------------


def dit_flops(cfg: DiTConfig) -> dict[str, int]:
    """Matmul FLOPs per image of the DiT (see FLOP_FORMULA), with the terms that make them up."""
    T, D, L, C_in, C_out = cfg.grid**2, cfg.width, cfg.depth, cfg.in_channels, cfg.out_channels
    F = int(cfg.width * cfg.mlp_ratio)
    n_tok = C_in * D + L * (4 * D * D + 2 * D * F) + D * C_out
    # Per image, not per token: in 6*count_params*T these weights are counted T times over.
    n_img = TIME_FREQ_DIM * D + D * D + L * 6 * D * D + 2 * D * D
    attn_fwd = 4 * L * T * T * D
    forward = 2 * (T * n_tok + n_img) + attn_fwd
    no_input_grad = 2 * T * C_in * D + 2 * TIME_FREQ_DIM * D
    return {
        "tokens": T,
        "per_token_weights": n_tok,
        "per_image_weights": n_img,
        "forward_per_image": forward,
        "train_per_image": 3 * forward - no_input_grad,
        "attention_train_per_image": 3 * attn_fwd,
        "fused_attention_recompute_per_image": 2 * L * T * T * D,
    }


def peak_bf16_tflops(device_name: str) -> tuple[float | None, str | None]:
    """(dense bf16 peak in TFLOP/s, the table pattern that matched) or (None, None)."""
    for pattern, tflops in PEAK_BF16_TFLOPS:
        if re.search(pattern, device_name, flags=re.IGNORECASE):
            return tflops, pattern
    return None, None


# --------------------------------------------------------------------------------------------
# Harness: guarded, budgeted, incrementally written measurements
# --------------------------------------------------------------------------------------------


class Terminated(BaseException):
    """SIGTERM (``timeout``) arrived: stop, but still write the JSON."""


@dataclass
class Bench:
    """What every measurement needs: settings, device, precision, deadline and the report."""

    args: argparse.Namespace
    device: torch.device
    amp: torch.dtype | None
    peak_tflops: float | None
    t_start: float
    report: dict[str, Any] = field(default_factory=dict)

    @property
    def cuda(self) -> bool:
        """Running on a CUDA device."""
        return self.device.type == "cuda"

    def elapsed(self) -> float:
        """Seconds since the process started measuring."""
        return time.monotonic() - self.t_start

    def over_budget(self) -> bool:
        """--time-budget-s exceeded: start nothing new, stop timed loops."""
        return self.elapsed() > self.args.time_budget_s

    def sync(self) -> None:
        """Wait for the device (CUDA runs asynchronously)."""
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def autocast(self) -> Any:
        """bf16 autocast on CUDA (as the training job and the brief), nothing on CPU."""
        return torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None)

    def mfu(self, flops_per_s: float) -> float | None:
        """Model FLOP utilisation against the dense bf16 peak; None where no peak is known."""
        return None if self.peak_tflops is None else flops_per_s / (self.peak_tflops * 1e12)

    def write(self) -> None:
        """Rewrite the JSON with everything so far."""
        self.report["elapsed_s"] = round(self.elapsed(), 2)
        write_json(self.args.out, self.report)

    def measure(self, name: str, fn: Callable[[], dict[str, Any]]) -> None:
        """Run one measurement; record its result, an OOM, an error or a budget skip; write."""
        out: dict[str, Any]
        if self.over_budget():
            out = {"skipped": f"time budget of {self.args.time_budget_s} s exceeded"}
            print(f"  {name}: skipped (time budget)", flush=True)
        else:
            gc.collect()
            if self.cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(self.device)
            t0 = time.monotonic()
            try:
                out = fn()
            except torch.cuda.OutOfMemoryError as e:
                out = {"error": "out of memory", "message": str(e)[:600]}
            except Exception as e:  # one failure must not lose the other measurements
                out = {
                    "error": type(e).__name__,
                    "message": str(e)[:600],
                    "traceback": traceback.format_exc()[-2000:],
                }
            # The exception (and the frames holding its tensors) is gone here: free its memory.
            gc.collect()
            if self.cuda:
                peak = torch.cuda.max_memory_allocated(self.device)
                out["peak_memory_gib"] = round(peak / 2**30, 3)
                torch.cuda.empty_cache()
            out["wall_s"] = round(time.monotonic() - t0, 2)
            shown = {k: v for k, v in out.items() if not isinstance(v, (dict, list))}
            print(f"  {name}: {shown}", flush=True)
        self.report["measurements"][name] = out
        self.write()

    def timed(self, fn: Callable[[], Any], warmup: int, iters: int) -> list[float]:
        """Seconds of each timed call of ``fn`` (synchronised on both sides), after ``warmup``
        untimed calls; stops early (at least one timed call) once over budget."""
        for _ in range(warmup):
            if self.over_budget():
                break
            fn()
        times = []
        for _ in range(max(iters, 1)):
            self.sync()
            t0 = time.perf_counter()
            fn()
            self.sync()
            times.append(time.perf_counter() - t0)
            if self.over_budget():
                break
        return times


def _ms(xs: list[float]) -> dict[str, float]:
    return {
        "median_ms": round(1000 * float(np.median(xs)), 3),
        "min_ms": round(1000 * min(xs), 3),
        "max_ms": round(1000 * max(xs), 3),
    }


# --------------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------------


def build_dit(cfg: DiTConfig, device: torch.device) -> DiT:
    """A randomly initialised DiT on ``device``, nudged off its zero init (adaLN, output)."""
    torch.manual_seed(0)
    with device:  # build on the device: initialising 675M parameters on the host is slow
        dit = DiT(cfg)
    with torch.no_grad():
        for p in dit.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return dit


def bench_train(
    b: Bench, dit: DiT, flops: dict[str, int], job_step: bool = False, compiled: bool = False
) -> dict[str, Any]:
    """Images/s, step time and MFU of one training step (see the module docstring).

    ``job_step``: the job's own ``diffusion_step`` (fused AdamW, gradient norm, foreach EMA);
    ``compiled``: that step with the DiT's blocks compiled in place, as ``--compile`` does.
    """
    a, cfg = b.args, dit.cfg
    B = a.train_batch
    dit.train()
    x = torch.randn(B, cfg.grid**2, cfg.in_channels, device=b.device)  # (B, T, C)
    y = torch.randint(0, cfg.num_classes, (B,), device=b.device)
    if job_step or compiled:
        opt = torch.optim.AdamW(dit.parameters(), lr=1e-4, **optimizer_impl(b.device))
        parts = DiffusionParts(dit, dit, EMA(dit, 0.9999), opt, FlowLoss(0.4), 0.0, b.amp)
        if compiled:
            compile_blocks(dit.blocks)

        def step() -> None:
            diffusion_step(parts, x, y)

    else:  # the bare step: unfused AdamW, no gradient norm, no EMA
        opt = torch.optim.AdamW(dit.parameters(), lr=1e-4, betas=(0.9, 0.999), weight_decay=0.0)
        flow = FlowLoss(0.4)

        def step() -> None:
            with b.autocast():
                loss = flow(dit, x, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    compile_s = None
    try:
        if compiled:  # the first call compiles; keep it out of the warm-up count
            t0 = time.perf_counter()
            step()
            b.sync()
            compile_s = round(time.perf_counter() - t0, 2)
        times = b.timed(step, a.warmup, a.iters)
    finally:  # gradients live on the shared model, not in this frame: free them even on OOM
        dit.zero_grad(set_to_none=True)
    ips = B * len(times) / sum(times)
    flops_per_s = ips * flops["train_per_image"]
    out = {
        "batch": B,
        "timed_steps": len(times),
        "images_per_s": round(ips, 3),
        "step": _ms(times),
        "model_tflops_per_s": round(flops_per_s / 1e12, 3),
        "mfu": None if (m := b.mfu(flops_per_s)) is None else round(m, 4),
    }
    if compile_s is not None:
        out["compile_first_step_s"] = compile_s
    return out


def bench_ema(b: Bench, dit: DiT) -> dict[str, Any]:
    """One EMA update of the DiT: the foreach ``EMA.update`` against the per-tensor loop."""
    ema = EMA(dit, 0.9999)
    loop = b.timed(lambda: loop_ema_update(ema, dit), b.args.warmup, b.args.iters)
    foreach = b.timed(lambda: ema.update(dit), b.args.warmup, b.args.iters)
    return {
        "tensors": len(list(dit.parameters())),
        "loop": _ms(loop),
        "foreach": _ms(foreach),
        "speedup": round(float(np.median(loop) / np.median(foreach)), 3),
    }


def bench_checkpoint(b: Bench, dit: DiT) -> dict[str, Any]:
    """The checkpoint's cost on the critical path. Asynchronous upload: the ranks wait while
    rank 0 writes the job's state (DiT, EMA, AdamW moments: copied off the device) to a local
    folder. Synchronous: they also wait for the upload, here a copy to another local folder (a
    lower bound: an upload to S3 is slower)."""
    import shutil
    import tempfile

    opt = torch.optim.AdamW(dit.parameters(), lr=1e-4, **optimizer_impl(b.device))
    for p in dit.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()  # the moments exist, as in a running job
    dit.zero_grad(set_to_none=True)
    state = {
        "model": dit.state_dict(),
        "ema": EMA(dit, 0.9999).model.state_dict(),
        "opt": opt.state_dict(),
    }
    with tempfile.TemporaryDirectory() as d:
        b.sync()
        t0 = time.perf_counter()
        torch.save(state, f"{d}/state.pt")
        write_s = time.perf_counter() - t0
        size = Path(d, "state.pt").stat().st_size
        t0 = time.perf_counter()
        shutil.copytree(d, f"{d}-upload")
        upload_s = time.perf_counter() - t0
        shutil.rmtree(f"{d}-upload")
    return {
        "checkpoint_gb": round(size / 1e9, 3),
        "async_stall_s": round(write_s, 3),
        "sync_stall_s": round(write_s + upload_s, 3),
        "local_upload_s": round(upload_s, 3),
    }


def bench_flop_counter(b: Bench, dit: DiT, flops: dict[str, int]) -> dict[str, Any]:
    """FlopCounterMode totals of one forward+backward against the formula."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    cfg, B = dit.cfg, b.args.train_batch
    x = torch.randn(B, cfg.grid**2, cfg.in_channels, device=b.device)
    y = torch.randint(0, cfg.num_classes, (B,), device=b.device)
    formula = B * flops["train_per_image"]
    out: dict[str, Any] = {"batch": B, "formula": formula}
    backends: dict[str, AbstractContextManager[Any]] = {
        "math_sdpa": sdpa_kernel(SDPBackend.MATH),
        "default_sdpa": nullcontext(),
    }
    for name, backend in backends.items():
        try:
            with backend, FlopCounterMode(display=False) as counter:
                with b.autocast():
                    loss = FlowLoss(0.4)(dit, x, y)
                loss.backward()
        finally:
            dit.zero_grad(set_to_none=True)
        total = counter.get_total_flops()
        out[name] = {
            "counted": total,
            "ratio_to_formula": round(total / formula, 6),
            "by_op": {str(k): v for k, v in counter.get_flop_counts().get("Global", {}).items()},
        }
    recompute = B * flops["fused_attention_recompute_per_image"]
    out["note"] = (
        "math_sdpa must equal the formula (ratio 1); default_sdpa on CUDA adds the fused "
        f"backward's recompute of QK^T (formula + {recompute}), on CPU it misses the fused "
        "attention kernel altogether"
    )
    return out


def build_decoder(b: Bench, dit: DiT) -> Decoder:
    """The autoencoder's decoder alone (random weights), for latents of the DiT's shape."""
    ae_cfg = ae_preset(b.args.ae)
    resolution = dit.cfg.grid * ae_cfg.decoder.upsample_factor
    torch.manual_seed(1)
    with b.device:
        return Decoder(ae_cfg.decoder, dit.cfg.in_channels, resolution).eval()


def sampling_path(
    b: Bench,
    dit: DiT,
    decoder: Decoder,
    amp: torch.dtype | None,
    compiled: bool,
    cache: dict[tuple[torch.dtype | None, bool], tuple[SamplingPath, float]],
) -> tuple[SamplingPath, float | None]:
    """The served sampling code (``svg_ray.serving.sampler.SamplingPath``) at one precision, eager
    or compiled, and the seconds its load-time warm-up took where this call made it (None when
    ``cache`` had it). Compiled paths work on copies: compiling is in place, and the eager
    measurements and the training ones use the originals."""
    key = (amp, compiled)
    if key in cache:
        return cache[key][0], None
    dit.eval()
    stats = LatentStats(np.zeros(dit.cfg.in_channels), np.ones(dit.cfg.in_channels))
    if compiled:
        dit, decoder = copy.deepcopy(dit), copy.deepcopy(decoder)
    path = SamplingPath(dit, decoder, stats, amp=amp, compiled=compiled)
    b.sync()
    t0 = time.perf_counter()
    # As a replica at load: every batch this benchmark runs then reuses a compiled graph.
    path.warm_up(max(b.args.sample_batches))
    b.sync()
    cache[key] = (path, time.perf_counter() - t0)
    return path, cache[key][1]


def _split(
    b: Bench, path: SamplingPath, batch: int, steps: int, warmup: int, iters: int
) -> tuple[list[tuple[float, float]], list[int], bool]:
    """(DiT s, decoder s) of each timed run, the uint8 image shape, whether latents were finite."""
    a, cfg = b.args, path.dit.cfg
    scfg = SamplerConfig(steps=steps, kind="euler", cfg_scale=a.cfg_scale)
    labels = torch.arange(batch) % cfg.num_classes
    seeds = list(range(batch))
    parts: list[tuple[float, float]] = []
    shape: list[int] = []
    finite: list[bool] = []

    def once() -> None:
        b.sync()
        t0 = time.perf_counter()
        tokens = path.latents(labels, seeds, scfg)  # (B, T, C) fp32
        b.sync()
        t1 = time.perf_counter()
        images = path.decode(tokens)  # uint8 (B, H, W, 3) on the host, as served
        parts.append((t1 - t0, time.perf_counter() - t1))
        shape[:] = list(images.shape)
        finite.append(bool(torch.isfinite(tokens).all()))  # untimed

    runs = len(b.timed(once, warmup, iters))
    return parts[-runs:], shape, all(finite)


def bench_sample(
    b: Bench,
    dit: DiT,
    decoder: Decoder,
    flops: dict[str, int],
    cache: dict[tuple[torch.dtype | None, bool], tuple[SamplingPath, float]],
    batch: int,
    amp: torch.dtype | None,
    compiled: bool = False,
) -> dict[str, Any]:
    """Sampling + decode throughput at one batch size, precision and compile setting, and the
    decoder's share of it; ``cache`` keeps each setting's ``SamplingPath`` across batches."""
    a = b.args
    path, warmup_s = sampling_path(b, dit, decoder, amp, compiled, cache)
    # A 25-step SVG-XL batch of 64 is seconds long: a few timed runs pin its median.
    timed, shape, finite = _split(b, path, batch, a.steps, min(a.warmup, 1), min(a.iters, 5))
    totals = [p[0] + p[1] for p in timed]
    dit_s = float(np.median([p[0] for p in timed]))
    dec_s = float(np.median([p[1] for p in timed]))
    total_s = float(np.median(totals))
    cfg_factor = 2 if a.cfg_scale != 1.0 else 1
    dit_flops_per_s = a.steps * cfg_factor * batch * flops["forward_per_image"] / dit_s
    out = {
        "batch": batch,
        "steps": a.steps,
        "precision": path.precision,
        "compiled": path.compiled,
        "sampler": f"euler, time shift 0.15, cfg {a.cfg_scale} constant",
        "timed_runs": len(timed),
        "images_per_s": round(batch / total_s, 3),
        "ms_per_image": round(1000 * total_s / batch, 3),
        "total": _ms(totals),
        "dit_ms": round(1000 * dit_s, 3),
        "decode_ms": round(1000 * dec_s, 3),
        "decoder_share": round(dec_s / (dit_s + dec_s), 4),
        "dit_images_per_s": round(batch / dit_s, 3),
        "dit_model_tflops_per_s": round(dit_flops_per_s / 1e12, 3),
        "dit_mfu": None if (m := b.mfu(dit_flops_per_s)) is None else round(m, 4),
        "image_shape": shape,
        "outputs_finite": finite,
    }
    if warmup_s is not None and compiled:
        out["compile_warmup_s"] = round(warmup_s, 2)
    return out


def bench_steps(
    b: Bench,
    dit: DiT,
    decoder: Decoder,
    batch: int,
    amp: torch.dtype | None,
    compiled: bool,
    cache: dict[tuple[torch.dtype | None, bool], tuple[SamplingPath, float]],
) -> dict[str, Any]:
    """DiT and decoder time, and the decoder's share, at each of --few-steps (one batch)."""
    a = b.args
    path, _ = sampling_path(b, dit, decoder, amp, compiled, cache)
    out: dict[str, Any] = {
        "batch": batch,
        "precision": path.precision,
        "compiled": path.compiled,
    }
    for steps in a.few_steps:
        if b.over_budget():
            out[str(steps)] = {"skipped": "time budget"}
            continue
        timed, _, _ = _split(b, path, batch, steps, min(a.warmup, 1), min(a.iters, 5))
        dit_s = float(np.median([p[0] for p in timed]))
        dec_s = float(np.median([p[1] for p in timed]))
        out[str(steps)] = {
            "dit_ms": round(1000 * dit_s, 3),
            "decode_ms": round(1000 * dec_s, 3),
            "decoder_share": round(dec_s / (dit_s + dec_s), 4),
            "ms_per_image": round(1000 * (dit_s + dec_s) / batch, 3),
        }
    return out


def bench_decoder_flops(b: Bench, dit: DiT, decoder: Decoder) -> dict[str, Any]:
    """Decoder FLOPs for one image (convs + attention matmuls)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    z = torch.randn(1, dit.cfg.in_channels, dit.cfg.grid, dit.cfg.grid, device=b.device)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as c:
        with b.autocast():
            decoder(z)
    return {
        "gflops_per_image": round(c.get_total_flops() / 1e9, 3),
        "params_m": round(count_params(decoder) / 1e6, 3),
    }


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def environment(
    device: torch.device, peak: float | None, peak_source: str | None
) -> dict[str, Any]:
    """torch/CUDA versions, the device and its peak, the host."""
    env: dict[str, Any] = {
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "python": platform.python_version(),
        "peak_bf16_tflops": peak,
        "peak_source": peak_source,
        "host": machine(),
    }
    if device.type == "cuda":
        prop = torch.cuda.get_device_properties(device)
        env.update(
            device_name=torch.cuda.get_device_name(device),
            capability=list(torch.cuda.get_device_capability(device)),
            multiprocessors=prop.multi_processor_count,
            total_memory_gib=round(prop.total_memory / 2**30, 2),
            tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
        )
    else:
        env["device_name"] = f"cpu: {cpu_model()}"
    return env


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Flags; --device cpu only with a small model (a smoke run)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="outputs/bench/gpu.json")
    p.add_argument("--device", default="cuda", help="cuda, cuda:N, or cpu for a smoke run")
    p.add_argument("--model", default="SVG-XL", choices=sorted(DIT_SIZES))
    p.add_argument(
        "--ae", default=None, choices=["svg", "debug"], help="decoder preset (default: svg; debug "
        "with --model debug)"
    )  # fmt: skip
    p.add_argument("--train-batch", type=int, default=32)
    p.add_argument("--sample-batches", type=int, nargs="+", default=[1, 64])
    p.add_argument("--steps", type=int, default=25, help="Euler steps per sample")
    p.add_argument(
        "--few-steps", type=int, nargs="+", default=[1, 2, 4, 8, 25],
        help="step counts for the decoder's share (at the largest --sample-batches)",
    )  # fmt: skip
    p.add_argument(
        "--sample-variants", default="auto", choices=["auto", "on", "off"],
        help="also time sampling at the other precision and compiled (auto: on CUDA only; on "
        "CPU, bf16 convolutions and compiling take minutes)",
    )  # fmt: skip
    p.add_argument("--cfg-scale", type=float, default=4.0, help="CFG weight (1 = no CFG)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls per measurement")
    p.add_argument("--iters", type=int, default=20, help="timed calls per measurement")
    p.add_argument(
        "--compile", action=argparse.BooleanOptionalAction, default=True,
        help="also time the training step with the DiT's blocks compiled (as --compile on)",
    )  # fmt: skip
    p.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak (unknown card)")
    p.add_argument(
        "--time-budget-s", type=float, default=360.0,
        help="start no measurement after this many seconds (timed loops stop early too)",
    )  # fmt: skip
    a = p.parse_args(argv)
    if a.ae is None:
        a.ae = "debug" if a.model == "debug" else "svg"
    if a.device.startswith("cpu") and a.model not in ("debug", "demo"):
        p.error("--device cpu is for smoke runs: add --model debug")
    if min(a.train_batch, *a.sample_batches, a.steps) < 1 or a.warmup < 0 or a.iters < 1:
        p.error("batches, --steps and --iters must be >= 1, --warmup >= 0")
    if min(a.few_steps) < 1:
        p.error("--few-steps must be >= 1")
    return a


def summary_line(report: dict[str, Any], out: Path) -> str:
    """One line: train images/s and MFU, sampling images/s, ms/image, decoder share, memory."""
    m, env = report["measurements"], report["env"]

    def show(name: str, fmt: Callable[[dict[str, Any]], str]) -> str:
        r = m.get(name, {})
        if "error" in r or "skipped" in r or not r:
            return f"{name} {r.get('error') or r.get('skipped') or 'not run'}"
        return fmt(r)

    def pct(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.1%}"

    parts = [
        show(
            "train",
            lambda r: f"train bs{r['batch']} {r['images_per_s']:.1f} img/s MFU {pct(r['mfu'])}",
        ),
        show("train_job_step", lambda r: f"+grad-norm+EMA {r['images_per_s']:.1f} img/s"),
    ]
    if "train_compiled" in m:
        parts.append(
            show(
                "train_compiled",
                lambda r: f"compiled {r['images_per_s']:.1f} img/s MFU {pct(r['mfu'])}",
            )
        )
    parts.append(show("ema", lambda r: f"EMA foreach {r['speedup']:.1f}x loop"))
    parts.append(
        show(
            "checkpoint",
            lambda r: (
                f"checkpoint {r['checkpoint_gb']:.1f} GB stall async {r['async_stall_s']:.1f} s "
                f"vs sync {r['sync_stall_s']:.1f} s"
            ),
        )
    )
    for bs in report["config"]["sample_batches"]:
        parts.append(
            show(
                f"sample_b{bs}",
                lambda r: (
                    f"sample b{r['batch']} {r['images_per_s']:.2f} img/s "
                    f"{r['ms_per_image']:.1f} ms/img decoder {r['decoder_share']:.0%}"
                ),
            )
        )
    peaks = [r["peak_memory_gib"] for r in m.values() if "peak_memory_gib" in r]
    mem = f"; peak mem {max(peaks):.1f} GiB" if peaks else ""
    return (
        f"bench gpu [{env['device_name']}, torch {env['torch']}, {report['config']['model']}, "
        f"{report['config']['steps']} steps]: " + "; ".join(parts) + mem + f" -> {out}"
    )


def main(argv: list[str] | None = None) -> int:
    """Run the measurements in turn, rewriting the JSON after each; print a one-line summary."""
    t_start = time.monotonic()
    a = parse_args(argv)

    def on_term(*_: object) -> None:
        raise Terminated

    previous = signal.signal(signal.SIGTERM, on_term)  # `timeout` still leaves a JSON
    try:
        return run(a, t_start)
    finally:
        signal.signal(signal.SIGTERM, previous)


def run(a: argparse.Namespace, t_start: float) -> int:
    """Build the models, run every measurement; the exit status."""
    device = torch.device(a.device)
    report: dict[str, Any] = {
        "benchmark": "gpu",
        "status": "running",
        "config": vars(a),
        "measurements": {},
    }
    if device.type == "cuda" and not torch.cuda.is_available():
        report.update(
            status="failed", error="no CUDA device (smoke run: --device cpu --model debug)"
        )
        write_json(a.out, report)
        print(f"bench gpu: {report['error']}", file=sys.stderr)
        return 2

    if device.type == "cuda":
        # As training.common.device_and_precision: TF32 for the fp32 matmuls left outside bf16.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        peak, source = peak_bf16_tflops(torch.cuda.get_device_name(device))
        amp: torch.dtype | None = torch.bfloat16
    else:
        peak, source, amp = None, None, None
    if a.peak_tflops is not None:
        peak, source = a.peak_tflops, "--peak-tflops"

    b = Bench(a, device, amp, peak, t_start, report)
    report["env"] = environment(device, peak, source)
    report["precision"] = "bf16 autocast + TF32" if amp is not None else "fp32"
    cfg = dit_config(a.model)
    flops = dit_flops(cfg)
    report["model"] = {
        "name": a.model,
        **DIT_SIZES[a.model],
        "latent_tokens_x_channels": [cfg.grid**2, cfg.in_channels],
        "num_classes": cfg.num_classes,
        "decoder_preset": a.ae,
    }
    report["flops"] = {
        "formula": FLOP_FORMULA,
        **flops,
        "train_per_step": a.train_batch * flops["train_per_image"],
    }
    b.write()
    print(f"bench gpu: {report['env']['device_name']} torch {torch.__version__}", flush=True)
    try:
        t0 = time.monotonic()
        dit = build_dit(cfg, device)
        params = count_params(dit)
        report["model"]["params_m"] = round(params / 1e6, 3)
        # What 6 * count_params * T would claim: adaLN weights act once per image, not per token.
        report["flops"]["naive_6NT_per_image"] = 6 * params * flops["tokens"]
        report["flops"]["naive_over_formula"] = round(
            report["flops"]["naive_6NT_per_image"] / flops["train_per_image"], 4
        )
        decoder = build_decoder(b, dit)
        b.sync()
        report["model"]["build_s"] = round(time.monotonic() - t0, 2)
        report["model"]["decoder_params_m"] = round(count_params(decoder) / 1e6, 3)
        b.write()

        b.measure("train", lambda: bench_train(b, dit, flops))
        b.measure("train_job_step", lambda: bench_train(b, dit, flops, job_step=True))
        b.measure("flop_counter", lambda: bench_flop_counter(b, dit, flops))
        # The served code path at the bench's precision (bf16 on CUDA), then with
        # --sample-variants at the other precision and compiled; the decoder's share by steps.
        variants = a.sample_variants == "on" or (a.sample_variants == "auto" and b.cuda)
        other = None if amp is not None else torch.bfloat16
        alt = "fp32" if other is None else "bf16"
        paths: dict[tuple[torch.dtype | None, bool], tuple[SamplingPath, float]] = {}
        sample = functools.partial(bench_sample, b, dit, decoder, flops, paths)
        for bs in a.sample_batches:
            b.measure(f"sample_b{bs}", functools.partial(sample, bs, amp))
            if variants:
                b.measure(f"sample_b{bs}_{alt}", functools.partial(sample, bs, other))
                b.measure(f"sample_b{bs}_compiled", functools.partial(sample, bs, amp, True))
        b.measure("decoder_flops", lambda: bench_decoder_flops(b, dit, decoder))
        big = max(a.sample_batches)
        steps = functools.partial(bench_steps, b, dit, decoder, big, amp, cache=paths)
        b.measure("decoder_share_by_steps", functools.partial(steps, False))
        if variants:
            b.measure("decoder_share_by_steps_compiled", functools.partial(steps, True))
        paths.clear()  # the compiled copies: free their memory before what comes next
        b.measure("ema", lambda: bench_ema(b, dit))
        b.measure("checkpoint", lambda: bench_checkpoint(b, dit))
        if a.compile:  # last: it compiles the shared DiT's blocks in place
            b.measure("train_compiled", lambda: bench_train(b, dit, flops, compiled=True))
        errors = [k for k, v in report["measurements"].items() if "error" in v]
        skipped = [k for k, v in report["measurements"].items() if "skipped" in v]
        report["status"] = (
            f"errors in {errors}" if errors else f"partial: time budget, skipped {skipped}"
            if skipped else "complete"
        )  # fmt: skip
    except Terminated:
        report["status"] = "terminated by SIGTERM (partial)"
    except Exception as e:  # the model itself did not build: still leave a JSON behind
        report["status"] = "failed"
        report["error"] = f"{type(e).__name__}: {str(e)[:600]}"
        report["traceback"] = traceback.format_exc()[-2000:]
    b.write()
    print(summary_line(report, Path(a.out)), flush=True)
    # Skips for the time budget are the design working; errors and SIGTERM are not.
    status = report["status"]
    return 0 if status == "complete" or status.startswith("partial: time budget") else 1


if __name__ == "__main__":
    raise SystemExit(main())
