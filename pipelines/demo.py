"""The main job: the whole SVG platform end to end on a local Ray, on the scikit-learn digits.

    svg-ray demo                      # or: make demo (which also creates .venv)
    svg-ray demo --out-dir outputs/demo --dit-steps 3000

Stages, each the same code a cluster job runs (pipelines/*.py):
  1. write the digits (1,797 real images that ship with scikit-learn) as an image folder,
  2. train the SVG autoencoder with Ray Train (residual encoder + decoder; frozen DINO),
  3. precompute latents with Ray Data into Parquet + manifest,
  4. train the diffusion transformer with Ray Train on the latents (MLflow tracked, registered),
  5. sample a class-by-class grid from the EMA bundle,
  6. start the Ray Serve endpoint, answer one HTTP request, stop it,
then print where everything is. Debug sizes and a randomly initialised DINO (nothing may be
downloaded here), so the pictures show the platform working, not the paper's quality.

Re-running resumes: the training runs re-attach to their checkpoints and MLflow runs, the
precompute skips committed shards; each stage says whether it started fresh or resumed.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from svg_ray.command import Command, Section
from svg_ray.config import require, to_dict

STAGES = 6


@dataclass
class DemoConfig:
    """Settings of the end-to-end demo (debug sizes that finish in minutes on 2 CPU cores)."""

    out_dir: str = "outputs/demo"
    """Local folder for images, runs, latents, grids and the summary."""
    num_workers: int = 2
    """Ray Train workers per training stage (CPU, gloo)."""
    ae_steps: int = 200
    """Autoencoder steps (residual encoder + decoder; DINO frozen)."""
    ae_batch: int = 32
    """Autoencoder global batch."""
    ae_lr: float = 5e-4
    """Autoencoder Adam learning rate (above the paper's 1e-4 to converge in minutes)."""
    lpips_vgg_weights: str | None = None
    """torchvision VGG16 weights for LPIPS (path or s3://); None: L1 only (nothing downloaded)."""
    dit_model: str = "demo"
    """DiT size (see svg_ray.models.dit.DIT_SIZES)."""
    dit_steps: int = 1500
    """Diffusion steps."""
    dit_batch: int = 64
    """Diffusion global batch."""
    dit_lr: float = 1e-3
    """DiT AdamW learning rate."""
    ema_decay: float = 0.995
    """EMA decay (a short run, so far below the paper's 0.9999)."""
    sample_steps: int = 25
    """Euler steps for the grid and the served request."""
    cfg_scale: float = 3.0
    """Guidance scale for the grid and the served request."""
    serve: bool = True
    """Start the Serve endpoint and answer one request (stage 6)."""
    port: int = 8000
    """HTTP port of the endpoint (a free port is used when this one is taken)."""
    seed: int = 0
    """Seed of both training runs."""

    def __post_init__(self) -> None:
        require(self.num_workers >= 1, "demo.num_workers must be >= 1")
        for name in ("ae_steps", "ae_batch", "dit_steps", "dit_batch", "sample_steps"):
            require(getattr(self, name) >= 1, f"demo.{name} must be >= 1")
        require(
            self.ae_batch % self.num_workers == 0 and self.dit_batch % self.num_workers == 0,
            f"demo.ae_batch and demo.dit_batch must be divisible by num_workers {self.num_workers}",
        )
        require(0 < self.port < 65536, f"demo.port must be a TCP port, got {self.port}")


@dataclass
class StageRun:
    """What a training stage of the demo did."""

    output: str
    """The exported model (autoencoder file or sampler bundle folder)."""
    state: str
    """'started', 'resumed' or 'already finished'."""
    run_id: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, result: Any) -> StageRun:
        """From a training job's ``RunResult``."""
        state = "resumed" if result.resumed else "started"
        return cls(result.output, state, result.run_id, dict(result.metrics))

    def metric(self, name: str) -> str:
        """`` (name value)`` when the stage reported it."""
        value = self.metrics.get(name)
        return f" ({name} {value:.4f})" if isinstance(value, float) else ""

    def to_dict(self) -> dict[str, Any]:
        """For summary.json."""
        return {"state": self.state, "run_id": self.run_id, "metrics": self.metrics}


