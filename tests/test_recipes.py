"""Recipes: plain data that builds valid job settings; 'default' is our defaults; what 'paper'
changes is exactly what docs/reference-differences.md says. Also the eval's random labels."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from svg_ray.config import ConfigError, from_dict
from svg_ray.data.precompute import PrecomputeConfig
from svg_ray.evaluation.config import GenerationEval
from svg_ray.evaluation.stages import generation_labels
from svg_ray.flow.samplers import SamplerConfig
from svg_ray.losses import AELossConfig
from svg_ray.recipes import JOBS, RECIPES, apply_recipe, recipe, recipe_changes
from svg_ray.training.autoencoder import AETrainConfig
from svg_ray.training.diffusion import DiffusionTrainConfig

DOC = Path(__file__).resolve().parents[1] / "docs" / "reference-differences.md"

# job -> (settings class, flag prefix, required values)
CLASSES: dict[str, list[tuple[type, str, dict[str, Any]]]] = {
    "train-ae": [(AETrainConfig, "", {"input": "imgs"}), (AELossConfig, "", {})],
    "precompute": [(PrecomputeConfig, "", {"input": "i", "out": "o", "autoencoder": "a"})],
    "train": [(DiffusionTrainConfig, "", {"data": "latents"})],
    "eval-generation": [
        (GenerationEval, "", {"bundle": "b", "reference": "r.npz"}),
        (SamplerConfig, "sampler_", {}),
    ],
}


@pytest.mark.parametrize("name", sorted(RECIPES))
@pytest.mark.parametrize("job", JOBS)
def test_every_recipe_value_builds_a_valid_setting(name: str, job: str) -> None:
    used: set[str] = set()
    for cls, prefix, required in CLASSES[job]:
        values = apply_recipe(name, job, cls, prefix)
        from_dict(cls, {**required, **values})  # types and ranges checked by the dataclass
        used |= {prefix + k for k in values}
    assert used == set(recipe(name, job)), "a recipe key belongs to none of the job's settings"


@pytest.mark.parametrize("job", JOBS)
def test_default_recipe_states_our_defaults(job: str) -> None:
    for cls, prefix, _ in CLASSES[job]:
        defaults = {f.name: f.default for f in dataclasses.fields(cls)}
        for k, v in apply_recipe("default", job, cls, prefix).items():
            assert defaults[k] == v, (job, k, defaults[k], v)


def test_paper_changes_exactly_these_defaults() -> None:
    changes = {job: recipe_changes("paper", job) for job in JOBS}
    assert changes == {
        "train-ae": {},
        "precompute": {"flip": (False, True)},
        "train": {"precision": ("auto", "fp32")},
        "eval-generation": {
            "label_mode": ("cycle", "random"),
            "sampler_cfg_mode": ("constant", "cfg_star-1-0"),
            "sampler_cfg_scale": (1.0, 1.5),
        },
    }
    sampler = SamplerConfig(**apply_recipe("paper", "eval-generation", SamplerConfig, "sampler_"))
    assert (sampler.steps, sampler.kind, sampler.time_shift) == (25, "euler", 0.15)
    nocfg = apply_recipe("paper-nocfg", "eval-generation", SamplerConfig, "sampler_")
    assert (nocfg["cfg_scale"], nocfg["cfg_mode"]) == (1.0, "constant")
    gen = apply_recipe("paper", "eval-generation", GenerationEval)
    assert gen == {"num_images": 50_000, "label_mode": "random", "seed": 0}


def test_the_differences_table_names_what_the_recipe_changes() -> None:
    text = DOC.read_text()
    for job in JOBS:
        for key in recipe_changes("paper", job):
            flag = "--" + key.replace("_", "-")
            assert flag in text, f"{DOC.name} does not mention {flag} ({job})"


def test_unknown_names_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="--recipe must be one of"):
        recipe("papr", "train")
    with pytest.raises(ConfigError, match="job must be one of"):
        recipe("paper", "serve")
    before = recipe("paper", "train")
    before["steps"] = 1  # a copy: the stored recipe is not changed
    assert recipe("paper", "train")["steps"] == 400_000


def test_random_labels_are_fixed_by_seed_and_index() -> None:
    idx = np.arange(5000)
    labels = generation_labels(idx, 10, "random", seed=3)
    assert labels.min() == 0 and labels.max() == 9
    assert np.bincount(labels, minlength=10).min() > 400  # uniform-ish, not cycling
    assert not np.array_equal(labels[:10], np.arange(10))
    # Any chunking (or worker) gives each image the same label.
    chunks = [generation_labels(idx[s : s + 64], 10, "random", seed=3) for s in range(0, 5000, 64)]
    np.testing.assert_array_equal(np.concatenate(chunks), labels)
    assert not np.array_equal(generation_labels(idx, 10, "random", seed=4), labels)
    np.testing.assert_array_equal(generation_labels(idx, 10, "cycle", seed=3), idx % 10)
    with pytest.raises(ConfigError, match="label_mode"):
        GenerationEval(bundle="b", reference="r.npz", label_mode="shuffled")  # type: ignore[arg-type]
