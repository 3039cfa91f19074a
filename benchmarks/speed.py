"""Training speed-ups on this machine, each against its baseline in the same run: the compiled DiT
step vs eager, the foreach EMA vs a per-tensor loop, and the checkpoint stall with asynchronous
vs synchronous upload (to a local folder and to an S3 server on loopback).

    python -m benchmarks.speed [--model SVG-B-narrow] [--batch 32] [--threads 1] [--windows 5]
        [--window 4] [--ema-model SVG-XL] [--ema-rounds 5] [--ckpt-model SVG-B] [--ckpts 2]
        [--ckpt-gap-s 0] [--no-s3] [--out outputs/bench/speed.json]

1. ``step``: ``make_parts`` with ``compile='off'`` and ``'on'`` (the job's own code: the DiT's
   blocks compiled in place), the same random token batch ((B, 16, 200): the latents of
   ``benchmarks.train``) and labels, ``diffusion_step`` with the loop's per-step seed. The
   compiled model's first steps (the compile) are timed apart; then windows of ``--window``
   steps alternate between the two and the median seconds per step of each side are kept.
2. ``ema``: ``EMA.update`` (one ``_foreach_lerp_``) against the per-tensor loop it replaced, on
   a model with the parameter shapes of ``--ema-model`` (random values), alternating rounds,
   medians. On a CPU both are memory-bound; on a GPU the loop is ~450 kernel launches a step.
3. ``checkpoint``: a Ray Train run of 2 CPU workers whose rank 0 holds the state of a
   ``--ckpt-model`` run (DiT + EMA + AdamW moments: the checkpoint the job writes) and calls
   ``save_checkpoint`` ``--ckpts`` times synchronously and ``--ckpts`` times asynchronously,
   with ``--ckpt-gap-s`` seconds of "training" (sleep) between (0: the synchronous upload's own
   duration, so an asynchronous upload has finished before the next checkpoint, as it would at
   a real cadence). Stall = seconds from the call until the rank continues, per rank (rank 1
   waits at the report barrier). Storage: a local folder, then a SeaweedFS server on loopback
   (skipped with --no-s3 or when SeaweedFS is not installed).

The Ray Train overhead against a plain loop is ``benchmarks.train``. Writes JSON and prints a
one-line summary.
"""

from __future__ import annotations

from benchmarks.common import loop_ema_update, machine, set_env, write_json

set_env()  # before anything imports ray, mlflow or timm

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from contextlib import ExitStack  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402

from benchmarks.train import NARROW_B, register_sizes  # noqa: E402
from svg_ray.models.dit import DiT, count_params, dit_config  # noqa: E402
from svg_ray.models.ema import EMA  # noqa: E402
from svg_ray.testing.procs import start_local_ray  # noqa: E402
from svg_ray.training.common import step_seed  # noqa: E402
from svg_ray.training.diffusion import DiffusionTrainConfig, diffusion_step, make_parts  # noqa: E402

CPU = torch.device("cpu")
LATENT = (200, 4, 4)
"""Channels and grid of ``benchmarks.train``'s synthetic latents."""


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


# --------------------------------------------------------------------------------------------
# 1. Compiled vs eager step
# --------------------------------------------------------------------------------------------


def bench_step(model: str, batch: int, windows: int, window: int) -> dict[str, Any]:
    """Seconds per ``diffusion_step``, eager and compiled, in alternating windows."""
    c, g, _ = LATENT
    dcfg = dit_config(model, in_channels=c, grid=g, num_classes=10)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, g * g, c, generator=gen)  # (B, T, C)
    y = torch.randint(0, 10, (batch,), generator=gen)
    sides = {}
    for mode in ("off", "on"):
        cfg = DiffusionTrainConfig(data="synthetic", model=model, compile=mode)  # type: ignore[arg-type]
        sides[mode] = make_parts(cfg, dcfg, CPU)
    steps = {"off": 0, "on": 0}

    def run(mode: str, n: int) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            torch.manual_seed(step_seed(0, steps[mode], 0))
            diffusion_step(sides[mode], x, y)["loss"].item()
            steps[mode] += 1
        return time.perf_counter() - t0

    run("off", 1)  # allocator and thread-pool warm-up, as the compiled side gets below
    compile_s = run("on", 1)  # the forward and backward graphs are built on the first step
    first_after = run("on", 1)
    per_step: dict[str, list[float]] = {"off": [], "on": []}
    for _ in range(windows):
        for mode in ("off", "on"):
            per_step[mode].append(run(mode, window) / window)
    eager, compiled = _median(per_step["off"]), _median(per_step["on"])
    return {
        "model": model,
        "params_m": round(count_params(sides["off"].model) / 1e6, 2),
        "batch": batch,
        "tokens": [g * g, c],
        "eager_s_per_step": eager,
        "compiled_s_per_step": compiled,
        "speedup": eager / compiled,
        "compile_s": compile_s,
        "first_compiled_step_after_compile_s": first_after,
        "windows": per_step,
    }


