"""The HTTP request schema and its validation, and the job that travels to the model replica.

Every bad input becomes a ``RequestError`` listing ``{"field", "message"}`` pairs, so a client
always learns which field is wrong. Types are strict (``"4"`` is not a step count, ``true`` is not
a label) and the bounds come from ``ServerConfig``, not from constants here: validation runs with
the server's limits and the model's class count in the pydantic context.
"""

from __future__ import annotations

import dataclasses
import secrets
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError, ValidationInfo, field_validator

from svg_ray.flow.samplers import CFG_MODE_FORMS, CFGMode, SamplerConfig, parse_cfg_mode
from svg_ray.serving.config import ServerConfig

MAX_SEED = 2**32 - 1
"""Seeds stay below 2**53 so JavaScript clients can echo them exactly."""


class RequestError(ValueError):
    """A request the server refuses; ``errors`` name the offending fields."""

    def __init__(self, status: int, errors: list[dict[str, str]]) -> None:
        super().__init__("; ".join(f"{e['field']}: {e['message']}" for e in errors))
        self.status = status
        self.errors = errors

    def body(self) -> dict[str, Any]:
        """The JSON error body."""
        return {"error": "invalid_request", "errors": self.errors}


@dataclass(frozen=True)
class Limits:
    """What validation needs to know about this server and model."""

    server: ServerConfig
    num_classes: int


def _limits(info: ValidationInfo) -> Limits:
    ctx = info.context or {}
    limits = ctx.get("limits")
    if not isinstance(limits, Limits):
        raise RuntimeError("GenerateRequest must be validated with context={'limits': Limits}")
    return limits


class GenerateRequest(BaseModel):
    """Body of POST /v1/generate. Give ``labels`` (one image each) or ``label`` and ``count``."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    labels: list[int] | None = None
    label: int | None = None
    count: int | None = None
    steps: int | None = None
    cfg_scale: float | None = None
    cfg_interval: tuple[float, float] | None = None
    cfg_mode: str | None = None
    sampler: Literal["euler", "heun"] | None = None
    seed: int | None = None
    format: Literal["json", "png"] = "json"

    @field_validator("labels")
    @classmethod
    def _labels(cls, v: list[int] | None, info: ValidationInfo) -> list[int] | None:
        if v is None:
            return v
        lim = _limits(info)
        if not v:
            raise ValueError("must hold at least one class label")
        if len(v) > lim.server.max_images_per_request:
            raise ValueError(
                f"at most {lim.server.max_images_per_request} images per request, got {len(v)}"
            )
        bad = [x for x in v if not 0 <= x < lim.num_classes]
        if bad:
            raise ValueError(f"labels must be in [0, {lim.num_classes - 1}], got {bad[:5]}")
        return v

    @field_validator("label")
    @classmethod
    def _label(cls, v: int | None, info: ValidationInfo) -> int | None:
        lim = _limits(info)
        if v is not None and not 0 <= v < lim.num_classes:
            raise ValueError(f"must be in [0, {lim.num_classes - 1}], got {v}")
        return v

    @field_validator("count")
    @classmethod
    def _count(cls, v: int | None, info: ValidationInfo) -> int | None:
        lim = _limits(info)
        if v is not None and not 1 <= v <= lim.server.max_images_per_request:
            raise ValueError(f"must be in [1, {lim.server.max_images_per_request}], got {v}")
        return v

    @field_validator("steps")
    @classmethod
    def _steps(cls, v: int | None, info: ValidationInfo) -> int | None:
        lim = _limits(info)
        if v is not None and not 1 <= v <= lim.server.max_steps:
            raise ValueError(f"must be in [1, {lim.server.max_steps}], got {v}")
        return v

    @field_validator("cfg_scale")
    @classmethod
    def _cfg_scale(cls, v: float | None, info: ValidationInfo) -> float | None:
        lim = _limits(info)
        if v is not None and not 0.0 <= v <= lim.server.max_cfg_scale:
            raise ValueError(f"must be in [0, {lim.server.max_cfg_scale}], got {v}")
        return v

    @field_validator("cfg_interval")
    @classmethod
    def _cfg_interval(cls, v: tuple[float, float] | None) -> tuple[float, float] | None:
        if v is not None and not 0.0 <= v[0] <= v[1] <= 1.0:
            raise ValueError(f"must be [lo, hi] with 0 <= lo <= hi <= 1, got {list(v)}")
        return v

    @field_validator("cfg_mode")
    @classmethod
    def _cfg_mode(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is None:
            return v
        lim = _limits(info)
        if len(v) > 40:
            raise ValueError(f"at most 40 characters, got {len(v)}")
        try:
            sch = parse_cfg_mode(v)
        except ValueError:
            raise ValueError(f"must be one of {CFG_MODE_FORMS}, got {v!r}") from None
        if sch.skip > lim.server.max_steps:
            raise ValueError(f"k in cfg_star-<k>-<r> must be at most {lim.server.max_steps}")
        if sch.ratio > lim.server.max_cfg_scale:
            raise ValueError(f"r in cfg_star-<k>-<r> must be at most {lim.server.max_cfg_scale}")
        return v

    @field_validator("seed")
    @classmethod
    def _seed(cls, v: int | None) -> int | None:
        if v is not None and not 0 <= v <= MAX_SEED:
            raise ValueError(f"must be in [0, {MAX_SEED}], got {v}")
        return v


@dataclass(frozen=True)
class GenerationJob:
    """One validated request as the model replica sees it: image i has labels[i] and seeds[i]."""

    labels: tuple[int, ...]
    seeds: tuple[int, ...]
    sampler: SamplerConfig
    output: str
    """'json' (one PNG per image) or 'png' (one PNG, a grid when there are several images)."""

    def batch_key(self) -> tuple[Any, ...]:
        """Jobs with equal keys can share one forward pass (same grid, guidance and integrator)."""
        s = self.sampler
        return (s.steps, s.kind, s.time_shift, s.cfg_scale, s.cfg_mode, tuple(s.cfg_interval))

    def settings(self) -> dict[str, Any]:
        """The sampler settings as echoed to the client."""
        s = self.sampler
        return {
            "steps": s.steps,
            "sampler": s.kind,
            "cfg_scale": s.cfg_scale,
            "cfg_interval": list(s.cfg_interval),
            "cfg_mode": s.cfg_mode,
            "time_shift": s.time_shift,
        }


def _field_name(loc: tuple[int | str, ...]) -> str:
    """('labels', 3) -> 'labels[3]'; () (the whole body) -> 'body'."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "body"


