"""Import the SVG paper's released checkpoints as our model files (no Ray needed).

    svg-ray import --autoencoder svg_autoencoder_dinov3s16p_vit-s_epoch40.ckpt \\
        --dit V1-SVG-XL-7000K-256x256.pt --latent-stats dinov3_sp_stats.pt --out outputs/svg-release
    svg-ray serve --bundle outputs/svg-release

With both models it writes a sampler bundle; with one, that model's safetensors file. Every
released tensor must map onto our modules (or be a listed training-only tensor), else it fails.
"""

from __future__ import annotations

import json
import sys

from svg_ray.command import Command, Section
from svg_ray.importer import ImportConfig, run_import

COMMAND = Command("svg-ray import", __doc__, [Section("import", ImportConfig)])


def main(argv: list[str] | None = None) -> int:
    """Parse flags, import, write; prints what was written and the next command."""
    cfg = COMMAND.parse(argv)["import"]
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
