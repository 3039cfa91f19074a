"""``make bench``: run every benchmark in this folder and merge their JSON into one summary.

The GPU benchmark (``benchmarks/gpu.py``) runs only when named: ``--only gpu``. The quality
benchmark judges the demo's model and is skipped (not failed) when there is none yet.

Each benchmark measures a ratio against a baseline in the same run (the machine is noisy) and
writes ``outputs/bench/<name>.json``; this writes ``outputs/bench/summary.json`` with all of them
and the machine description, and prints each benchmark's one-line summary.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import machine, write_json

BENCHMARKS = ["precompute", "train", "speed", "serve", "sampler", "data_order", "quality"]
# Run only when named (--only gpu): it needs a CUDA device.
GPU_BENCHMARKS = ["gpu"]
SKIPPED = 3
"""A benchmark's exit code for "nothing to measure here" (e.g. quality without a demo bundle)."""


def main(argv: list[str] | None = None) -> int:
    """Run the selected benchmarks in turn (each in its own process) and merge the results."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.run_all", description=__doc__)
    p.add_argument("--only", nargs="*", default=BENCHMARKS, choices=BENCHMARKS + GPU_BENCHMARKS)
    p.add_argument("--out-dir", default="outputs/bench")
    a = p.parse_args(argv)
    out = Path(a.out_dir)
    summary: dict[str, object] = {"machine": machine(), "benchmarks": {}}
    failed = []
    for name in a.only:
        target = out / f"{name}.json"
        t0 = time.perf_counter()
        cmd = [sys.executable, "-m", f"benchmarks.{name}", "--out", str(target)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = proc.stdout.strip().splitlines()
        print(f"[bench] {name}: {lines[-1] if lines else '(no output)'}", flush=True)
        if proc.returncode == SKIPPED:
            continue
        if proc.returncode != 0 or not target.exists():
            failed.append(name)
            print(proc.stderr[-3000:], file=sys.stderr)
            continue
        result = json.loads(target.read_text())
        result["wall_s"] = round(time.perf_counter() - t0, 1)
        summary["benchmarks"][name] = result  # type: ignore[index]
    path = write_json(out / "summary.json", summary)
    print(f"[bench] summary: {path}" + (f"; FAILED: {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
