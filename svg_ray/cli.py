"""The ``svg-ray`` command: one entry point, a subcommand per job."""

from __future__ import annotations

import importlib
import sys

# subcommand -> (module with main(argv), one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("svg_ray.demo", "in-process demo: both stages on the digits, writes a sample grid"),
}


def main(argv: list[str] | None = None) -> int:
    """Dispatch ``svg-ray <command> [args]``; errors print a message, not a traceback."""
    from svg_ray.config import ConfigError
    from svg_ray.weights import AssetError

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help"} or argv[0] not in COMMANDS:
        width = max(len(c) for c in COMMANDS)
        lines = [f"  {c.ljust(width)}  {h}" for c, (_, h) in COMMANDS.items()]
        print("usage: svg-ray <command> [options]\n\ncommands:\n" + "\n".join(lines))
        if argv and argv[0] not in {"-h", "--help"}:
            print(f"\nerror: unknown command {argv[0]!r}", file=sys.stderr)
            return 2
        return 0
    module, _ = COMMANDS[argv[0]]
    try:
        return int(importlib.import_module(module).main(argv[1:]) or 0)
    except (ConfigError, AssetError) as e:
        print(f"svg-ray {argv[0]}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
