"""Write docs/cli.md and the settings tables of docs/configuration.md from the code.

    python scripts/cli_reference.py            # what `make docs` runs
    python scripts/cli_reference.py --check    # exit 1 when a committed file is out of date

Every command's parser is built in process (nothing runs, Ray does not start) and its ``--help`` is
rendered at a fixed width, so the text does not depend on the terminal. The settings tables come
from the dataclasses themselves (type hints, defaults, the doc line under each field).
``tests/test_docs.py`` compares the committed files with this output, so they cannot go stale.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import io
import os
import sys
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python scripts/cli_reference.py` from a checkout
    sys.path.insert(0, str(REPO))

CLI_DOC = REPO / "docs" / "cli.md"
CONFIG_DOC = REPO / "docs" / "configuration.md"
WIDTH = 100
"""Terminal width the help text is rendered for."""
PYTHON = (3, 11)
"""The Python whose argparse renders docs/cli.md: its help layout differs between versions (the
project image and the build machine run 3.11)."""
BEGIN = "<!-- BEGIN generated settings tables (scripts/cli_reference.py; run `make docs`) -->"
END = "<!-- END generated settings tables -->"

NOT_COMMANDS: list[tuple[str, str, list[str]]] = [
    (
        "Serve config `args:` (`serve/config*.yaml`, `svg-ray serve`)",
        "The `args:` mapping of an application in a Serve config file; `svg-ray serve` flags "
        "override `model_uri` and `mlflow_tracking_uri`.",
        [
            "svg_ray.serving.config:AppArgs",
            "svg_ray.serving.config:ServerConfig",
            "svg_ray.serving.config:SamplerDefaults",
        ],
    ),
    (
        "Model architectures (stored in every checkpoint and bundle)",
        "Not flags: `train-ae --preset` and `train --model` pick them, and every checkpoint, "
        "autoencoder file and bundle stores the one it was built with.",
        [
            "svg_ray.models.autoencoder:AutoencoderConfig",
            "svg_ray.models.dino:DinoConfig",
            "svg_ray.models.residual:ResidualConfig",
            "svg_ray.models.decoder:DecoderConfig",
            "svg_ray.models.dit:DiTConfig",
        ],
    ),
]
"""Settings that are not command sections: (title, one line, ``module:Class`` list)."""


@contextlib.contextmanager
def fixed_width(columns: int = WIDTH) -> Iterator[None]:
    """argparse wraps help at the terminal's width (``COLUMNS``): pin it while rendering."""
    before = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = str(columns)
    try:
        yield
    finally:
        if before is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = before


def command_parser(module: Any) -> argparse.ArgumentParser:
    """The parser of a command module: its ``COMMAND`` (a ``svg_ray.command.Command``) or
    ``build_parser()``."""
    if hasattr(module, "COMMAND"):
        return typing.cast(argparse.ArgumentParser, module.COMMAND.parser)
    if hasattr(module, "build_parser"):
        return typing.cast(argparse.ArgumentParser, module.build_parser())
    raise TypeError(f"{module.__name__} has neither COMMAND nor build_parser()")


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """A parser's subcommand parsers by name (empty when it has none)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def top_level_help() -> str:
    """What ``svg-ray --help`` prints (the command list)."""
    from svg_ray import cli

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        cli.main(["--help"])
    return out.getvalue().rstrip()


def cli_markdown() -> str:
    """The whole of docs/cli.md."""
    from svg_ray import cli

    out = [
        "# Command-line reference",
        "",
        "Generated from the commands' own parsers by `scripts/cli_reference.py` (`make docs`);",
        "`tests/test_docs.py` fails when this file and the code disagree, so edit the code, not",
        "this file. Each command is also `python -m <module>` (what `ray job submit` runs).",
        f"Rendered by Python {PYTHON[0]}.{PYTHON[1]}'s argparse for {WIDTH}-column terminals.",
        "Settings files and defaults: [configuration.md](configuration.md).",
        "",
        "| command | module | what |",
        "|---|---|---|",
    ]
    for name, path in cli.COMMANDS.items():  # pipeline order
        out.append(
            f"| [`svg-ray {name}`](#svg-ray-{name}) | `{path}` | {_cell(cli.describe(path))} |"
        )
    out += ["", "## svg-ray", "", "```text", top_level_help(), "```"]
    with fixed_width():
        for name, path in cli.COMMANDS.items():
            parser = command_parser(importlib.import_module(path))
            out += ["", f"## svg-ray {name}", "", "```text", parser.format_help().rstrip(), "```"]
            for sub, sub_parser in subcommands(parser).items():
                out += [
                    "",
                    f"### svg-ray {name} {sub}",
                    "",
                    "```text",
                    sub_parser.format_help().rstrip(),
                    "```",
                ]
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------------------------
# Settings tables
# --------------------------------------------------------------------------------------------


def _cell(text: str) -> str:
    """Text for a markdown table cell: pipes escaped, RST double backticks as code, and angle
    brackets outside code as entities (``<root>`` would otherwise vanish as an HTML tag)."""
    parts = text.replace("``", "`").replace("|", "\\|").replace("\n", " ").split("`")
    for i in range(0, len(parts), 2):  # even parts lie outside code spans
        parts[i] = parts[i].replace("<", "&lt;").replace(">", "&gt;")
    return "`".join(parts)


def type_name(tp: Any) -> str:
    """A field's annotation as a reader writes it: ``auto|bf16|fp32``, ``str | None``, ..."""
    origin = get_origin(tp)
    if origin is typing.Literal:
        return "|".join(str(a) for a in get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in get_args(tp))
    if tp is type(None):
        return "None"
    if origin in (tuple, list):
        args = get_args(tp)
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            return f"list of {type_name(args[0])}"
        if origin is tuple:
            return "[" + ", ".join(type_name(a) for a in args) + "]"
        return f"list of {type_name(args[0])}" if args else "list"
    if origin is dict:
        return "mapping"
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def default_text(f: dataclasses.Field[Any], override: dict[str, Any]) -> str:
    """A field's default (a command's own default wins), as code; "required" when none."""
    if f.name in override:
        value = override[f.name]
    elif f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "required"
    if dataclasses.is_dataclass(value):
        return f"see {type(value).__name__}"
    if isinstance(value, tuple):
        value = list(value)
    if isinstance(value, str):
        return f'`"{value}"`'
    return f"`{value!r}`"


