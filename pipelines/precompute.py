"""Precompute SVG latents with Ray Data: an image folder or Parquet -> latent Parquet shards.

Locally (starts an in-process Ray cluster):
    svg-ray precompute --input data/train --out outputs/latents --autoencoder ae.safetensors
On a cluster (the job's driver connects to it through RAY_ADDRESS):
    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python -m pipelines.precompute --input s3://b/imagenet/train --out s3://b/latents \\
        --autoencoder s3://b/ae.safetensors --encode-gpus 1 --encoders 8 --flip
Rerunning the same command resumes a killed job; ``manifest.json`` appears when it is complete.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import itertools
import logging
import os
import sys
import typing
from typing import Any, get_args, get_origin, get_type_hints

from svg_ray.config import ConfigError, from_dict
from svg_ray.data.precompute import PrecomputeConfig, run_precompute
from svg_ray.errors import SvgRayError


def _field_docs(cls: type) -> dict[str, str]:
    """The docstring under each dataclass field, for --help."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for a, b in itertools.pairwise(body):
        if isinstance(a, ast.AnnAssign) and isinstance(a.target, ast.Name):
            if isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant):
                docs[a.target.id] = str(b.value.value)
    return docs


def parse_args(argv: list[str] | None) -> tuple[PrecomputeConfig, argparse.Namespace]:
    """CLI flags (one per PrecomputeConfig field, plus Ray connection flags) -> typed config."""
    p = argparse.ArgumentParser(prog="svg-ray precompute", description=__doc__.splitlines()[0])
    docs = _field_docs(PrecomputeConfig)
    hints = get_type_hints(PrecomputeConfig)
    for f in dataclasses.fields(PrecomputeConfig):
        flag = f"--{f.name.replace('_', '-')}"
        tp = hints[f.name]
        kw: dict[str, Any] = {"help": docs.get(f.name, ""), "dest": f.name}
        if f.default is dataclasses.MISSING:
            kw["required"] = True
        else:
            kw["default"] = f.default
            kw["help"] += " (default: %(default)s)"
        if tp is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif get_origin(tp) is typing.Literal:
            kw["choices"] = list(get_args(tp))
        else:
            kw["type"] = tp
        p.add_argument(flag, **kw)
    p.add_argument(
        "--ray-address",
        default=os.environ.get("RAY_ADDRESS", ""),
        help="Ray cluster to join (default: $RAY_ADDRESS, set by `ray job submit`; "
        "empty = start a local in-process cluster)",
    )
    p.add_argument(
        "--num-cpus",
        type=int,
        default=0,
        help="logical CPUs of the local cluster (default: max(4, cores); the three stages "
        "overlap, so oversubscribing a small machine keeps them all scheduled)",
    )
    args = p.parse_args(argv)
    fields = {f.name for f in dataclasses.fields(PrecomputeConfig)}
    cfg = from_dict(PrecomputeConfig, {k: v for k, v in vars(args).items() if k in fields})
    return cfg, args


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``svg-ray precompute`` / ``python -m pipelines.precompute``."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg, args = parse_args(argv)
    except ConfigError as e:
        print(f"svg-ray precompute: error: {e}", file=sys.stderr)
        return 2
    import ray

    started = False  # shut down only a cluster this call started, never a caller's

    def connect() -> None:
        nonlocal started
        started = True
        if args.ray_address:
            ray.init(address=args.ray_address)
        else:
            # address="local": never attach to a stale cluster file left by a killed head.
            ray.init(address="local", num_cpus=args.num_cpus or max(4, os.cpu_count() or 1))

    try:
        # A cluster we joined may autoscale; the local one we start cannot.
        result = run_precompute(cfg, connect, cluster_can_grow=bool(args.ray_address))
    except SvgRayError as e:  # storage errors too: one line under `python -m` as well
        print(f"svg-ray precompute: error: {e}", file=sys.stderr)
        return 2
    finally:
        if started and ray.is_initialized():
            ray.shutdown()
    print(result.summary_line(), flush=True)
    print(f"[precompute] next: svg-ray train --data {result.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
