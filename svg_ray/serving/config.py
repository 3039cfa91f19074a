"""Typed server configuration: request defaults, the bounds on what a client may ask for, batching.

One ``AppArgs`` travels from ``serve/config*.yaml`` (``args:``), the ``svg-ray serve`` command or a
test into both deployments, so the ingress validates against exactly the limits the model replica
batches with. Unknown keys and wrong types are errors (``svg_ray.config.from_dict``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from svg_ray.config import from_dict, require, to_dict
from svg_ray.flow.samplers import SamplerConfig, SamplerKind

DEFAULT_MODEL_URI = "outputs/demo/bundle"
"""What ``svg-ray demo`` writes; used when neither args nor SVG_RAY_MODEL_URI name a model."""


@dataclass
class SamplerDefaults:
    """What a request gets for every field it leaves out.

    Few-step settings: SVG's latent samples well in few Euler steps (the SVG paper, arXiv
    2510.15301, Sec. 5: FID 6.49 at 10 steps with CFG vs 1.92 at 25, where SiT needs 250). Euler
    beats Heun per model evaluation at this budget, and w = 4 is the reference's setting for
    pictures.
    """

    steps: int = 10
    """Integration steps."""
    sampler: str = "euler"
    """'euler' or 'heun'."""
    cfg_scale: float = 4.0
    """Classifier-free guidance weight (1.0 = no guidance)."""
    cfg_interval: tuple[float, float] = (0.0, 1.0)
    """[t_lo, t_hi] where guidance applies; (0, 1) = every step."""
    time_shift: float = 0.15
    """Time-grid shift s (server-side only; SVG's sampling shift)."""

    def __post_init__(self) -> None:
        require(self.steps >= 1, "server.defaults.steps must be >= 1")
        require(
            self.sampler in {k.value for k in SamplerKind},
            f"server.defaults.sampler must be one of {[k.value for k in SamplerKind]}",
        )
        require(self.time_shift > 0, "server.defaults.time_shift must be positive")
        lo, hi = self.cfg_interval
        require(0.0 <= lo <= hi <= 1.0, "server.defaults.cfg_interval must be 0 <= lo <= hi <= 1")


LIMITS = (
    "max_images_per_request",
    "max_steps",
    "max_cfg_scale",
    "max_batch_requests",
    "max_batch_images",
)
"""The ServerConfig fields a client sees in GET /v1/model."""

PRECISIONS = ("auto", "bf16", "fp32")
"""``server.precision`` values."""
COMPILE_MODES = ("auto", "on", "off")
"""``server.compile`` values."""


@dataclass
class ServerConfig:
    """Bounds, batching and runtime settings of the sampler service."""

    max_images_per_request: int = 16
    """Most images one request may ask for (labels or count)."""
    max_steps: int = 100
    """Most integration steps a request may ask for."""
    max_cfg_scale: float = 20.0
    """Largest guidance scale accepted."""
    max_batch_requests: int = 8
    """Most requests one @serve.batch call groups (1 turns dynamic batching off)."""
    max_batch_images: int = 32
    """Most images in one forward pass; bigger groups run as several chunks."""
    batch_wait_timeout_s: float = 0.01
    """How long a partial batch waits for more requests before it runs."""
    max_body_bytes: int = 16384
    """Largest request body accepted (a full request is a few hundred bytes)."""
    torch_threads: int = 0
    """torch intra-op threads per replica (0 = torch's default); 1 on a shared CPU host."""
    device: str = "auto"
    """'auto' (cuda when present), 'cpu' or 'cuda[:i]'."""
    precision: str = "auto"
    """'auto' (bf16 autocast on CUDA, fp32 on CPU), 'bf16' or 'fp32': the dtype of the DiT's and
    the decoder's matmuls and convolutions; the sampler integrates in fp32 either way."""
    compile: str = "auto"
    """'auto' (on for CUDA, off on CPU), 'on' or 'off' (quoted in YAML, where a bare on/off is a
    boolean): torch.compile the DiT and the decoder, at load time (warm-up samples), so no request
    pays for compiling."""
    defaults: SamplerDefaults = field(default_factory=SamplerDefaults)
    """Values for fields a request leaves out."""

    def __post_init__(self) -> None:
        for name in ("max_images_per_request", "max_steps", "max_batch_requests"):
            require(getattr(self, name) >= 1, f"server.{name} must be >= 1")
        require(self.max_batch_images >= 1, "server.max_batch_images must be >= 1")
        require(self.max_cfg_scale >= 1.0, "server.max_cfg_scale must be >= 1")
        require(self.batch_wait_timeout_s >= 0, "server.batch_wait_timeout_s must be >= 0")
        require(self.max_body_bytes >= 256, "server.max_body_bytes must be >= 256")
        require(self.torch_threads >= 0, "server.torch_threads must be >= 0")
        require(
            self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"),
            f"server.device must be 'auto', 'cpu' or 'cuda[:i]', got {self.device!r}",
        )
        require(
            self.precision in PRECISIONS,
            f"server.precision must be 'auto', 'bf16' or 'fp32', got {self.precision!r}",
        )
        require(
            self.compile in COMPILE_MODES,
            f"server.compile must be 'auto', 'on' or 'off', got {self.compile!r}",
        )
        require(
            self.defaults.steps <= self.max_steps,
            "server.defaults.steps must not exceed server.max_steps",
        )
        require(
            self.defaults.cfg_scale <= self.max_cfg_scale,
            "server.defaults.cfg_scale must not exceed server.max_cfg_scale",
        )

    def limits(self) -> dict[str, Any]:
        """The bounds a client can see in GET /v1/model."""
        return {k: getattr(self, k) for k in LIMITS}

    def sampler_config(
        self,
        steps: int | None = None,
        sampler: str | None = None,
        cfg_scale: float | None = None,
        cfg_interval: tuple[float, float] | None = None,
    ) -> SamplerConfig:
        """A SamplerConfig from request values, defaults filling what is None."""
        d = self.defaults
        lo, hi = cfg_interval if cfg_interval is not None else d.cfg_interval
        return SamplerConfig(
            steps=steps if steps is not None else d.steps,
            kind=sampler if sampler is not None else d.sampler,
            time_shift=d.time_shift,
            cfg_scale=float(cfg_scale if cfg_scale is not None else d.cfg_scale),
            # 'interval' with (0, 1) equals 'constant', so one mode covers every request.
            cfg_mode="interval",
            cfg_interval=(float(lo), float(hi)),
        )


@dataclass
class AppArgs:
    """Everything the application needs: which model, and how to serve it."""

    model_uri: str = ""
    """Sampler bundle: a local directory, ``s3://...``, or a registered model in MLflow:
    ``models:/<name>/<version>``, ``models:/<name>/latest`` or ``models:/<name>@<alias>``.
    Empty: SVG_RAY_MODEL_URI, then outputs/demo/bundle."""
    mlflow_tracking_uri: str = ""
    """MLflow server for ``models:/`` URIs; empty: MLFLOW_TRACKING_URI of the replica."""
    server: ServerConfig = field(default_factory=ServerConfig)
    """Limits, batching and defaults."""

    def __post_init__(self) -> None:
        if not self.model_uri:
            self.model_uri = os.environ.get("SVG_RAY_MODEL_URI", DEFAULT_MODEL_URI)

    @classmethod
    def parse(cls, data: dict[str, Any] | AppArgs | None) -> AppArgs:
        """Strictly parse the ``args`` mapping of a Serve config (or pass an AppArgs through)."""
        if isinstance(data, AppArgs):
            return data
        return from_dict(cls, dict(data or {}), "args")

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (what ``parse`` accepts), for deployment constructor arguments."""
        return to_dict(self)
