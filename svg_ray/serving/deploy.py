"""Read a Serve config file (``serve/config*.yaml``) for code paths that do not go through
``serve run``/``serve deploy``: ``svg-ray serve``, the tests and the benchmark. The YAML stays the
one place where replicas, resources and autoscaling are set.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from svg_ray.config import ConfigError


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

    raw = yaml.safe_load(Path(path).read_text())
    try:
        ServeDeploySchema.model_validate(raw)
    except Exception as e:  # pydantic's message names the bad key
        raise ConfigError(f"{path} is not a valid Serve config: {e}") from e
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
