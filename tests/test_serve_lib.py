"""The serving library without Ray: request validation, config, batching invariance, PNGs.

Models are debug-size and randomly initialised (no training): the tests check the service's
contracts, not picture quality.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from svg_ray.checkpoint import BundleInfo, save_bundle
from svg_ray.config import ConfigError
from svg_ray.data.latents import LatentStats
from svg_ray.errors import SvgRayError
from svg_ray.models.autoencoder import SVGAutoencoder, ae_preset
from svg_ray.models.dit import DiT, dit_config
from svg_ray.serving import AppArgs, Limits, RequestError, SamplerModel, ServerConfig
from svg_ray.serving.deploy import load_serve_config
from svg_ray.serving.images import decode_png, encode_png, grid_png
from svg_ray.serving.schema import MAX_SEED, parse_generate
from svg_ray.serving.source import parse_registry_uri

SERVE_DIR = Path(__file__).resolve().parents[1] / "serve"
NUM_CLASSES = 10


def make_bundle(path: Path) -> Path:
    """A tiny random sampler bundle: debug AE (64 px, 4x4 latent grid) + debug DiT, 10 classes.

    The DiT's adaLN-Zero init makes it output zero everywhere; the weights are perturbed so that
    labels, guidance and batching actually change the numbers the tests compare.
    """
    torch.manual_seed(0)
    ae = SVGAutoencoder(ae_preset("debug")).eval()
    dcfg = dit_config(
        "debug", in_channels=ae.latent_channels, grid=ae.grid, num_classes=NUM_CLASSES
    )
    dit = DiT(dcfg).eval()
    with torch.no_grad():
        for p in dit.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    c = ae.latent_channels
    rng = np.random.default_rng(0)
    stats = LatentStats(rng.normal(size=c) * 0.1, 0.5 + rng.random(c))
    names = [f"digit {i}" for i in range(NUM_CLASSES)]
    info = BundleInfo(stats, names, step=1234, source={"test": "random"})
    save_bundle(str(path), dit, ae, info)
    return path


# Every way a client can get a request wrong: (body, status, field named in the error).
# The HTTP tests send the same table through the running service.
BIG = 10**12
BAD_REQUESTS: list[tuple[bytes, int, str]] = [
    (b'{"labels": [1,', 400, "body"),  # malformed JSON
    (b"", 400, "body"),
    (b"[1, 2]", 422, "body"),  # not an object
    (b"{}", 422, "labels"),  # neither labels nor label
    (b'{"labels": "1,2"}', 422, "labels"),
    (b'{"labels": [1, "2"]}', 422, "labels[1]"),
    (b'{"labels": [true]}', 422, "labels[0]"),
    (b'{"labels": [1.5]}', 422, "labels[0]"),
    (b'{"labels": []}', 422, "labels"),
    (b'{"labels": [10]}', 422, "labels"),  # out of range (10 classes)
    (b'{"labels": [-1]}', 422, "labels"),
    (json.dumps({"labels": [0] * 17}).encode(), 422, "labels"),  # > max_images_per_request
    (b'{"label": 99}', 422, "label"),
    (b'{"label": "3"}', 422, "label"),
    (b'{"label": 1, "count": 0}', 422, "count"),
    (b'{"label": 1, "count": -2}', 422, "count"),
    (b'{"label": 1, "count": 1000}', 422, "count"),
    (b'{"label": 1, "count": "3"}', 422, "count"),
    (b'{"labels": [1], "label": 1}', 422, "label"),
    (b'{"labels": [1], "count": 2}', 422, "count"),
    (b'{"labels": [1], "steps": 0}', 422, "steps"),
    (b'{"labels": [1], "steps": -5}', 422, "steps"),
    (f'{{"labels": [1], "steps": {BIG}}}'.encode(), 422, "steps"),
    (b'{"labels": [1], "steps": 101}', 422, "steps"),  # > max_steps
    (b'{"labels": [1], "steps": 2.5}', 422, "steps"),
    (b'{"labels": [1], "steps": "10"}', 422, "steps"),
    (b'{"labels": [1], "steps": null, "cfg_scale": -1}', 422, "cfg_scale"),
    (b'{"labels": [1], "cfg_scale": 1e9}', 422, "cfg_scale"),
    (b'{"labels": [1], "cfg_scale": "high"}', 422, "cfg_scale"),
    (b'{"labels": [1], "cfg_scale": NaN}', 422, "cfg_scale"),
    (b'{"labels": [1], "cfg_interval": [0.8, 0.2]}', 422, "cfg_interval"),
    (b'{"labels": [1], "cfg_interval": [0, 1, 2]}', 422, "cfg_interval"),
    (b'{"labels": [1], "cfg_interval": [-0.5, 1]}', 422, "cfg_interval"),
    (b'{"labels": [1], "cfg_interval": "all"}', 422, "cfg_interval"),
    (b'{"labels": [1], "cfg_mode": "sometimes"}', 422, "cfg_mode"),
    (b'{"labels": [1], "cfg_mode": "early-2"}', 422, "cfg_mode"),
    (b'{"labels": [1], "cfg_mode": "cfg_star-1"}', 422, "cfg_mode"),
    (b'{"labels": [1], "cfg_mode": "cfg_star-101-0"}', 422, "cfg_mode"),  # k > max_steps
    (b'{"labels": [1], "cfg_mode": "cfg_star-1-21"}', 422, "cfg_mode"),  # r > max_cfg_scale
    (b'{"labels": [1], "cfg_mode": 3}', 422, "cfg_mode"),
    (json.dumps({"labels": [1], "cfg_mode": "early-" + "1" * 60}).encode(), 422, "cfg_mode"),
    (b'{"labels": [1], "cfg_mode": "late", "cfg_interval": [0.1, 0.9]}', 422, "cfg_interval"),
    (b'{"labels": [1], "sampler": "dpm"}', 422, "sampler"),
    (b'{"labels": [1], "sampler": 1}', 422, "sampler"),
    (b'{"labels": [1], "format": "gif"}', 422, "format"),
    (b'{"labels": [1], "seed": -1}', 422, "seed"),
    (f'{{"labels": [1], "seed": {MAX_SEED + 1}}}'.encode(), 422, "seed"),
    (b'{"labels": [1], "seed": "7"}', 422, "seed"),
    (b'{"labels": [1], "bogus": 1}', 422, "bogus"),  # unknown field
    (json.dumps({"labels": [1], "pad": "x" * 20000}).encode(), 413, "body"),  # oversized
]


@pytest.fixture(scope="module")
def limits() -> Limits:
    return Limits(server=ServerConfig(), num_classes=NUM_CLASSES)


@pytest.mark.parametrize(("body", "status", "field"), BAD_REQUESTS)
def test_bad_request_names_field(body: bytes, status: int, field: str, limits: Limits) -> None:
    with pytest.raises(RequestError) as e:
        parse_generate(body, limits)
    assert e.value.status == status
    assert field in [err["field"] for err in e.value.errors], e.value.errors
    json.dumps(e.value.body())  # the error body is JSON


def test_defaults_are_few_step_settings(limits: Limits) -> None:
    job = parse_generate(b'{"label": 3, "count": 3, "seed": 41}', limits)
    d = limits.server.defaults
    assert job.labels == (3, 3, 3)
    assert job.seeds == (41, 42, 43)
    assert job.output == "json"
    s = job.sampler
    assert (s.steps, s.kind, s.cfg_scale, s.time_shift) == (d.steps, d.sampler, d.cfg_scale, 0.15)
    assert d.steps <= 10 and d.sampler == "euler"
    assert s.cfg_mode == "interval" and s.cfg_interval == (0.0, 1.0)


def test_request_values_override_defaults(limits: Limits) -> None:
    raw = json.dumps(
        {
            "labels": [0, 9],
            "steps": 4,
            "cfg_scale": 1,  # an int is a fine float
            "cfg_interval": [0.2, 0.8],
            "sampler": "heun",
            "seed": MAX_SEED,
            "format": "png",
        }
    ).encode()
    job = parse_generate(raw, limits)
    assert job.sampler.steps == 4 and job.sampler.kind == "heun"
    assert job.sampler.cfg_scale == 1.0 and job.sampler.cfg_interval == (0.2, 0.8)
    assert job.seeds == (MAX_SEED, 0)  # wraps, stays in range
    assert job.output == "png"


def test_reference_cfg_modes_are_accepted_verbatim(limits: Limits) -> None:
    for mode in ("constant", "late", "linear", "early-0.3", "cfg_star-1-0", "interval"):
        job = parse_generate(json.dumps({"labels": [1], "cfg_mode": mode}).encode(), limits)
        assert job.sampler.cfg_mode == mode and job.settings()["cfg_mode"] == mode
    plain = parse_generate(b'{"labels": [1]}', limits)
    star = parse_generate(b'{"labels": [1], "cfg_mode": "cfg_star-1-0"}', limits)
    assert plain.batch_key() != star.batch_key()  # never batched together


def test_missing_seed_is_chosen_and_in_range(limits: Limits) -> None:
    job = parse_generate(b'{"labels": [1, 2]}', limits)
    assert 0 <= job.seeds[0] <= MAX_SEED


def test_batch_key_groups_only_identical_settings(limits: Limits) -> None:
    a = parse_generate(b'{"labels": [1], "steps": 4, "seed": 1}', limits)
    b = parse_generate(b'{"label": 2, "count": 3, "steps": 4, "seed": 9, "format": "png"}', limits)
    c = parse_generate(b'{"labels": [1], "steps": 5}', limits)
    d = parse_generate(b'{"labels": [1], "steps": 4, "sampler": "heun"}', limits)
    e = parse_generate(b'{"labels": [1], "steps": 4, "cfg_scale": 2.0}', limits)
    assert a.batch_key() == b.batch_key()
    assert len({a.batch_key(), c.batch_key(), d.batch_key(), e.batch_key()}) == 4


def test_server_config_is_strict() -> None:
    with pytest.raises(ConfigError, match="unknown key"):
        AppArgs.parse({"model_uri": "x", "server": {"max_stepz": 3}})
    with pytest.raises(ConfigError, match="integer"):
        AppArgs.parse({"server": {"max_steps": "100"}})
    with pytest.raises(ConfigError, match=r"defaults\.steps"):
        AppArgs.parse({"server": {"max_steps": 5, "defaults": {"steps": 10}}})
    with pytest.raises(ConfigError, match="sampler"):
        AppArgs.parse({"server": {"defaults": {"sampler": "dpm"}}})


def test_model_uri_default_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SVG_RAY_MODEL_URI", "s3://bucket/bundle")
    assert AppArgs.parse({}).model_uri == "s3://bucket/bundle"
    assert AppArgs.parse({"model_uri": "/x"}).model_uri == "/x"


@pytest.mark.parametrize("name", ["config.yaml", "config_cpu.yaml"])
def test_serve_configs_are_valid(name: str) -> None:
    """Both YAMLs pass Ray's own Serve schema and our strict args parsing."""
    cfg = load_serve_config(SERVE_DIR / name)
    assert cfg.import_path == "serve.app:build_app"
    args = AppArgs.parse(cfg.args)
    sampler = cfg.deployments["SVGSampler"]
    auto = sampler["autoscaling_config"]
    assert 1 <= auto["min_replicas"] < auto["max_replicas"]
    assert auto["target_ongoing_requests"] <= sampler["max_ongoing_requests"]
    # A replica must be allowed to hold a full batch, and no more than that.
    assert sampler["max_ongoing_requests"] == args.server.max_batch_requests
    assert "SVGIngress" in cfg.deployments
    if name == "config.yaml":
        assert sampler["ray_actor_options"]["num_gpus"] == 1
        assert args.server.device == "cuda"