class _Progress:
    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    def stage(self, k: int, msg: str) -> None:
        print(f"\n[demo {self.elapsed():6.1f}s] stage {k}/{STAGES}: {msg}", flush=True)

    def log(self, msg: str) -> None:
        print(f"[demo {self.elapsed():6.1f}s] {msg}", flush=True)

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0


def _free_port(preferred: int) -> int:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", preferred))
            return preferred
        except OSError:
            s.bind(("127.0.0.1", 0))
            return int(s.getsockname()[1])


def _digits(out: Path, p: _Progress) -> Path:
    from svg_ray.data.digits import write_image_folder

    images = out / "images"
    marker = images / ".complete"
    if marker.exists():
        p.log(f"digits already written: {images}")
        return images
    n = write_image_folder(images, resolution=64)
    marker.write_text(str(n))
    p.log(f"wrote {n} digit images (64px, 10 classes) to {images}")
    return images


def _finished_step(path: Path, kind: str) -> int:
    """The step an earlier demo's exported autoencoder or bundle was written at (0: none)."""
    from svg_ray.checkpoint import CheckpointError, read_bundle_json, read_metadata

    if not path.exists():
        return 0
    try:
        if kind == "autoencoder":
            return int(json.loads(read_metadata(str(path)).get("extra", "{}")).get("step", 0))
        return int(read_bundle_json(str(path), "bundle").get("step", 0))
    except (OSError, ValueError, CheckpointError):
        return 0


