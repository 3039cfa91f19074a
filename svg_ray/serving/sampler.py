"""The sampler behind the endpoint: load a bundle once, run batches of jobs, encode PNGs.

Plain Python (no Ray), so the batching logic is tested in-process; ``serve/app.py`` wraps it in a
deployment with ``@serve.batch``. A batch of jobs is split into groups that share every sampler
setting (steps, integrator, shift, guidance), and each group runs as one forward pass per step
(chunked at ``max_batch_images``). Batching cannot change an image: its noise comes from its own
seed (``initial_noise``) and every layer of the DiT and the decoder is per-sample, so a batch
only changes the matmul blocking, i.e. float rounding far below one grey level in fp32 (under
bf16 autocast, a pixel may move by a grey level or so).

``SamplingPath`` is how the DiT and the decoder run: under bf16 autocast where
``server.precision`` resolves to bf16, and torch.compile'd where ``server.compile`` resolves to on
(``benchmarks/gpu.py`` times the same class). The ODE is integrated in fp32 either way.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from svg_ray.checkpoint import BundleInfo, load_bundle
from svg_ray.config import to_dict
from svg_ray.data.latents import LatentStats, tokens_to_latents
from svg_ray.errors import SvgRayError
from svg_ray.flow.samplers import SamplerConfig, sample
from svg_ray.generate import initial_noise, to_uint8
from svg_ray.models.autoencoder import SVGAutoencoder
from svg_ray.models.dit import DIT_SIZES, DiT, count_params
from svg_ray.serving.config import AppArgs, ServerConfig
from svg_ray.serving.images import encode_png, grid_png
from svg_ray.serving.schema import GenerationJob, Limits
from svg_ray.serving.source import ModelSource, with_bundle
from svg_ray.training.accel import resolve_compile


@dataclass
class JobResult:
    """What one request gets back from the model replica."""

    pngs: list[bytes]
    """One PNG per image ('json' output) or one grid PNG ('png' output)."""
    labels: list[int]
    seeds: list[int]
    settings: dict[str, Any]
    width: int
    height: int
    sample_s: float = 0.0
    """Seconds in the ODE solver for the chunks holding this job's images."""
    decode_s: float = 0.0
    """Seconds in the decoder for those chunks."""
    encode_s: float = 0.0
    """Seconds encoding this job's PNGs."""
    batch_requests: int = 1
    """Requests that shared this job's forward pass (1 = it ran alone)."""
    batch_images: int = 0
    """Images in that forward pass."""

    def timing(self) -> dict[str, Any]:
        """Timing fields for the response."""
        return {
            "sample_s": round(self.sample_s, 4),
            "decode_s": round(self.decode_s, 4),
            "encode_s": round(self.encode_s, 4),
            "batch_requests": self.batch_requests,
            "batch_images": self.batch_images,
        }