def test_registry_uri_parsing() -> None:
    assert parse_registry_uri("models:/svg-xl/3") == ("svg-xl", "3", None)
    assert parse_registry_uri("models:/svg-xl@prod") == ("svg-xl", None, "prod")
    assert parse_registry_uri("models:/svg-xl/latest") == ("svg-xl", "latest", None)
    for bad in ("models:/", "models:/a/b/c", "models:/a", "models:/a@", "models:/a/Staging"):
        with pytest.raises(SvgRayError, match="expected models:/<name>/<version>"):
            parse_registry_uri(bad)


def test_png_is_deterministic_and_lossless() -> None:
    img = np.random.default_rng(0).integers(0, 256, size=(8, 6, 3), dtype=np.uint8)
    assert encode_png(img) == encode_png(img.copy())
    assert np.array_equal(decode_png(encode_png(img)), img)
    grid = decode_png(grid_png([img] * 5))  # 3 columns x 2 rows, 2 px gaps
    assert grid.shape == (2 * 8 + 2, 3 * 6 + 4, 3)
    assert np.array_equal(grid[:8, :6], img)


# --------------------------------------------------------------------------------------------
# The sampler model in-process
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> SamplerModel:
    bundle = make_bundle(tmp_path_factory.mktemp("bundle") / "bundle")
    # max_batch_images=4 makes the mixed batch below run as several chunks.
    args = AppArgs.parse(
        {"model_uri": str(bundle), "server": {"max_batch_images": 4, "device": "cpu"}}
    )
    return SamplerModel.load(args)


