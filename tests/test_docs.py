"""The documentation cannot go stale or point outside the repository.

docs/cli.md and the settings tables of docs/configuration.md are generated from the code by
scripts/cli_reference.py (`make docs`); these tests render them again in process (no subprocess,
no Ray) and compare with the committed text.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


@pytest.fixture(scope="module")
def gen() -> ModuleType:
    """scripts/cli_reference.py, loaded from its path (scripts/ is not a package)."""
    path = REPO / "scripts" / "cli_reference.py"
    spec = importlib.util.spec_from_file_location("cli_reference", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _same(path: Path, expected: str) -> None:
    actual = path.read_text()
    if actual != expected:
        diff = difflib.unified_diff(
            actual.splitlines(), expected.splitlines(), "committed", "generated", lineterm="", n=1
        )
        shown = "\n".join(list(diff)[:40])
        pytest.fail(f"{path.relative_to(REPO)} is out of date: run `make docs`\n{shown}")


def test_cli_reference_is_generated_from_the_parsers(gen: ModuleType) -> None:
    if sys.version_info[:2] != gen.PYTHON:  # argparse's layout changes between versions
        pytest.skip(f"docs/cli.md is rendered by Python {gen.PYTHON}'s argparse")
    _same(gen.CLI_DOC, gen.cli_markdown())


def test_settings_tables_are_generated_from_the_dataclasses(gen: ModuleType) -> None:
    text = gen.CONFIG_DOC.read_text()
    assert text.count(gen.BEGIN) == 1 and text.count(gen.END) == 1
    _same(gen.CONFIG_DOC, gen.with_tables(text, gen.config_tables()))


def test_cli_reference_covers_every_command_and_flag(gen: ModuleType) -> None:
    """Every command of `svg-ray` (and every eval task) has a section holding all its flags."""
    from svg_ray.cli import COMMANDS

    text = gen.CLI_DOC.read_text()
    sections = dict(re.findall(r"^##+ (svg-ray[^\n]*)\n\n```text\n(.*?)\n```", text, re.M | re.S))
    for name, module in COMMANDS.items():
        parser = gen.command_parser(importlib.import_module(module))
        parsers = {f"svg-ray {name}": parser}
        parsers.update({f"svg-ray {name} {s}": p for s, p in gen.subcommands(parser).items()})
        for title, p in parsers.items():
            assert title in sections, f"docs/cli.md has no section for {title}"
            for action in p._actions:
                for flag in action.option_strings:
                    if action.help != "==SUPPRESS==":  # deprecated aliases stay out of --help
                        assert flag in sections[title], f"{title}: {flag} is not documented"


def test_help_text_does_not_depend_on_the_terminal(
    gen: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "40")
    narrow = gen.cli_markdown()
    monkeypatch.setenv("COLUMNS", "250")
    assert gen.cli_markdown() == narrow
    assert os.environ["COLUMNS"] == "250"  # given back as it was
    monkeypatch.delenv("COLUMNS")
    assert gen.cli_markdown() == narrow
    assert "COLUMNS" not in os.environ


def test_settings_tables_show_types_defaults_and_requirements(gen: ModuleType) -> None:
    """Spot checks against values stated elsewhere (recipes, the paper): the table is real."""
    tables = gen.config_tables()
    assert '| `precision` | `--precision` | `auto\\|bf16\\|fp32` | `"auto"` |' in tables
    assert "| `input` | `--input` | `str` | required |" in tables  # PrecomputeConfig
    assert "| `run` | [RunSettings](#runsettings) |  | `name` = `'svg-ae'` |" in tables
    assert "`--sampler-cfg-mode`" in tables  # the sampler section's flag prefix


# A user has only the repository: every Markdown file that code, tests or docs name must be one
# of its own, and no relative path may climb out of it.
MD_NAME = re.compile(r"[\w./-]*\w\.md\b")
CLIMB = re.compile(r"(?:\.\./)+[\w.-]+")
TEXT_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".toml", ".txt", ".sh", ".cfg", ".ini", ".json"}
SKIP_DIRS = {"outputs", "build", "dist", "node_modules", "__pycache__"}


def _repo_text_files() -> list[Path]:
    out = []
    for path in REPO.rglob("*"):
        rel = path.relative_to(REPO)
        hidden = any(p.startswith(".") and p != ".ci" for p in rel.parts[:-1])
        if hidden or SKIP_DIRS & set(rel.parts) or any(p.endswith(".egg-info") for p in rel.parts):
            continue
        if path.is_file() and (
            path.suffix in TEXT_SUFFIXES or path.name in {"Makefile", "Dockerfile", "run"}
        ):
            out.append(path)
    return out


def _outside(path: Path, line: str, md_names: set[str]) -> list[str]:
    """What ``line`` of ``path`` names outside the repository."""
    found = [m for m in MD_NAME.findall(line) if Path(m).name not in md_names]
    for m in CLIMB.findall(line):
        dest = (path.parent / m).resolve()
        if not dest.is_relative_to(REPO.resolve()):
            found.append(m)
    return found


def test_nothing_points_outside_the_repository() -> None:
    files = _repo_text_files()
    md_names = {p.name for p in files if p.suffix == ".md"}
    found = []
    for path in files:
        if path == Path(__file__).resolve():  # its own examples below
            continue
        rel = str(path.relative_to(REPO))
        for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if names := _outside(path, line, md_names):
                found.append(f"{rel}:{n}: {names}")
    assert not found, "references to files outside the repository:\n" + "\n".join(found)


def test_the_outside_check_catches_what_it_is_for() -> None:
    md_names = {"README.md", "design.md"}
    here = REPO / "svg_ray" / "x.py"
    assert _outside(here, "see docs/design.md and README.md", md_names) == []
    assert _outside(here, "(notes.md Sec. 5)", md_names) == ["notes.md"]
    assert _outside(here, "../../elsewhere/guide", md_names) == ["../../elsewhere"]
    assert _outside(here, "../tests/conftest.py", md_names) == []


def _anchors(doc: Path) -> set[str]:
    """The heading anchors GitHub makes: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"```.*?```", "", doc.read_text(), flags=re.S)  # no headings in code blocks
    heads = re.findall(r"^#+ (.+)$", text, re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in heads}


def test_links_in_the_docs_point_at_files_and_headings_that_exist() -> None:
    broken = []
    for doc in DOCS:
        for target in re.findall(r"\]\(([^)\s]+)\)", doc.read_text()):
            if re.match(r"[a-z]+:", target):  # web links
                continue
            path, _, anchor = target.partition("#")
            dest = doc.parent / path if path else doc
            if not dest.exists() or (
                anchor and dest.suffix == ".md" and anchor not in _anchors(dest)
            ):
                broken.append(f"{doc.relative_to(REPO)} -> {target}")
    assert not broken, f"links to missing files or headings: {broken}"