def torch_device(device: str) -> torch.device:
    """'auto' -> CUDA when present, else CPU; 'cpu' and 'cuda[:i]' as given."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_precision(setting: str, device: torch.device) -> torch.dtype | None:
    """``server.precision`` on ``device``: the autocast dtype (bf16), or None for plain fp32."""
    if setting == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return torch.bfloat16 if setting == "bf16" else None


def _mark_batch_dynamic(*tensors: torch.Tensor) -> None:
    # Compiled with dynamic=False, every size is baked in except the batch dimension marked here:
    # one graph then serves every batch >= 2, and torch specialises batch 1 into a graph of its
    # own (``SamplingPath.warm_up`` compiles both). dynamic=True also ends with those two graphs
    # but leaves tokens, channels and widths symbolic too, for no gain: they never change. Left
    # to torch's default (dynamic=None), the first size seen is baked in and the next new one
    # recompiles as dynamic, so which request pays depends on arrival order. Measured with the
    # debug DiT on CPU, batches 1, 8, 2, 3, 5, 16, 1, 7: 2 graphs this way, 7 with dynamic=False
    # unmarked (one per new size, until torch's recompile limit falls back to eager).
    if tensors[0].shape[0] >= 2:
        for t in tensors:
            torch._dynamo.maybe_mark_dynamic(t, 0)


class SamplingPath:
    """The DiT and the decoder as the service runs them: labels and seeds in, uint8 pixels out.

    With ``amp`` (torch.bfloat16) their matmuls and convolutions run under autocast; the DiT's
    velocity is cast to fp32 before classifier-free guidance and the Euler/Heun update
    (``flow.samplers.sample``), so the integration itself stays fp32. ``compiled`` compiles both
    modules in place (``nn.Module.compile``): the parameter names, and so ``state_dict`` keys,
    do not change.
    """

    def __init__(
        self,
        dit: DiT,
        decoder: nn.Module,
        stats: LatentStats,
        amp: torch.dtype | None = None,
        compiled: bool = False,
    ) -> None:
        """Wrap ``dit`` and ``decoder`` (both on one device, eval mode); compile them if asked."""
        self.dit = dit
        self.decoder = decoder
        self.stats = stats
        self.amp = amp
        self.compiled = compiled
        self.device = next(dit.parameters()).device
        if compiled:
            dit.compile(dynamic=False)
            decoder.compile(dynamic=False)

    @property
    def precision(self) -> str:
        """'bf16' or 'fp32'."""
        return "bf16" if self.amp is not None else "fp32"

    def _autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None)

    def _velocity(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.compiled:
            _mark_batch_dynamic(x, t, y)
        with self._autocast():
            v = self.dit(x, t, y)
        return v.float()  # guidance and the ODE update in fp32, whatever the DiT computed in

    @torch.no_grad()
    def latents(self, labels: torch.Tensor, seeds: list[int], cfg: SamplerConfig) -> torch.Tensor:
        """Normalised fp32 latent tokens (B, T, C), as ``generate.generate_latents``."""
        c = self.dit.cfg
        noise = initial_noise(seeds, c.grid**2, c.in_channels).to(self.device)
        return sample(self._velocity, noise, labels.to(self.device), cfg, c.num_classes)

    def warm_up(self, max_images: int) -> None:
        """Sample every graph shape that batches of 1 to ``max_images`` images can hit.

        A compiled module has one graph for batch 1 and one for any larger batch
        (``_mark_batch_dynamic``). The DiT sees N images, or 2N where guidance doubles the batch,
        and the decoder N: one unguided image (DiT and decoder at 1) and a guided batch of
        ``max_images`` (DiT at 2N >= 2, decoder at N) compile them all. One step each is enough:
        a step's shapes do not depend on the step count.
        """
        for images, scale in ((1, 1.0), (max_images, 2.0)):
            cfg = SamplerConfig(steps=1, cfg_scale=scale)
            labels = torch.arange(images) % self.dit.cfg.num_classes
            self.decode(self.latents(labels, list(range(images)), cfg))

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens (B, T, C) -> uint8 images (B, H, W, 3) on the CPU, as ``generate.decode_tokens``
        then ``to_uint8``."""
        z = tokens_to_latents(self.stats.denormalize(tokens, channel_dim=2), self.dit.cfg.grid)
        if self.compiled:
            _mark_batch_dynamic(z)
        with self._autocast():
            images = self.decoder(z)
        # Quantise from fp32: in bf16, (x + 1) * 127.5 is only exact to ~1 grey level near 255.
        return to_uint8(images.float())  # to_uint8 clamps to [-1, 1]


def _size_name(dit: DiT) -> str:
    c = dit.cfg
    for name, shape in DIT_SIZES.items():
        if (c.depth, c.width, c.heads) == (shape["depth"], shape["width"], shape["heads"]):
            return name
    return "custom"


