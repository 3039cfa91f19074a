"""The one command-line layer: flags from the config dataclasses, --config, --recipe, --help."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest

from svg_ray.cli import main as cli_main
from svg_ray.command import Command, Section
from svg_ray.config import ConfigError, require


@dataclass
class _Job:
    """A job's settings."""

    data: str
    """Where the data is."""
    steps: int = 10
    """Steps to run."""
    mode: Literal["fast", "exact"] = "fast"
    """How to run."""
    flip: bool = False
    """Flip the images."""

    def __post_init__(self) -> None:
        require(self.steps >= 1, "job.steps must be >= 1")


@dataclass
class _Run:
    """Where it runs."""

    name: str = "run"
    """Run name."""
    workers: int = 1
    """Workers."""


def _command() -> Command:
    return Command(
        "svg-ray job",
        "Run the job.\n\nMore words.",
        [
            Section("job", _Job, aliases={"input": "data"}),
            Section("run", _Run, group="run", defaults={"name": "job-run"}),
        ],
    )


def test_flags_file_and_defaults_resolve_in_order(tmp_path: Path) -> None:
    cfg = tmp_path / "job.yaml"
    cfg.write_text("job:\n  data: /d\n  steps: 5\nrun:\n  workers: 4\n")
    out = _command().parse(["--config", str(cfg), "--steps", "7", "--flip"])
    assert out["job"] == _Job(data="/d", steps=7, mode="fast", flip=True)  # flag beats file
    assert out["run"] == _Run(name="job-run", workers=4)  # the command's own default name
    js = tmp_path / "job.json"
    js.write_text(json.dumps({"job": {"data": "/j", "mode": "exact"}}))
    assert _command().parse(["--config", str(js)])["job"].mode == "exact"


def test_mistakes_are_one_line_config_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cmd = _command()
    with pytest.raises(ConfigError, match=r"^--data is required \(or job.data in --config\)$"):
        cmd.parse([])
    bad = tmp_path / "bad.yaml"
    for text, message in [
        ("jbo: {}\n", r"unknown section\(s\) \['jbo'\]"),
        ("job:\n  data: x\n  stpes: 3\n", r"job: unknown key\(s\) \['stpes'\]"),
        ("job:\n  data: x\n  steps: many\n", r"job.steps: expected an integer"),
        ("job: [1, 2]\n", "section 'job' must be a mapping"),
        ("job: {data: x\n", "not valid YAML/JSON"),
    ]:
        bad.write_text(text)
        with pytest.raises(ConfigError, match=message) as e:
            cmd.parse(["--config", str(bad)])
        assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="--config: file not found"):
        cmd.parse(["--config", str(tmp_path / "missing.yaml"), "--data", "x"])
    with pytest.raises(ConfigError, match=r"job\.steps must be >= 1"):
        cmd.parse(["--data", "x", "--steps", "0"])
    with pytest.raises(SystemExit):  # argparse's own: a value outside the choices
        cmd.parse(["--data", "x", "--mode", "slow"])
    assert "invalid choice: 'slow'" in capsys.readouterr().err


def test_help_shows_choices_defaults_and_required_flags(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        _command().parse(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--data DATA Where the data is. (required)" in text
    assert "--mode {fast,exact} How to run. (default: 'fast')" in text
    assert "--name NAME Run name. (default: 'job-run')" in text
    assert "--config CONFIG YAML or JSON file of settings, one mapping per section" in text
    assert "--input" not in text  # deprecated aliases work but are not advertised


def test_deprecated_alias_still_works_with_a_warning(capsys: pytest.CaptureFixture[str]) -> None:
    assert _command().parse(["--input", "/old"])["job"].data == "/old"
    assert "--input is deprecated, use --data" in capsys.readouterr().err


def test_recipe_sits_between_defaults_and_explicit_settings(tmp_path: Path) -> None:
    from pipelines.train_diffusion import COMMAND

    base = COMMAND.parse(["--data", "x"])["train"]
    paper = COMMAND.parse(["--data", "x", "--recipe", "paper"])["train"]
    assert (base.precision, paper.precision) == ("auto", "fp32")
    cfg = tmp_path / "t.yaml"
    cfg.write_text("train:\n  precision: bf16\n")
    assert (
        COMMAND.parse(["--data", "x", "--recipe", "paper", "--config", str(cfg)])["train"].precision
        == "bf16"
    )
    flagged = COMMAND.parse(["--data", "x", "--recipe", "paper", "--precision", "auto"])
    assert flagged["train"].precision == "auto"


def test_every_job_takes_a_config_file_and_the_cli_has_a_version(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from importlib.metadata import version

    assert cli_main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"svg-ray {version('svg-ray')}"
    for command in ("train", "train-ae", "precompute", "import", "demo"):
        with pytest.raises(SystemExit):
            cli_main([command, "--help"])
        assert "--config CONFIG" in capsys.readouterr().out, command
    with pytest.raises(SystemExit):
        cli_main(["eval", "generation", "--help"])
    assert "--recipe {default,paper,paper-nocfg}" in capsys.readouterr().out
