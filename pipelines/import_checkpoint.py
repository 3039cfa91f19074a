"""Import the SVG paper's released checkpoints as our model files (no Ray needed).

    svg-ray import --autoencoder svg_autoencoder_dinov3s16p_vit-s_epoch40.ckpt \\
        --dit V1-SVG-XL-7000K-256x256.pt --latent-stats dinov3_sp_stats.pt --out outputs/svg-release
    svg-ray serve --bundle outputs/svg-release

With both models it writes a sampler bundle; with one, that model's safetensors file. Every
released tensor must map onto our modules (or be a listed training-only tensor), else it fails.
"""

from __future__ import annotations

import argparse
import json
import sys

from svg_ray.config import add_arguments, parse_arguments
from svg_ray.importer import ImportConfig, run_import


def main(argv: list[str] | None = None) -> int:
    """Parse flags, import, write; prints what was written and the next command."""
    p = argparse.ArgumentParser(prog="svg-ray import", description=__doc__.splitlines()[0])
    add_arguments(p, ImportConfig)
    cfg = parse_arguments(ImportConfig, vars(p.parse_args(argv)), "import")
    summary = run_import(cfg)
    for part in ("autoencoder", "dit"):
        if part in summary:
            print(f"[import] {part}: {json.dumps(summary[part])}")
    print(f"[import] wrote {', '.join(summary['written'])}")
    if summary["bundle"]:
        print(f"[import] next: svg-ray serve --bundle {summary['out']}")
    return 0


if __name__ == "__main__":
    from svg_ray.cli import main as cli_main

    sys.exit(cli_main(["import", *sys.argv[1:]]))