class SamplerModel:
    """EMA DiT + decoder + latent statistics, loaded once, sampling batches of jobs."""

    def __init__(
        self,
        dit: DiT,
        ae: SVGAutoencoder,
        info: BundleInfo,
        source: ModelSource,
        server: ServerConfig,
        load_s: float = 0.0,
    ) -> None:
        """Wrap already loaded models (``load`` is the usual way in)."""
        self.dit = dit.eval()
        self.ae = ae.eval()
        self.info = info
        self.source = source
        self.server = server
        self.load_s = load_s
        self.device = next(dit.parameters()).device
        self.limits = Limits(server=server, num_classes=dit.cfg.num_classes)
        self.path = SamplingPath(
            self.dit,
            self.ae.decoder,
            info.latent_stats,
            amp=resolve_precision(server.precision, self.device),
            compiled=resolve_compile(server.compile, self.device),
        )
        self.warmup_s = 0.0
        # Compiling (or, on CUDA, the first kernel launches and cuBLAS set-up) happens here,
        # not in a client's request.
        if self.path.compiled or self.device.type == "cuda":
            self.warmup_s = self.warm_up()

    @classmethod
    def load(cls, args: AppArgs) -> SamplerModel:
        """Load the bundle ``args.model_uri`` names onto the configured device."""
        t0 = time.perf_counter()
        if args.server.torch_threads:
            torch.set_num_threads(args.server.torch_threads)
        device = torch_device(args.server.device)
        (dit, ae, info), source = with_bundle(
            args.model_uri, lambda uri: load_bundle(uri, device), args.mlflow_tracking_uri
        )
        return cls(dit, ae, info, source, args.server, time.perf_counter() - t0)

    def describe(self) -> dict[str, Any]:
        """What is loaded, for GET /v1/model."""
        cfg = self.dit.cfg
        d = self.server.defaults
        res = self.ae.cfg.resolution
        return {
            "model_uri": self.source.uri,
            "location": self.source.location,
            "registered_model": self.source.registered_model or None,
            "step": self.info.step,
            "num_classes": cfg.num_classes,
            "classes": list(self.info.class_names),
            "image_size": [res, res],
            "dit": {
                "size": _size_name(self.dit),
                "params": count_params(self.dit),
                "config": to_dict(cfg),
            },
            "autoencoder": {
                "resolution": res,
                "latent_channels": self.ae.latent_channels,
                "dino_arch": self.ae.cfg.dino.arch,
                "decoder_params": count_params(self.ae.decoder),
            },
            "defaults": {
                "steps": d.steps,
                "sampler": d.sampler,
                "cfg_scale": d.cfg_scale,
                "cfg_interval": list(d.cfg_interval),
                "time_shift": d.time_shift,
                "format": "json",
            },
            "limits": self.server.limits(),
            "bundle": {
                "source": self.info.source,
                "sampler_defaults": self.info.sampler_defaults,
            },
            "device": str(self.device),
            "precision": self.path.precision,
            "compiled": self.path.compiled,
            "load_s": round(self.load_s, 3),
            "warmup_s": round(self.warmup_s, 3),
        }

    def warm_up(self) -> float:
        """``SamplingPath.warm_up`` for chunks of up to ``max_batch_images``; its seconds.

        A compile failure (no C compiler or Triton on the host, an unsupported op) becomes a
        one-line ``SvgRayError`` that says how to serve without compiling."""
        t0 = time.perf_counter()
        try:
            self.path.warm_up(self.server.max_batch_images)
        except Exception as e:
            if not self.path.compiled:
                raise
            first = (str(e).strip().splitlines() or [""])[0][:300]
            raise SvgRayError(
                f"compiling the sampler failed ({type(e).__name__}: {first}); "
                "set server.compile: 'off' to serve without torch.compile"
            ) from e
        self._sync()
        return time.perf_counter() - t0

    def check(self) -> None:
        """Raise if the replica cannot serve (Serve restarts a replica whose check fails)."""
        if not torch.isfinite(next(self.dit.parameters())).all():
            raise RuntimeError("DiT weights are not finite")

    # ----------------------------------------------------------------------------------------
    # Sampling
    # ----------------------------------------------------------------------------------------

    def sample_images(
        self, jobs: list[GenerationJob]
    ) -> tuple[list[list[np.ndarray]], list[dict[str, Any]]]:
        """uint8 (H, W, 3) images per job, and per-job timing/batch facts."""
        images: list[list[np.ndarray]] = [[np.empty(0)] * len(j.labels) for j in jobs]
        stats: list[dict[str, Any]] = [
            {"sample_s": 0.0, "decode_s": 0.0, "batch_requests": 1, "batch_images": 0} for _ in jobs
        ]
        groups: dict[tuple[Any, ...], list[int]] = defaultdict(list)
        for i, job in enumerate(jobs):
            groups[job.batch_key()].append(i)

        for members in groups.values():
            rows = [(j, k) for j in members for k in range(len(jobs[j].labels))]
            cap = self.server.max_batch_images
            for start in range(0, len(rows), cap):
                chunk = rows[start : start + cap]
                in_chunk = sorted({j for j, _ in chunk})
                labels = torch.tensor([jobs[j].labels[k] for j, k in chunk], dtype=torch.long)
                seeds = [jobs[j].seeds[k] for j, k in chunk]
                t0 = time.perf_counter()
                tokens = self.path.latents(labels, seeds, jobs[chunk[0][0]].sampler)
                self._sync()
                t1 = time.perf_counter()
                pixels = self.path.decode(tokens)
                t2 = time.perf_counter()
                for row, (j, k) in enumerate(chunk):
                    images[j][k] = pixels[row].numpy()
                for j in in_chunk:
                    stats[j]["sample_s"] += t1 - t0
                    stats[j]["decode_s"] += t2 - t1
                    stats[j]["batch_requests"] = max(stats[j]["batch_requests"], len(in_chunk))
                    stats[j]["batch_images"] = max(stats[j]["batch_images"], len(chunk))
        return images, stats

    def run(self, jobs: list[GenerationJob]) -> list[JobResult]:
        """Sample every job (grouped into shared forward passes) and encode its PNGs."""
        images, stats = self.sample_images(jobs)
        out = []
        for job, imgs, st in zip(jobs, images, stats, strict=True):
            t0 = time.perf_counter()
            pngs = [grid_png(imgs)] if job.output == "png" else [encode_png(x) for x in imgs]
            h, w = imgs[0].shape[:2]
            out.append(
                JobResult(
                    pngs=pngs,
                    labels=list(job.labels),
                    seeds=list(job.seeds),
                    settings=job.settings(),
                    width=w,
                    height=h,
                    encode_s=time.perf_counter() - t0,
                    **st,
                )
            )
        return out

    @property
    def grid(self) -> int:
        """Latent tokens per side."""
        return self.dit.cfg.grid

    def _sync(self) -> None:
        # CUDA runs asynchronously: without a sync the decoder would be charged the DiT's time.
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
