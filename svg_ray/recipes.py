"""Named settings presets: the paper's recipe, and our defaults for comparison, as plain data.

A recipe maps a job to ``{flag destination: value}``, the field names of the job's settings
dataclasses (the generation eval's sampler settings carry the ``sampler_`` prefix its flags
have). ``apply_recipe`` picks the values of one dataclass; ``svg-ray <job> --recipe NAME`` uses
them as the job's defaults, and ``--config`` and explicit flags still win.

``paper`` reproduces the reference (github.com/shiml20/SVG) and the paper's Table 1 setup:
stage-1 as main_svg_autoencoder.py trains it, the DiT in fp32 with TF32 (no bf16 autocast) on
flipped and unflipped latents, and the FID script's sampling (25 Euler steps, shift 0.15, CFG 1.5
in mode cfg_star-1-0, random labels, 50,000 images). ``paper-nocfg`` is Table 1's "w/o CFG"
column: constant mode at w = 1 (cfg_star-1-0 would zero the first step even there).
``default`` states our defaults for the same settings; docs/reference-differences.md lists every
difference and why.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

from svg_ray.config import ConfigError

JOBS = ("train-ae", "precompute", "train", "eval-generation")
"""Jobs a recipe can set: stage-1 training, latent precompute, DiT training, generation eval."""

_PAPER: dict[str, dict[str, Any]] = {
    "train-ae": {
        # autoencoder/configs/example_svg_autoencoder_vitsp.yaml, DinoDecoder, the loss
        "preset": "svg",
        "steps": 100_000,  # 40 epochs of ImageNet at 512 (the release is epoch 40)
        "global_batch": 512,
        "lr": 1e-4,
        "disc_lr": 1e-4,
        "beta1": 0.5,
        "beta2": 0.9,
        "grad_clip": 0.0,
        "precision": "fp32",
        "crop": "random",
        "l1_weight": 1.0,
        "perceptual_weight": 1.0,
        "gan_weight": 0.5,
        "gan_start_step": 2501,  # disc_start 5001 Lightning steps, two per iteration
        "reduction": "sum",
        "max_gan_weight": 1e4,
        "disc_layers": 3,
        "disc_ndf": 64,
    },
    "precompute": {
        "flip": True,  # train_svg.py's RandomHorizontalFlip, from a stored flipped latent
    },
    "train": {
        # config/example_svg_xl.yaml, train_svg.py
        "model": "SVG-XL",
        "steps": 400_000,  # 80 epochs at 256: Table 1's first SVG-XL row
        "global_batch": 256,
        "lr": 1e-4,
        "beta1": 0.9,
        "beta2": 0.999,
        "weight_decay": 0.0,
        "grad_clip": 0.0,
        "ema_decay": 0.9999,
        "class_dropout": 0.1,
        "time_shift": 0.4,
        "use_flip": True,
        "precision": "fp32",  # TF32 matmuls on GPU, no autocast
    },
    "eval-generation": {
        # the reference's FID sampling script
        "num_images": 50_000,
        "label_mode": "random",
        "seed": 0,
        "sampler_steps": 25,
        "sampler_kind": "euler",
        "sampler_time_shift": 0.15,
        "sampler_cfg_scale": 1.5,
        "sampler_cfg_mode": "cfg_star-1-0",
    },
}

_DEFAULT: dict[str, dict[str, Any]] = {
    "train-ae": {**_PAPER["train-ae"]},  # stage 1 defaults are the reference's
    "precompute": {"flip": False},  # half the storage; turn on with --flip
    "train": {**_PAPER["train"], "precision": "auto"},  # bf16 autocast on GPU
    "eval-generation": {
        **_PAPER["eval-generation"],
        "label_mode": "cycle",  # every class equally often
        "sampler_cfg_scale": 1.0,
        "sampler_cfg_mode": "constant",
    },
}

RECIPES: dict[str, dict[str, dict[str, Any]]] = {
    "paper": _PAPER,
    "paper-nocfg": {
        **_PAPER,
        "eval-generation": {
            **_PAPER["eval-generation"],
            "sampler_cfg_scale": 1.0,
            "sampler_cfg_mode": "constant",
        },
    },
    "default": _DEFAULT,
}
"""recipe name -> job -> {flag destination: value}."""


def recipe(name: str, job: str) -> dict[str, Any]:
    """A copy of ``{flag destination: value}`` for ``job`` in recipe ``name`` (may be empty)."""
    if name not in RECIPES:
        raise ConfigError(f"--recipe must be one of {sorted(RECIPES)}, got {name!r}")
    if job not in JOBS:
        raise ConfigError(f"recipe job must be one of {list(JOBS)}, got {job!r}")
    return copy.deepcopy(RECIPES[name].get(job, {}))


def apply_recipe(name: str, job: str, cls: type, prefix: str = "") -> dict[str, Any]:
    """{field: value} of dataclass ``cls`` that recipe ``name`` sets for ``job``; ``prefix`` as
    in ``add_arguments`` (e.g. 'sampler_' for the generation eval's SamplerConfig)."""
    fields = {f.name for f in dataclasses.fields(cls)}
    return {
        k[len(prefix) :]: v
        for k, v in recipe(name, job).items()
        if k.startswith(prefix) and k[len(prefix) :] in fields
    }


def recipe_changes(name: str, job: str, base: str = "default") -> dict[str, tuple[Any, Any]]:
    """{flag destination: (value in ``base``, value in ``name``)} where the two recipes differ."""
    a, b = recipe(base, job), recipe(name, job)
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}
