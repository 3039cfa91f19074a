"""The sampler endpoint on Ray Serve: a FastAPI ingress and the SVG sampler deployment (.bind()).

    serve run serve/config_cpu.yaml                  # this machine (CPU)
    serve deploy serve/config.yaml                   # a GPU cluster (autoscaling values there)
    SVG_RAY_MODEL_URI=... serve run serve.app:app    # code defaults
    svg-ray serve --model-uri outputs/demo/bundle    # local Ray + Serve, blocks until Ctrl-C

Routes: GET / (playground), POST /v1/generate, GET /v1/model, GET /healthz, GET /docs and
GET /openapi.json (the API, with the server's bounds). Replica counts,
resources and autoscaling live in the YAML files; the values in the decorators are fallbacks.
"""

import argparse
import asyncio
import dataclasses
import logging
import signal
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, Response
from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle

from svg_ray import storage
from svg_ray.serving import AppArgs, GenerationJob, JobResult, Limits, SamplerModel
from svg_ray.serving.deploy import check_model, load_serve_config, place_device
from svg_ray.serving.http import handle_generate
from svg_ray.serving.openapi import DOCS_HTML, GENERATE_RESPONSES, openapi_schema
from svg_ray.serving.playground import PLAYGROUND_HTML
from svg_ray.serving.source import is_registry_uri

CPU_CONFIG = Path(__file__).resolve().parent / "config_cpu.yaml"
SAMPLER = "SVGSampler"
INGRESS = "SVGIngress"
log = logging.getLogger("ray.serve")


@serve.deployment(name=SAMPLER, max_ongoing_requests=8, ray_actor_options={"num_cpus": 1})
class SVGSampler:
    """Loads the bundle once per replica and samples batches of compatible requests."""

    def __init__(self, args: dict[str, Any]) -> None:
        self.args = AppArgs.parse(args)
        self.model = SamplerModel.load(self.args)
        info = self.model.describe()
        log.info(
            "loaded %s (from %s): DiT %s %d params, step %d, %d classes, on %s in %.1f s",
            info["model_uri"], info["location"], info["dit"]["size"], info["dit"]["params"],
            info["step"], info["num_classes"], info["device"], info["load_s"],
        )  # fmt: skip
        server = self.args.server
        # The decorator's values are fixed at import; the server config decides per deployment.
        self.generate.set_max_batch_size(server.max_batch_requests)  # type: ignore[attr-defined]
        self.generate.set_batch_wait_timeout_s(server.batch_wait_timeout_s)  # type: ignore[attr-defined]

    def describe(self) -> dict[str, Any]:
        """What this replica loaded."""
        return self.model.describe()

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def generate(self, jobs: list[GenerationJob]) -> list[JobResult]:
        """Run queued jobs together; each gets exactly what it would get alone."""
        # A worker thread keeps the event loop free to queue the next batch meanwhile.
        return await asyncio.to_thread(self.model.run, jobs)

    def check_health(self) -> None:
        """Serve restarts the replica when this raises."""
        self.model.check()


# FastAPI's own /docs pulls CDN assets; ours (and /openapi.json, with this server's bounds and
# the request schema the raw-body route cannot expose) are routes of the ingress below.
api = FastAPI(title="SVG sampler", docs_url=None, redoc_url=None, openapi_url=None)


@serve.deployment(name=INGRESS, max_ongoing_requests=64, ray_actor_options={"num_cpus": 0.25})
@serve.ingress(api)
class SVGIngress:
    """HTTP front: validation against the server's bounds, the playground, model info."""

    def __init__(self, sampler: DeploymentHandle, args: dict[str, Any]) -> None:
        self.sampler = sampler
        self.args = AppArgs.parse(args)
        self._model: dict[str, Any] | None = None
        self._openapi: dict[str, Any] | None = None

    async def _describe(self) -> dict[str, Any]:
        if self._model is None:  # every replica serves the same bundle: ask once
            self._model = await self.sampler.describe.remote()
        return self._model

    async def _submit(self, job: GenerationJob) -> JobResult:
        return await self.sampler.generate.remote(job)

    @api.get("/", response_class=HTMLResponse, include_in_schema=False)
    def playground(self) -> HTMLResponse:
        """The playground page."""
        return HTMLResponse(PLAYGROUND_HTML)

    @api.get("/docs", response_class=HTMLResponse, include_in_schema=False)
    def docs(self) -> HTMLResponse:
        """The API reference page (renders /openapi.json; no external assets)."""
        return HTMLResponse(DOCS_HTML)

    @api.get("/openapi.json", include_in_schema=False)
    def openapi(self) -> dict[str, Any]:
        """The OpenAPI document."""
        if self._openapi is None:
            self._openapi = openapi_schema(api, self.args.server)
        return self._openapi

    @api.get("/healthz")
    async def healthz(self) -> dict[str, Any]:
        """Ready once a sampler replica has loaded its model."""
        return {"status": "ok", "model_uri": (await self._describe())["model_uri"]}

    @api.get("/v1/model")
    async def model(self) -> dict[str, Any]:
        """Model size, checkpoint, training step, classes, defaults and limits."""
        return await self._describe()

    @api.post("/v1/generate", response_model=None, responses=GENERATE_RESPONSES)
    async def generate(self, request: Request) -> Response:
        """Class-conditional samples as base64 PNGs in JSON, or one image/png."""
        limits = Limits(self.args.server, (await self._describe())["num_classes"])
        return await handle_generate(request, limits, self._submit)