# --------------------------------------------------------------------------------------------
# 2. EMA: foreach vs per-tensor loop
# --------------------------------------------------------------------------------------------


def random_model(size: str) -> DiT:
    """A DiT of ``size`` with random values (no init pass: faster at SVG-XL size)."""
    with torch.device("meta"):
        model = DiT(dit_config(size))
    model = model.to_empty(device=CPU)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            t.normal_(0, 0.02, generator=gen)
    return model


def bench_ema(size: str, rounds: int) -> dict[str, Any]:
    """Milliseconds per EMA update of a ``size`` DiT: loop vs foreach, alternating rounds."""
    model = random_model(size)
    ema = EMA(model, 0.9999)
    ema.update(model)  # warm-up of both paths (first touch of the EMA copy's pages)
    loop_ema_update(ema, model)
    times: dict[str, list[float]] = {"loop": [], "foreach": []}
    for _ in range(rounds):
        for name, fn in (("loop", loop_ema_update), ("foreach", EMA.update)):
            t0 = time.perf_counter()
            fn(ema, model)
            times[name].append((time.perf_counter() - t0) * 1e3)
    loop, foreach = _median(times["loop"]), _median(times["foreach"])
    return {
        "model": size,
        "params_m": round(count_params(model) / 1e6, 1),
        "tensors": len(list(model.parameters())),
        "loop_ms": loop,
        "foreach_ms": foreach,
        "speedup": loop / foreach,
        "rounds": times,
    }


# --------------------------------------------------------------------------------------------
# 3. Checkpoint stall: async vs sync upload
# --------------------------------------------------------------------------------------------


def checkpoint_state(size: str) -> dict[str, Any]:
    """What the diffusion job checkpoints for a ``size`` DiT: weights, EMA, AdamW moments."""
    torch.manual_seed(0)
    model = DiT(dit_config(size))
    ema = EMA(model, 0.9999)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()  # creates the moments (two tensors per parameter)
    return {"model": model.state_dict(), "ema": ema.model.state_dict(), "opt": opt.state_dict()}


def state_bytes(state: Any) -> int:
    """Bytes of the tensors in a (nested) checkpoint state."""
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(state_bytes(v) for v in state.values())
    return 0


def stall_loop(config: dict[str, Any]) -> None:
    """Ray Train loop: checkpoints in both modes; each rank writes its stalls to a JSON file."""
    import ray.train
    import torch.distributed as dist

    from svg_ray.training.common import save_checkpoint

    rank = ray.train.get_context().get_world_rank()
    state = checkpoint_state(config["size"]) if rank == 0 else {}
    out: dict[str, list[float]] = {"sync": [], "async": []}
    slowest_sync = 0.0  # the same on every rank (all-reduced): the gap keeps the ranks in step
    for i, mode in enumerate(["sync"] * config["ckpts"] + ["async"] * config["ckpts"]):
        dist.barrier()  # both ranks start the checkpoint together: the stall is its own
        stall = save_checkpoint(state, {"i": i}, upload_async=mode == "async")
        out[mode].append(stall)
        worst = torch.tensor([stall])
        dist.all_reduce(worst, op=dist.ReduceOp.MAX)
        if mode == "sync":
            slowest_sync = max(slowest_sync, float(worst))
        time.sleep(config["gap_s"] if config["gap_s"] > 0 else slowest_sync)
    sizes = {"bytes": state_bytes(state)}  # rank 0 holds the state: its size comes back with it
    Path(config["out"], f"rank{rank}.json").write_text(json.dumps({**out, **sizes}))