def _message(err: Any) -> str:
    msg = str(err["msg"])
    # pydantic prefixes messages of validators with "Value error, "; the field says enough.
    return msg.removeprefix("Value error, ")


def parse_generate(raw: bytes, limits: Limits) -> GenerationJob:
    """Validate a raw JSON body into a job, or raise RequestError (400 bad JSON, 422 bad fields)."""
    server = limits.server
    if len(raw) > server.max_body_bytes:
        raise RequestError(
            413,
            [{"field": "body", "message": f"larger than {server.max_body_bytes} bytes"}],
        )
    try:
        req = GenerateRequest.model_validate_json(raw, context={"limits": limits})
    except ValidationError as e:
        errors = [
            {"field": _field_name(err["loc"]), "message": _message(err)} for err in e.errors()
        ]
        status = 400 if any(err["type"] == "json_invalid" for err in e.errors()) else 422
        if status == 400:
            errors = [{"field": "body", "message": "malformed JSON: " + errors[0]["message"]}]
        raise RequestError(status, errors) from None

    if req.labels is not None and req.label is not None:
        raise RequestError(422, [{"field": "label", "message": "give labels or label, not both"}])
    if req.labels is not None and req.count is not None:
        raise RequestError(
            422, [{"field": "count", "message": "count goes with label; labels sets the count"}]
        )
    if req.cfg_mode not in (None, CFGMode.INTERVAL.value) and req.cfg_interval is not None:
        raise RequestError(
            422, [{"field": "cfg_interval", "message": "goes with cfg_mode 'interval' only"}]
        )
    if req.labels is not None:
        labels = req.labels
    elif req.label is not None:
        labels = [req.label] * (req.count or 1)
    else:
        raise RequestError(
            422, [{"field": "labels", "message": "required: give labels, or label and count"}]
        )
    # No seed: pick one and echo it, so any response can be reproduced.
    seed = req.seed if req.seed is not None else secrets.randbelow(MAX_SEED + 1)
    try:
        sampler = server.sampler_config(req.steps, req.sampler, req.cfg_scale, req.cfg_interval)
        if req.cfg_mode is not None:  # the server's default is 'interval' (0, 1) = constant
            sampler = dataclasses.replace(sampler, cfg_mode=req.cfg_mode)
    except ValueError as e:  # SamplerConfig's own checks; the field checks above cover them
        raise RequestError(422, [{"field": "body", "message": str(e)}]) from None
    return GenerationJob(
        labels=tuple(labels),
        # Image i uses seed + i, wrapping at 2**32, so seeds stay in range for any count.
        seeds=tuple((seed + i) % (MAX_SEED + 1) for i in range(len(labels))),
        sampler=sampler,
        output=req.format,
    )