def compose(args: AppArgs, deployments: dict[str, dict[str, Any]] | None = None) -> Application:
    """The application, with optional per-deployment options (as in a config's deployments:)."""
    opts = deployments or {}
    uri = args.model_uri
    if not (is_registry_uri(uri) or storage.is_s3(uri)):
        # Replicas may run in another directory: pin a local path where the app is built.
        args = dataclasses.replace(args, model_uri=str(Path(uri).expanduser().resolve()))
    # mypy sees the decorated classes as plain classes; they are serve Deployments.
    sampler = SVGSampler.options(**opts.get(SAMPLER, {})).bind(args.to_dict())  # type: ignore[attr-defined]
    return SVGIngress.options(**opts.get(INGRESS, {})).bind(sampler, args.to_dict())  # type: ignore[attr-defined]


def build_app(args: dict[str, Any]) -> Application:
    """Serve application builder: ``import_path: serve.app:build_app`` with ``args:``."""
    return compose(AppArgs.parse(args))


app = build_app({})


def _stop(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def build_parser() -> argparse.ArgumentParser:
    """The flags of ``svg-ray serve`` (built without starting anything)."""
    p = argparse.ArgumentParser(prog="svg-ray serve", description=__doc__.splitlines()[0])
    p.add_argument(
        "--model-uri", "--bundle", dest="model_uri", default="",
        help="bundle dir, s3://..., models:/<name>/<version>, models:/<name>/latest or "
        "models:/<name>@<alias> (default: the config's)",
    )  # fmt: skip
    p.add_argument(
        "--config", default=str(CPU_CONFIG),
        help="Serve config: replicas, resources, limits, HTTP (default: serve/config_cpu.yaml)",
    )  # fmt: skip
    p.add_argument("--host", default=None, help="HTTP host (default: the config's, else 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="HTTP port (default: the config's)")
    p.add_argument(
        "--tracking-uri", "--mlflow-tracking-uri", dest="tracking_uri", default="",
        help="MLflow server for models:/ URIs (default: MLFLOW_TRACKING_URI)",
    )  # fmt: skip
    p.add_argument("--num-cpus", type=int, default=None, help="logical CPUs of the local Ray")
    p.add_argument(
        "--device", default="auto",
        help="where replicas sample: auto (CUDA when this machine has it), cpu, cuda or cuda:<i>",
    )  # fmt: skip
    return p


def main(argv: list[str] | None = None) -> int:
    """``svg-ray serve``: local Ray + Serve with the CPU config, print the URL, block."""
    a = build_parser().parse_args(argv)

    # Everything that can be wrong is checked here, in seconds, before Ray starts.
    cfg = load_serve_config(a.config)
    overrides = {"model_uri": a.model_uri, "mlflow_tracking_uri": a.tracking_uri}
    args = AppArgs.parse({**cfg.args, **{k: v for k, v in overrides.items() if v}})
    args, deployments = place_device(args, cfg.deployments, a.device)
    args, what = check_model(args)
    http = {"host": "127.0.0.1", "port": 8000, **cfg.http_options}
    http.update({k: v for k, v in {"host": a.host, "port": a.port}.items() if v is not None})

    import ray

    from svg_ray.ray_cluster import ensure_ray

    ensure_ray(a.num_cpus, address="")  # the endpoint runs on this machine's own Ray
    signal.signal(signal.SIGTERM, _stop)
    try:
        serve.start(http_options=http)
        serve.run(compose(args, deployments), name=cfg.name, route_prefix=cfg.route_prefix)
        url = f"http://{http['host']}:{http['port']}{cfg.route_prefix}"
        print(
            f"SVG sampler: {url} (playground at /, API docs at /docs), model {what}, on "
            f"{args.server.device}; Ctrl-C stops",
            flush=True,
        )
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