def field_table(cls: type, prefix: str | None = "", override: dict[str, Any] | None = None) -> str:
    """One row per field: name (and flag), type, default, its doc line."""
    from svg_ray.config import field_docs

    docs, hints = field_docs(cls), get_type_hints(cls)
    head = "| field | flag | type | default | meaning |" if prefix is not None else None
    rows = [head or "| field | type | default | meaning |"]
    rows.append("|---|---|---|---|---|" if prefix is not None else "|---|---|---|---|")
    for f in dataclasses.fields(cls):
        cells = [f"`{f.name}`"]
        if prefix is not None:
            cells.append(f"`--{(prefix + f.name).replace('_', '-')}`")
        cells += [
            f"`{_cell(type_name(hints[f.name]))}`",
            default_text(f, override or {}),
            _cell(docs.get(f.name, "")),
        ]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _class(spec: str) -> type:
    module, name = spec.split(":")
    return typing.cast(type, getattr(importlib.import_module(module), name))


def command_sections() -> list[tuple[str, list[Any]]]:
    """(command, its ``Section`` list) for every command built from settings dataclasses."""
    from svg_ray import cli

    out: list[tuple[str, list[Any]]] = []
    for name, path in cli.COMMANDS.items():
        module = importlib.import_module(path)
        if hasattr(module, "COMMAND"):
            out.append((name, module.COMMAND.sections))
        for sub, command in getattr(module, "COMMANDS", {}).items():
            out.append((f"{name} {sub}", command.sections))
    return out


def config_tables() -> str:
    """The generated part of docs/configuration.md (between BEGIN and END)."""
    commands = command_sections()
    out = [
        "### Sections of each command",
        "",
        "A `--config` file holds one mapping per section; the flag of a field is `--` + the flag",
        "prefix + its name with dashes. A command's own default (last column) replaces the",
        "dataclass's.",
        "",
        "| command | section | settings | flag prefix | command's own defaults |",
        "|---|---|---|---|---|",
    ]
    seen: dict[type, str] = {}
    for name, sections in commands:
        for s in sections:
            seen.setdefault(s.cls, s.prefix)
            own = ", ".join(f"`{k}` = `{v!r}`" for k, v in s.defaults.items())
            prefix = f"`{s.prefix}`" if s.prefix else ""
            out.append(
                f"| `svg-ray {name}` | `{s.name}` | [{s.cls.__name__}](#{s.cls.__name__.lower()}) "
                f"| {prefix} | {own} |"
            )
    for cls, prefix in seen.items():
        doc = (cls.__doc__ or "").strip().splitlines()[0]
        where = f"`{cls.__module__}.{cls.__name__}`"
        out += ["", f"### {cls.__name__}", "", f"{_cell(doc)} ({where})", ""]
        out.append(field_table(cls, prefix))
    for title, line, specs in NOT_COMMANDS:
        out += ["", f"### {title}", "", line]
        for spec in specs:
            cls = _class(spec)
            doc = (cls.__doc__ or "").strip().splitlines()[0]
            out += ["", f"#### {cls.__name__}", "", f"{_cell(doc)} (`{spec.replace(':', '.')}`)"]
            out += ["", field_table(cls, None)]
    return "\n".join(out)


def with_tables(doc: str, tables: str) -> str:
    """``doc`` with the text between its BEGIN and END markers replaced by ``tables``."""
    head, sep, rest = doc.partition(BEGIN)
    _, sep2, tail = rest.partition(END)
    if not (sep and sep2):
        raise RuntimeError(f"{CONFIG_DOC.name} must contain the markers {BEGIN!r} and {END!r}")
    return f"{head}{BEGIN}\n\n{tables}\n\n{END}{tail}"


def outputs() -> dict[Path, str]:
    """Every generated file and its full expected text."""
    return {
        CLI_DOC: cli_markdown(),
        CONFIG_DOC: with_tables(CONFIG_DOC.read_text(), config_tables()),
    }


def main(argv: list[str] | None = None) -> int:
    """Regenerate the files, or with --check report which ones are out of date."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="only compare; exit 1 when stale")
    a = p.parse_args(argv)
    if sys.version_info[:2] != PYTHON:
        print(
            f"docs/cli.md is rendered with Python {PYTHON[0]}.{PYTHON[1]}'s argparse; run this "
            f"with that Python (this is {sys.version_info[0]}.{sys.version_info[1]})"
        )
        return 2
    stale = []
    for path, text in outputs().items():
        if path.exists() and path.read_text() == text:
            continue
        stale.append(path.relative_to(REPO))
        if not a.check:
            path.write_text(text)
    verb = "out of date (run make docs)" if a.check else "written"
    for path in stale:
        print(f"{path}: {verb}")
    return 1 if a.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