def _pixels(result: Any) -> list[np.ndarray]:
    return [decode_png(p).astype(int) for p in result.pngs]


def test_model_describes_what_it_loaded(model: SamplerModel) -> None:
    info = model.describe()
    assert info["step"] == 1234 and info["num_classes"] == NUM_CLASSES
    assert info["dit"]["size"] == "debug" and info["dit"]["params"] > 0
    assert info["classes"][3] == "digit 3"
    assert info["image_size"] == [64, 64]
    assert info["registered_model"] is None
    assert info["limits"]["max_steps"] == ServerConfig().max_steps
    json.dumps(info)


def test_batching_does_not_change_results(model: SamplerModel) -> None:
    """A job alone and the same job batched with others (and chunked) give the same images."""
    lim = model.limits
    job = parse_generate(b'{"labels": [1, 2, 3], "seed": 5, "steps": 3}', lim)
    same_group = parse_generate(b'{"label": 7, "count": 3, "seed": 9, "steps": 3}', lim)
    other = parse_generate(b'{"labels": [4], "seed": 5, "steps": 2, "sampler": "heun"}', lim)
    alone = model.run([job])[0]
    mixed = model.run([same_group, other, job])
    assert mixed[2].batch_requests == 2 and mixed[1].batch_requests == 1
    a, b = _pixels(alone), _pixels(mixed[2])
    assert max(int(np.abs(x - y).max()) for x, y in zip(a, b, strict=True)) <= 1
    # The labels matter (the perturbed DiT is not the zero function) ...
    assert np.abs(a[0] - a[1]).mean() > 1
    # ... and an image depends on its own seed, not its position in the request.
    shifted = parse_generate(b'{"labels": [2], "seed": 6, "steps": 3}', lim)
    assert np.abs(_pixels(model.run([shifted])[0])[0] - a[1]).max() <= 1


