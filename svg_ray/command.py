"""One command-line layer for every job: flags from the config dataclasses, ``--config FILE``.

A job is a list of ``Section``s, each a settings dataclass (``train``, ``run``, ``loss``, ...).
Every field becomes a ``--flag`` whose help is the field's docstring, with its default, its
choices (``Literal`` fields) and ``(required)`` where it has none. ``--config FILE`` (YAML or JSON,
one mapping per section, strict) sets values, flags override the file, and both go through the
same ``from_dict`` checks, so a typo in either fails with one line naming the key. The resolution
order is: the dataclass default < the job's own default < ``--recipe`` < ``--config`` < flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import sys
import typing
from dataclasses import dataclass, field
from typing import Any, get_args, get_origin, get_type_hints

from svg_ray.config import ConfigError, field_docs, from_dict

MISSING = object()


@dataclass
class Section:
    """One settings dataclass of a command."""

    name: str
    """Key of this section in a --config file and prefix of its error messages."""
    cls: type
    """The dataclass."""
    defaults: dict[str, Any] = field(default_factory=dict)
    """This command's own defaults for some fields (e.g. its run name)."""
    prefix: str = ""
    """Flag prefix (``sampler_`` gives ``--sampler-steps``)."""
    group: str | None = None
    """Title of the --help group (None: the command's main options)."""
    aliases: dict[str, str] = field(default_factory=dict)
    """Deprecated flag (without dashes) -> field: still accepted, with a warning."""

    def flag(self, name: str) -> str:
        """The flag of field ``name``."""
        return "--" + (self.prefix + name).replace("_", "-")

    def dest(self, name: str) -> str:
        """The argparse destination of field ``name``."""
        return f"{self.name}:{name}"


def _help(text: str, default: Any, required: bool) -> str:
    # argparse %-formats help text: a literal % in a docstring must not break --help.
    tail = "(required)" if required else f"(default: {default!r})"
    return f"{text} {tail}".strip().replace("%", "%%")


def add_section(parser: argparse.ArgumentParser, section: Section) -> None:
    """Add one flag per field of ``section.cls`` (values are checked later, by ``from_dict``)."""
    target: Any = parser.add_argument_group(section.group) if section.group else parser
    docs = field_docs(section.cls)
    hints = get_type_hints(section.cls)
    own = inspect.get_annotations(section.cls)
    # The job's own settings first, then the ones it shares with other jobs.
    fields = sorted(dataclasses.fields(section.cls), key=lambda f: f.name not in own)
    for f in fields:
        tp = hints[f.name]
        default = section.defaults.get(f.name, MISSING)
        if default is MISSING and f.default is not dataclasses.MISSING:
            default = f.default
        elif default is MISSING and f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        # Only flags the user types land in the namespace: defaults stay the dataclass's.
        kw: dict[str, Any] = {
            "dest": section.dest(f.name),
            "metavar": f.name.upper(),
            "default": argparse.SUPPRESS,
            "help": _help(docs.get(f.name, ""), default, default is MISSING),
        }
        choices = _choices(tp)
        if tp is bool:
            kw["action"] = argparse.BooleanOptionalAction
            del kw["metavar"]
        elif get_origin(tp) in (tuple, list):
            kw.update(nargs="+", type=_scalar)
        elif choices:
            kw.update(choices=choices, metavar="{" + ",".join(map(str, choices)) + "}")
        elif tp is str:
            kw["type"] = str
        elif str in get_args(tp):  # optional string: only none/null mean "unset"
            kw["type"] = _optional_str
        else:
            kw["type"] = _scalar
        target.add_argument(section.flag(f.name), **kw)
    for old, name in section.aliases.items():
        target.add_argument(
            "--" + old.replace("_", "-"),
            dest=f"alias:{section.name}:{name}:{old}",
            default=argparse.SUPPRESS,
            help=argparse.SUPPRESS,
        )


def _choices(tp: Any) -> list[Any] | None:
    """The values of a ``Literal`` annotation (also inside ``Optional``), else None."""
    if get_origin(tp) is typing.Literal:
        return list(get_args(tp))
    return None


def _optional_str(text: str) -> str | None:
    """'none'/'null' -> None, anything else stays a string."""
    return None if text.lower() in {"none", "null"} else text


def _scalar(text: str) -> Any:
    """Parse a command-line value: int, float, null/none, or the string itself."""
    low = text.lower()
    if low in {"none", "null"}:
        return None
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return text


