"""The ``svg-ray`` command: one entry point, a subcommand per job."""

from __future__ import annotations

import importlib
import sys

# subcommand -> (module with main(argv), one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": (
        "pipelines.demo",
        "the main job end to end on a local Ray: digits -> AE -> latents -> DiT -> grid -> Serve",
    ),
    "serve": (
        "serve.app",
        "local Ray Serve sampler endpoint + playground for a bundle or models:/",
    ),
    "precompute": ("pipelines.precompute", "Ray Data job: images -> latent Parquet + manifest"),
    "train": ("pipelines.train_diffusion", "Ray Train job: the diffusion transformer on latents"),
    "eval": (
        "pipelines.evaluate",
        "evaluation jobs: FID/IS of a bundle, autoencoder rFID/PSNR/SSIM/LPIPS, latent probe",
    ),
    "import": (
        "pipelines.import_checkpoint",
        "convert the SVG paper's released checkpoints into our model files or a sampler bundle",
    ),
    "status": ("svg_ray.status", "what datasets, runs, bundles and MLflow models exist"),
    "promote": ("pipelines.promote", "point a registry alias (e.g. prod) at a model version"),
    "train-ae": (
        "pipelines.train_autoencoder",
        "Ray Train job: the SVG autoencoder (residual + decoder)",
    ),
}


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "the input was wrong": printed as one line, never a traceback."""
    from svg_ray.errors import SvgRayError

    return (SvgRayError,)


def version() -> str:
    """The installed svg-ray version."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("svg-ray")
    except PackageNotFoundError:  # a checkout on PYTHONPATH, not installed
        return "0+unknown"


def main(argv: list[str] | None = None) -> int:
    """Dispatch ``svg-ray <command> [args]``; errors print a message, not a traceback."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--version"]:
        print(f"svg-ray {version()}")
        return 0
    if not argv or argv[0] in {"-h", "--help"} or argv[0] not in COMMANDS:
        width = max(len(c) for c in COMMANDS)
        lines = [f"  {c.ljust(width)}  {h}" for c, (_, h) in COMMANDS.items()]
        print(
            "usage: svg-ray <command> [options]   (svg-ray --version)\n\ncommands:\n"
            + "\n".join(lines)
        )
        if argv and argv[0] not in {"-h", "--help"}:
            print(f"\nerror: unknown command {argv[0]!r}", file=sys.stderr)
            return 2
        return 0
    module, _ = COMMANDS[argv[0]]
    try:
        return int(importlib.import_module(module).main(argv[1:]) or 0)
    except user_errors() as e:
        print(f"svg-ray {argv[0]}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM from `ray job stop` during training
        print(f"svg-ray {argv[0]}: stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
