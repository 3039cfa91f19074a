"""The served sampler's speed settings: ``server.precision`` (bf16 autocast) and ``server.compile``
(torch.compile of the DiT and the decoder), on the debug bundle of test_serve_lib, on CPU.

bf16 must really be active and still give nearly the fp32 pixels; compiling must give the eager
pixels, keep the state_dict keys, and compile nothing after the load-time warm-up.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from test_serve_lib import make_bundle

from svg_ray.config import ConfigError
from svg_ray.errors import SvgRayError
from svg_ray.generate import generate, to_uint8
from svg_ray.serving import AppArgs, SamplerModel, ServerConfig
from svg_ray.serving.sampler import SamplingPath, resolve_compile, resolve_precision
from svg_ray.serving.schema import parse_generate

# 8 images in one chunk, at few and at the default steps; every label.
REQUESTS = [b'{"labels": [0, 1, 2, 3, 4, 5, 6, 7], "seed": 3, "steps": %d}' % n for n in (1, 10)]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("bundle") / "bundle")


def _load(bundle: Path, **server: object) -> SamplerModel:
    server = {"device": "cpu", "max_batch_images": 8, **server}
    return SamplerModel.load(AppArgs.parse({"model_uri": str(bundle), "server": server}))


def _pixels(model: SamplerModel, body: bytes) -> np.ndarray:
    images, _ = model.sample_images([parse_generate(body, model.limits)])
    assert all(x.dtype == np.uint8 for x in images[0])
    return np.stack(images[0]).astype(int)


# --------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("server", "message"),
    [
        ({"precision": "fp16"}, "server.precision must be 'auto', 'bf16' or 'fp32', got 'fp16'"),
        ({"precision": "BF16"}, "server.precision must be"),
        ({"compile": "yes"}, "server.compile must be 'auto', 'on' or 'off', got 'yes'"),
        ({"compile": ""}, "server.compile must be"),
        # YAML reads a bare off as a boolean: refused by type, not silently taken as 'off'.
        (yaml.safe_load("compile: off"), "args.server.compile: expected a string"),
        ({"precision": True}, "args.server.precision: expected a string"),
    ],
)
def test_bad_settings_are_one_line_config_errors(server: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as e:
        AppArgs.parse({"server": server})
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_settings_resolve_by_device() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert ServerConfig().precision == "auto" and ServerConfig().compile == "auto"
    assert (
        resolve_precision("auto", cpu) is None and resolve_precision("auto", cuda) is torch.bfloat16
    )
    assert resolve_precision("bf16", cpu) is torch.bfloat16
    assert resolve_precision("fp32", cuda) is None
    assert not resolve_compile("auto", cpu) and resolve_compile("auto", cuda)
    assert resolve_compile("on", cpu) and not resolve_compile("off", cuda)


# --------------------------------------------------------------------------------------------
# Precision
# --------------------------------------------------------------------------------------------


def test_cpu_default_is_the_plain_fp32_path(bundle: Path) -> None:
    """'auto' on CPU: fp32, eager, no warm-up, and exactly generate()'s pixels."""
    model = _load(bundle)
    info = model.describe()
    assert (info["precision"], info["compiled"], info["warmup_s"]) == ("fp32", False, 0.0)
    job = parse_generate(REQUESTS[0], model.limits)
    labels, seeds = torch.tensor(job.labels), list(job.seeds)
    ref = generate(model.dit, model.ae, model.info.latent_stats, labels, seeds, job.sampler)
    assert np.array_equal(_pixels(model, REQUESTS[0]), to_uint8(ref).numpy())


def test_bf16_is_active_and_close_to_fp32(bundle: Path) -> None:
    """The DiT's matmuls run in bf16 but the ODE integrates in fp32, and the pixels stay within
    about a grey level of fp32's on average. Measured: mean |diff| 0.73 (1 step) and 0.68 (10
    steps) of 255, max 9; about half the pixels differ by at least one level."""
    fp32, bf16 = _load(bundle, precision="fp32"), _load(bundle, precision="bf16")
    assert bf16.describe()["precision"] == "bf16"

    seen: list[torch.dtype] = []
    head = bf16.dit.final_layer.linear
    hook = head.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    try:
        tokens = bf16.path.latents(
            torch.tensor([1, 2]), [0, 1], bf16.server.sampler_config(steps=2)
        )
    finally:
        hook.remove()
    assert seen == [torch.bfloat16, torch.bfloat16]  # one guided (doubled) forward per step
    assert tokens.dtype == torch.float32

    for body in REQUESTS:
        a, b = _pixels(fp32, body), _pixels(bf16, body)
        diff = np.abs(a - b)
        assert diff.mean() < 2.0, diff.mean()
        assert (diff > 0).mean() > 0.05  # autocast was not ignored


# --------------------------------------------------------------------------------------------
# Compiling
# --------------------------------------------------------------------------------------------


def test_a_compile_failure_at_load_says_how_to_serve_without(
    bundle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A host that cannot compile (no C compiler, no Triton) fails at load with one line that
    names the way out, not on a request."""

    def fail(self: SamplingPath, max_images: int) -> None:
        raise RuntimeError("InductorError: no working C compiler found\nsecond line")

    monkeypatch.setattr(SamplingPath, "warm_up", fail)
    with pytest.raises(SvgRayError) as e:
        _load(bundle, compile="on")
    msg = str(e.value)
    assert "\n" not in msg and "no working C compiler" in msg and "server.compile: 'off'" in msg
    with pytest.raises(RuntimeError, match="no working C compiler"):  # eager: not a compile error
        _load(bundle, precision="bf16").warm_up()


@pytest.mark.slow  # compiles 4 graphs with gcc: ~10 s with torch's compile cache, minutes without
@pytest.mark.timeout(900)
def test_compiled_matches_eager_and_never_recompiles(bundle: Path) -> None:
    """server.compile 'on': the load-time warm-up compiles everything; then requests of any
    batch size, guided or not, Euler or Heun, compile nothing more and give the eager pixels
    (measured: max |diff| 1 of 255, in ~1e-4 of the pixels). state_dict keys are unchanged."""
    eager = _load(bundle, max_batch_images=4)
    compiled = _load(bundle, max_batch_images=4, compile="on")
    info = compiled.describe()
    assert info["compiled"] is True and info["precision"] == "fp32" and info["warmup_s"] > 0
    assert list(compiled.dit.state_dict()) == list(eager.dit.state_dict())
    assert list(compiled.ae.state_dict()) == list(eager.ae.state_dict())

    bodies = [
        b'{"labels": [1], "seed": 2, "steps": 2}',  # DiT batch 2 (guided), decoder batch 1
        b'{"labels": [1], "seed": 2, "steps": 2, "cfg_scale": 1}',  # DiT and decoder batch 1
        b'{"labels": [1, 2, 3], "seed": 4, "steps": 3, "cfg_scale": 1}',
        b'{"labels": [5, 6], "seed": 4, "steps": 3, "sampler": "heun", "cfg_mode": "late"}',
        b'{"labels": [0, 1, 2, 3, 4, 5, 6], "seed": 9, "steps": 2}',  # chunks of 4 and 3
        b'{"labels": [7, 8, 9], "seed": 1, "steps": 3, "cfg_mode": "cfg_star-1-0.5"}',
    ]
    with torch._dynamo.config.patch(error_on_recompile=True):
        for body in bodies:
            diff = np.abs(_pixels(compiled, body) - _pixels(eager, body))
            assert diff.max() <= 1, (body, diff.max())