def load_config_file(path: str) -> dict[str, Any]:
    """A --config file: YAML or JSON (by content), a mapping of section -> mapping."""
    import yaml

    from svg_ray import storage

    if not storage.exists(path):
        raise ConfigError(f"--config: file not found: {path}")
    text = storage.read_bytes(path).decode()
    try:
        data = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as e:
        raise ConfigError(f"--config: {path} is not valid YAML/JSON: {e}".splitlines()[0]) from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"--config: {path} must hold a mapping of sections, not {data!r}")
    return data


class Command:
    """A job's command line: its sections, --config, --help with choices and requirements."""

    def __init__(
        self, prog: str, doc: str, sections: list[Section], recipe_job: str | None = None
    ) -> None:
        """``recipe_job``: the job's name in ``svg_ray.recipes`` (adds ``--recipe``)."""
        self.prog, self.sections, self.recipe_job = prog, sections, recipe_job
        lines = doc.strip().splitlines()
        self.parser = argparse.ArgumentParser(
            prog=prog,
            description=lines[0],
            # Keep the examples' indentation: strip blank lines, not the first line's spaces.
            epilog="\n".join(lines[1:]).strip("\n").rstrip() or None,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        self.add_to(self.parser)

    def add_to(self, parser: argparse.ArgumentParser) -> None:
        """Add --config and every section's flags to ``parser`` (a subcommand's parser too)."""
        names = ", ".join(s.name for s in self.sections)
        parser.add_argument(
            "--config",
            default=None,
            help=f"YAML or JSON file of settings, one mapping per section ({names}); "
            "flags override it",
        )
        if self.recipe_job is not None:
            from svg_ray.recipes import RECIPES

            parser.add_argument(
                "--recipe",
                choices=sorted(RECIPES),
                default=None,
                help="named settings preset ('paper': the reference's); --config and flags "
                "override it (docs/reference-differences.md lists what each sets)",
            )
        for s in self.sections:
            add_section(parser, s)

    def parse(self, argv: list[str] | None) -> dict[str, Any]:
        """Section name -> its dataclass instance, from defaults, --config and flags."""
        return self.build(vars(self.parser.parse_args(argv)))

    def build(self, args: dict[str, Any]) -> dict[str, Any]:
        """Build every section from a parsed namespace (see ``parse``)."""
        file = load_config_file(args["config"]) if args.get("config") else {}
        known = {s.name for s in self.sections}
        unknown = sorted(set(file) - known)
        if unknown:
            raise ConfigError(
                f"--config: unknown section(s) {unknown}; this command has {sorted(known)}"
            )
        out: dict[str, Any] = {}
        for s in self.sections:
            values = {**s.defaults, **self._recipe(args.get("recipe"), s)}
            values.update(self._file_section(file, s.name))
            for key, value in args.items():
                if key.startswith(f"alias:{s.name}:"):
                    _, _, name, old = key.split(":")
                    print(
                        f"{self.prog}: warning: --{old.replace('_', '-')} is deprecated, "
                        f"use {s.flag(name)}",
                        file=sys.stderr,
                    )
                    values[name] = value
            prefix = f"{s.name}:"
            values.update({k[len(prefix) :]: v for k, v in args.items() if k.startswith(prefix)})
            self._check_required(s, values)
            out[s.name] = from_dict(s.cls, values, s.name)
        return out

    def _recipe(self, name: str | None, s: Section) -> dict[str, Any]:
        """The fields of section ``s`` that recipe ``name`` sets for this command's job."""
        if not name or self.recipe_job is None:
            return {}
        from svg_ray.recipes import apply_recipe

        return apply_recipe(name, self.recipe_job, s.cls, s.prefix)

    @staticmethod
    def _file_section(file: dict[str, Any], name: str) -> dict[str, Any]:
        value = file.get(name, {})
        if not isinstance(value, dict):
            raise ConfigError(f"--config: section {name!r} must be a mapping, got {value!r}")
        return value

    @staticmethod
    def _check_required(s: Section, values: dict[str, Any]) -> None:
        for f in dataclasses.fields(s.cls):
            no_default = f.default is dataclasses.MISSING and (
                f.default_factory is dataclasses.MISSING
            )
            if no_default and f.name not in values:
                raise ConfigError(
                    f"{s.flag(f.name)} is required (or {s.name}.{f.name} in --config)"
                )
