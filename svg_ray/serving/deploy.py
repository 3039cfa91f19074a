"""Read a Serve config file (``serve/config*.yaml``) for code paths that do not go through
``serve run``/``serve deploy``: ``svg-ray serve``, the tests and the benchmark. The YAML stays the
one place where replicas, resources and autoscaling are set.

Also the checks ``svg-ray serve`` runs before it starts Ray (``check_model``, ``place_device``):
a missing bundle, an unknown registered model, version or alias, an unreachable tracking server
or a CUDA device that is not there fail in seconds with one line, not after replicas retried.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from svg_ray.config import ConfigError
from svg_ray.serving.config import AppArgs

SAMPLER_DEPLOYMENT = "SVGSampler"


@dataclass
class ServeFileConfig:
    """One application of a Serve config file."""

    name: str
    route_prefix: str
    import_path: str
    args: dict[str, Any]
    deployments: dict[str, dict[str, Any]]
    """Deployment name -> options for ``Deployment.options`` (the YAML keys, minus ``name``)."""
    http_options: dict[str, Any]


def load_serve_config(path: str | Path, app_name: str | None = None) -> ServeFileConfig:
    """Parse and validate a Serve config file with Ray's own schema; pick one application."""
    from ray.serve.schema import ServeDeploySchema

    if not Path(path).is_file():
        raise ConfigError(f"Serve config not found: {path} (--config)")
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as e:
        problem = " ".join(str(e).split())
        raise ConfigError(f"{path} is not valid YAML: {problem} (--config)") from None
    try:
        ServeDeploySchema.model_validate(raw)
    except Exception as e:  # pydantic's errors name the bad key: one line of them
        errors = getattr(e, "errors", None)
        problems = (
            "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in errors())
            if callable(errors)
            else " ".join(str(e).split())
        )
        raise ConfigError(f"{path} is not a valid Serve config: {problems} (--config)") from None
    apps = raw.get("applications") or []
    if app_name is not None:
        apps = [a for a in apps if a.get("name") == app_name]
    if len(apps) != 1:
        raise ConfigError(f"{path}: expected exactly one application (name={app_name!r})")
    app = apps[0]
    deployments = {}
    for d in app.get("deployments") or []:
        opts = dict(d)
        deployments[opts.pop("name")] = opts
    return ServeFileConfig(
        name=app.get("name", "default"),
        route_prefix=app.get("route_prefix", "/"),
        import_path=app["import_path"],
        args=dict(app.get("args") or {}),
        deployments=deployments,
        http_options=dict(raw.get("http_options") or {}),
    )


def check_model(args: AppArgs) -> tuple[AppArgs, str]:
    """Check that ``args.model_uri`` names a loadable sampler bundle, before Ray starts.

    Registry URIs are resolved against ``args.mlflow_tracking_uri`` (else MLFLOW_TRACKING_URI,
    else ./outputs/mlflow.db); the returned args carry that tracking URI, so every replica asks
    the same server. Returns (args, one line saying what will be served).
    """
    from svg_ray import storage
    from svg_ray.mlflow_model import SAMPLER
    from svg_ray.serving.source import is_registry_uri, resolve

    uri = args.model_uri
    if not is_registry_uri(uri):
        if not storage.exists(storage.join(uri, "bundle.json")):
            raise ConfigError(
                f"no sampler bundle at {uri}: pass --model-uri (svg-ray demo makes one)"
            )
        return args, f"bundle {uri}"
    model = resolve(uri, args.mlflow_tracking_uri or None, SAMPLER)
    args = dataclasses.replace(args, mlflow_tracking_uri=model.tracking_uri)
    run = f", run {model.run_id}" if model.run_id else ""
    return args, f"{uri}: version {model.version} of {model.name!r}{run}"


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when this machine has a CUDA device, else 'cpu'; a CUDA device asked
    for but absent is a ConfigError."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"--device {device}: this machine has no CUDA device (torch.cuda.is_available() is "
            "False); use --device cpu or auto"
        )
    return device


def place_device(
    args: AppArgs, deployments: dict[str, dict[str, Any]], device: str
) -> tuple[AppArgs, dict[str, dict[str, Any]]]:
    """Sample on ``device`` ('auto', 'cpu', 'cuda[:i]'): set it in the server config and, for
    CUDA, give each sampler replica its share of this machine's GPUs (Ray hides GPUs from
    actors that reserve none)."""
    import torch

    device = resolve_device(device)
    server = dataclasses.replace(args.server, device=device)
    args = dataclasses.replace(args, server=server)
    deployments = copy.deepcopy(deployments)
    if device.startswith("cuda"):
        opts = deployments.setdefault(SAMPLER_DEPLOYMENT, {})
        auto = opts.get("autoscaling_config") or {}
        replicas = int(auto.get("max_replicas") or opts.get("num_replicas") or 1)
        share = min(1.0, torch.cuda.device_count() / max(1, replicas))
        opts.setdefault("ray_actor_options", {})["num_gpus"] = share
    return args, deployments
