"""The ``svg-ray`` command: one entry point, a subcommand per job."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import sys
from pathlib import Path

COMMANDS: dict[str, str] = {
    # subcommand -> the module whose main(argv) runs it, in pipeline order
    "demo": "pipelines.demo",
    "train-ae": "pipelines.train_autoencoder",
    "precompute": "pipelines.precompute",
    "train": "pipelines.train_diffusion",
    "eval": "pipelines.evaluate",
    "serve": "serve.app",
    "import": "pipelines.import_checkpoint",
    "promote": "pipelines.promote",
    "status": "svg_ray.status",
}


def describe(module: str) -> str:
    """A command's one-line help: its module docstring's first line, read without importing
    the module (torch and Ray take seconds to import; ``svg-ray --help`` should not)."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        return ""
    doc = ast.get_docstring(ast.parse(Path(spec.origin).read_text())) or ""
    return doc.splitlines()[0].rstrip(".").replace("``", "") if doc else ""


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
        lines = [f"  {c.ljust(width)}  {describe(m)}" for c, m in COMMANDS.items()]
        print(
            "usage: svg-ray <command> [options]   (svg-ray --version)\n\ncommands:\n"
            + "\n".join(lines)
        )
        if argv and argv[0] not in {"-h", "--help"}:
            print(f"\nerror: unknown command {argv[0]!r}", file=sys.stderr)
            return 2
        return 0
    module = COMMANDS[argv[0]]
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