def test_same_request_same_bytes(model: SamplerModel) -> None:
    raw = b'{"labels": [0, 5], "seed": 11, "steps": 2, "format": "png"}'
    r1 = model.run([parse_generate(raw, model.limits)])[0]
    r2 = model.run([parse_generate(raw, model.limits)])[0]
    assert r1.pngs == r2.pngs and len(r1.pngs) == 1
    assert decode_png(r1.pngs[0]).shape == (64, 2 * 64 + 2, 3)  # a 2-image grid


# --------------------------------------------------------------------------------------------
# The OpenAPI document
# --------------------------------------------------------------------------------------------


def test_openapi_documents_the_generate_request_and_responses() -> None:
    """/openapi.json: the request body schema with the server's bounds, and response models."""
    from serve.app import api
    from svg_ray.serving.openapi import openapi_schema

    server = ServerConfig(max_images_per_request=5, max_steps=30, max_cfg_scale=7.0)
    doc = openapi_schema(api, server)
    json.dumps(doc)
    op = doc["paths"]["/v1/generate"]["post"]
    body = op["requestBody"]["content"]["application/json"]["schema"]
    assert op["requestBody"]["required"] and body == {
        "$ref": "#/components/schemas/GenerateRequest"
    }
    schemas = doc["components"]["schemas"]
    req = schemas["GenerateRequest"]
    assert req["additionalProperties"] is False
    props = req["properties"]
    assert {"labels", "label", "count", "steps", "cfg_scale", "seed", "format"} <= set(props)

    def typed(name: str) -> dict[str, Any]:
        return next(b for b in props[name]["anyOf"] if b.get("type") != "null")

    assert typed("labels")["maxItems"] == 5 and typed("labels")["items"] == {"type": "integer"}
    assert (typed("steps")["minimum"], typed("steps")["maximum"]) == (1, 30)
    assert typed("cfg_scale")["maximum"] == 7.0 and typed("seed")["maximum"] == MAX_SEED
    assert "Server default: 10" in props["steps"]["description"]
    assert props["format"]["enum"] == ["json", "png"]
    # Every documented example is a request the server accepts.
    for example in req["examples"]:
        parse_generate(json.dumps(example).encode(), Limits(server, NUM_CLASSES))

    ok = op["responses"]["200"]["content"]
    assert ok["application/json"]["schema"] == {"$ref": "#/components/schemas/GenerateResponse"}
    assert ok["image/png"]["schema"]["format"] == "binary"
    for code in ("400", "413", "422", "500", "503"):
        ref = op["responses"][code]["content"]["application/json"]["schema"]["$ref"]
        assert ref == "#/components/schemas/ErrorResponse", code
    response = schemas["GenerateResponse"]["properties"]
    assert {"images", "labels", "seeds", "seed", "settings", "timing"} <= set(response)
    error = schemas["ErrorResponse"]["properties"]
    assert set(error) == {"error", "errors"}
    # The error body the server actually sends matches the documented model.
    from svg_ray.serving.openapi import ErrorResponse

    with pytest.raises(RequestError) as e:
        parse_generate(b'{"labels": []}', Limits(server, NUM_CLASSES))
    ErrorResponse.model_validate(e.value.body())
    assert set(doc["paths"]) == {"/v1/generate", "/v1/model", "/healthz"}  # docs pages hidden