def _train_autoencoder(cfg: DemoConfig, images: Path, runs: Path, p: _Progress) -> StageRun:
    from svg_ray.losses import AELossConfig
    from svg_ray.training.autoencoder import AE_FILE, AETrainConfig
    from svg_ray.training.autoencoder import launch as launch_ae
    from svg_ray.training.common import RunSettings

    tcfg = AETrainConfig(
        input=str(images),
        preset="debug",
        dino_allow_random=True,
        steps=cfg.ae_steps,
        global_batch=cfg.ae_batch,
        lr=cfg.ae_lr,
        decode_batch=256,
        decode_cpus=0.5,
        seed=cfg.seed,
        log_every=50,
        checkpoint_every=max(100, cfg.ae_steps // 3),
        recon_every=0,
    )
    loss = AELossConfig(
        perceptual_weight=1.0 if cfg.lpips_vgg_weights else 0.0,
        lpips_vgg_weights=cfg.lpips_vgg_weights,
        gan_weight=0.0,  # the adversarial term only pays off after many thousand steps
    )
    run = RunSettings(
        name="demo-ae",
        storage_path=str(runs),
        num_workers=cfg.num_workers,
        cpus_per_worker=0.5,
        register_as="svg-demo-autoencoder",
    )
    done = _finished_step(Path(run.run_uri) / AE_FILE, "autoencoder")
    if done >= cfg.ae_steps:
        # Resuming a finished run would only restart the workers to do nothing.
        p.log(f"run {run.name!r} already finished at step {done}: nothing to resume")
        return StageRun(f"{run.run_uri}/{AE_FILE}", "already finished")
    return StageRun.of(launch_ae(tcfg, loss, run))


def _precompute(images: Path, out: Path, autoencoder: str, p: _Progress) -> Any:
    from svg_ray.checkpoint import autoencoder_id
    from svg_ray.data.precompute import PrecomputeConfig, run_precompute

    # One dataset per autoencoder version: a retrained autoencoder never mixes with old latents.
    latents = out / "latents" / autoencoder_id(autoencoder)
    pcfg = PrecomputeConfig(
        input=str(images),
        out=str(latents),
        autoencoder=autoencoder,
        rows_per_shard=300,  # 6 shards: the 2 workers get 900 and 897 rows
        batch_size=128,
        decoders=1,
        decode_cpus=0.5,
        encode_cpus=1.0,
    )
    state = "resuming" if (latents / "job.json").exists() else "starting"
    p.log(f"{state} precompute into {latents}")
    return run_precompute(pcfg)


def _train_diffusion(cfg: DemoConfig, data: str, runs: Path, p: _Progress) -> StageRun:
    from svg_ray.training.common import RunSettings
    from svg_ray.training.diffusion import DiffusionTrainConfig
    from svg_ray.training.diffusion import launch as launch_dit

    tcfg = DiffusionTrainConfig(
        data=data,
        model=cfg.dit_model,
        steps=cfg.dit_steps,
        global_batch=cfg.dit_batch,
        lr=cfg.dit_lr,
        ema_decay=cfg.ema_decay,
        seed=cfg.seed,
        log_every=100,
        checkpoint_every=max(250, cfg.dit_steps // 3),
        sample_steps=cfg.sample_steps,
        sample_cfg=cfg.cfg_scale,
    )
    run = RunSettings(
        # The latent dataset's folder is the autoencoder id: a new autoencoder, a new run.
        name=f"demo-dit-{Path(data).name[:8]}",
        storage_path=str(runs),
        num_workers=cfg.num_workers,
        cpus_per_worker=0.5,
        register_as="svg-demo",
    )
    done = _finished_step(Path(run.run_uri) / "bundle", "bundle")
    if done >= cfg.dit_steps:
        p.log(f"run {run.name!r} already finished at step {done}: nothing to resume")
        return StageRun(f"{run.run_uri}/bundle", "already finished")
    return StageRun.of(launch_dit(tcfg, run))


def _sample_grid(cfg: DemoConfig, bundle: str, path: Path) -> None:
    import torch
    from PIL import Image

    from svg_ray.checkpoint import load_bundle
    from svg_ray.flow.samplers import SamplerConfig
    from svg_ray.generate import generate, image_grid, to_uint8

    dit, ae, info = load_bundle(bundle)
    per_class = 8
    ys = torch.arange(len(info.class_names)).repeat_interleave(per_class)
    scfg = SamplerConfig(steps=cfg.sample_steps, cfg_scale=cfg.cfg_scale)
    with torch.no_grad():
        imgs = generate(dit, ae, info.latent_stats, ys, list(range(len(ys))), scfg)
    Image.fromarray(image_grid(to_uint8(imgs), nrow=per_class).numpy()).save(path)


def _serve_one(cfg: DemoConfig, bundle: str, path: Path, p: _Progress) -> str:
    from ray import serve

    from serve.app import CPU_CONFIG, compose
    from svg_ray.serving import AppArgs
    from svg_ray.serving.deploy import load_serve_config

    scfg = load_serve_config(CPU_CONFIG)
    args = AppArgs.parse({**scfg.args, "model_uri": bundle})
    port = _free_port(cfg.port)
    if port != cfg.port:
        p.log(f"port {cfg.port} is taken; serving on {port}")
    url = f"http://127.0.0.1:{port}"
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(compose(args, scfg.deployments), name=scfg.name, route_prefix="/")
        p.log(f"endpoint up at {url}; POST {url}/v1/generate")
        body = {"label": 7, "count": 4, "steps": cfg.sample_steps, "seed": 0, "format": "png"}
        body["cfg_scale"] = cfg.cfg_scale
        req = urllib.request.Request(
            f"{url}/v1/generate",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        t0 = time.perf_counter()
        with urllib.request.urlopen(req, timeout=120) as r:
            png = r.read()
            status = r.status
        path.write_bytes(png)
        p.log(
            f"answered POST /v1/generate {json.dumps(body)}: HTTP {status}, "
            f"{len(png)} bytes PNG in {time.perf_counter() - t0:.2f} s -> {path}"
        )
    finally:
        serve.shutdown()
    return url


def run(cfg: DemoConfig) -> dict[str, Any]:
    """Run every stage (resuming what an earlier run finished); returns the summary."""
    from svg_ray import tracking
    from svg_ray.ray_cluster import ensure_ray

    p = _Progress()
    out = Path(cfg.out_dir).expanduser().resolve()
    fresh = not (out / "runs").exists()
    out.mkdir(parents=True, exist_ok=True)
    runs = out / "runs"
    tracking_uri = tracking.default_tracking_uri()
    p.log(
        f"{'fresh start' if fresh else 'found an earlier demo: resuming'} in {out}; "
        f"MLflow store {tracking_uri}"
    )

    p.stage(1, "digits -> image folder")
    images = _digits(out, p)

    ensure_ray()  # one local Ray for every stage (RAY_ADDRESS joins a running cluster instead)
    p.stage(2, f"train the autoencoder with Ray Train ({cfg.num_workers} workers)")
    ae = _train_autoencoder(cfg, images, runs, p)
    p.log(f"autoencoder: {ae.output}" + ae.metric("l1"))

    p.stage(3, "precompute latents with Ray Data")
    pre = _precompute(images, out, ae.output, p)
    p.log(pre.summary_line())

    p.stage(4, f"train the diffusion transformer with Ray Train ({cfg.num_workers} workers)")
    dit = _train_diffusion(cfg, pre.out, runs, p)
    p.log(f"sampler bundle: {dit.output}" + dit.metric("loss"))
    # A stable path for `svg-ray serve` (its default model) whatever the run is called.
    bundle = out / "bundle"
    shutil.rmtree(bundle, ignore_errors=True)
    shutil.copytree(dit.output, bundle)

    p.stage(5, "sample a grid (10 classes x 8, EMA weights)")
    grid = out / "samples.png"
    _sample_grid(cfg, str(bundle), grid)
    p.log(f"sample grid: {grid}")

    url = None
    if cfg.serve:
        p.stage(6, "Ray Serve endpoint: start, answer one request, stop")
        url = _serve_one(cfg, str(bundle), out / "served.png", p)
    else:
        p.stage(6, "Ray Serve endpoint: skipped (--no-serve)")

    summary = {
        "seconds": round(p.elapsed(), 1),
        "fresh": fresh,
        "out_dir": str(out),
        "images": str(images),
        "autoencoder": ae.output,
        "autoencoder_run": ae.to_dict(),
        "latents": pre.out,
        "latent_rows": pre.manifest.num_rows,
        "diffusion_run": dit.to_dict(),
        "bundle": str(bundle),
        "samples_png": str(grid),
        "served_png": str(out / "served.png") if cfg.serve else None,
        "endpoint": url,
        "tracking_uri": tracking_uri,
        "config": to_dict(cfg),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    _print_where(summary, p)
    return summary


def _print_where(s: dict[str, Any], p: _Progress) -> None:
    uri = s["tracking_uri"]
    ui = (
        f"mlflow ui --backend-store-uri {uri}  (then http://127.0.0.1:5000)"
        if uri.startswith("sqlite:")
        else uri
    )
    lines = [
        f"done in {s['seconds']:.0f} s ({'fresh run' if s['fresh'] else 'resumed'})",
        f"  storage folder : {s['out_dir']}  (images/, runs/, latents/, bundle/)",
        f"  training runs  : autoencoder {s['autoencoder_run']['state']}, "
        f"diffusion {s['diffusion_run']['state']} (same command again resumes)",
        f"  MLflow store   : {uri}",
        f"  MLflow UI      : {ui}",
        f"  sample grid    : {s['samples_png']}",
        f"  sampler bundle : {s['bundle']}  (registered as models:/svg-demo)",
    ]
    if s["endpoint"]:
        lines += [
            f"  endpoint       : {s['endpoint']}/v1/generate answered one request "
            f"({s['served_png']}); stopped with the demo",
            f"  serve it again : svg-ray serve --model-uri {s['bundle']}  -> {s['endpoint']}/",
        ]
    lines.append(f"  status         : svg-ray status --storage {s['out_dir']}")
    p.log("\n".join(lines))


COMMAND = Command("svg-ray demo", __doc__, [Section("demo", DemoConfig)])


def main(argv: list[str] | None = None) -> int:
    """CLI entry: ``svg-ray demo [--key value ...]`` with the keys of DemoConfig."""
    cfg = COMMAND.parse(argv)["demo"]
    # The stages print their own progress; Ray Data's bars would interleave with them.
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    import ray

    ours = not ray.is_initialized()  # shut down only the cluster this call starts
    try:
        run(cfg)
    finally:
        if ours and ray.is_initialized():
            ray.shutdown()
    return 0


if __name__ == "__main__":
    from svg_ray.cli import main as cli_main

    sys.exit(cli_main(["demo", *sys.argv[1:]]))