def bench_checkpoint(size: str, ckpts: int, gap_s: float, storage_path: str) -> dict[str, Any]:
    """Stall per checkpoint (s), sync vs async, for a run whose storage is ``storage_path``."""
    from svg_ray.training.common import RunSettings, fit

    with tempfile.TemporaryDirectory() as d:
        config = {"size": size, "ckpts": ckpts, "gap_s": gap_s, "out": d}
        run = RunSettings(
            name=f"stall-{int(time.time() * 1e3)}",
            storage_path=storage_path,
            num_workers=2,
            max_failures=0,
            keep_checkpoints=2,
        )
        t0 = time.perf_counter()
        fit(stall_loop, config, run, {})
        wall = time.perf_counter() - t0
        ranks = [json.loads(Path(d, f"rank{r}.json").read_text()) for r in range(2)]
    nbytes = sum(r.pop("bytes") for r in ranks)
    sync = max(_median(r["sync"]) for r in ranks)
    asyn = max(_median(r["async"]) for r in ranks)
    return {
        "storage": "s3" if storage_path.startswith("s3://") else "local",
        "checkpoint_gb": round(nbytes / 1e9, 3),
        "sync_stall_s": sync,
        "async_stall_s": asyn,
        "stall_ratio": asyn / sync,
        "per_rank": ranks,
        "run_wall_s": wall,
    }


def main(argv: list[str] | None = None) -> int:
    """Run the three measurements and write the JSON."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=NARROW_B, help="DiT size for the compiled-vs-eager step")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--windows", type=int, default=5, help="windows per side (step)")
    p.add_argument("--window", type=int, default=4, help="steps per window")
    p.add_argument("--ema-model", default="SVG-XL", help="DiT size of the EMA measurement")
    p.add_argument("--ema-rounds", type=int, default=5)
    p.add_argument("--ckpt-model", default="SVG-B", help="DiT size of the checkpoint")
    p.add_argument("--ckpts", type=int, default=2, help="checkpoints per mode")
    p.add_argument("--ckpt-gap-s", type=float, default=0.0)
    p.add_argument("--s3", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--out", default="outputs/bench/speed.json")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    register_sizes()
    report: dict[str, Any] = {"machine": machine(threads=a.threads), "args": vars(a)}
    out = Path(a.out)
    report["step"] = bench_step(a.model, a.batch, a.windows, a.window)
    write_json(out, report)
    report["ema"] = bench_ema(a.ema_model, a.ema_rounds)
    write_json(out, report)
    report["checkpoint"] = checkpoint_stalls(a)
    write_json(out, report)
    print(summary_line(report, out))
    return 0


def checkpoint_stalls(a: argparse.Namespace) -> list[dict[str, Any]]:
    """The stall measurement to a local folder and (unless --no-s3) to SeaweedFS on loopback."""
    import ray

    from svg_ray.testing.s3server import seaweedfs, weed_binary

    results = []
    with ExitStack() as stack, tempfile.TemporaryDirectory() as root:
        s3 = None
        if a.s3 and weed_binary() is not None:
            # Before Ray starts: its processes take the AWS variables the server exports.
            s3 = stack.enter_context(seaweedfs(Path(root, "s3"), "bench"))
        start_local_ray()
        stack.callback(ray.shutdown)
        results.append(bench_checkpoint(a.ckpt_model, a.ckpts, a.ckpt_gap_s, f"{root}/runs"))
        if s3 is not None:
            results.append(bench_checkpoint(a.ckpt_model, a.ckpts, a.ckpt_gap_s, s3.uri("runs")))
    return results


def summary_line(report: dict[str, Any], out: Path) -> str:
    """One line: the three ratios."""
    s, e = report["step"], report["ema"]
    parts = [
        f"compiled step {s['speedup']:.2f}x eager ({s['model']}, "
        f"{s['compiled_s_per_step'] * 1e3:.0f} vs {s['eager_s_per_step'] * 1e3:.0f} ms, "
        f"compile {s['compile_s']:.0f} s)",
        f"EMA foreach {e['speedup']:.2f}x loop ({e['model']}: {e['foreach_ms']:.0f} vs "
        f"{e['loop_ms']:.0f} ms)",
    ]
    for c in report["checkpoint"]:
        parts.append(
            f"checkpoint stall {c['storage']} {c['checkpoint_gb']:.2f} GB: async "
            f"{c['async_stall_s']:.2f} s vs sync {c['sync_stall_s']:.2f} s"
        )
    return "bench speed: " + "; ".join(parts) + f" -> {out}"


if __name__ == "__main__":
    sys.exit(main())
