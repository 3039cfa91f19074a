"""Point a model-registry alias at a version: ``svg-ray promote NAME VERSION ALIAS``.

    svg-ray promote svg-xl 3 prod --tracking-uri http://mlflow.internal:5000
    svg-ray promote svg-xl latest prod          # the newest version
    svg-ray serve --model-uri models:/svg-xl@prod

The Serve configs deploy ``models:/svg-xl@prod``, so this one command decides what they serve (a
running application picks the new version up when its replicas restart or it is redeployed).
The same through MLflow: ``MlflowClient().set_registered_model_alias("svg-xl", "prod", "3")``.
"""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    """The arguments of ``svg-ray promote``."""
    p = argparse.ArgumentParser(prog="svg-ray promote", description=__doc__.splitlines()[0])
    p.add_argument("name", help="registered model name (svg-ray train --register-as NAME)")
    p.add_argument("version", help="version number, or 'latest' for the newest")
    p.add_argument("alias", help="alias to point at it, e.g. prod or staging")
    p.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow tracking URI (default: MLFLOW_TRACKING_URI or the sqlite store in ./outputs)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    """Check that the version exists, set the alias, print what it pointed at before."""
    from mlflow import MlflowClient

    from svg_ray.serving.source import resolve
    from svg_ray.tracking import check_alias, set_alias

    a = build_parser().parse_args(argv)
    check_alias(a.alias)
    model = resolve(f"models:/{a.name}/{a.version}", a.tracking_uri, option="--tracking-uri")
    client = MlflowClient(tracking_uri=model.tracking_uri, registry_uri=model.tracking_uri)
    before = client.get_registered_model(model.name).aliases.get(a.alias)
    set_alias(model.tracking_uri, model.name, model.version, a.alias)
    was = f" (was version {before})" if before and str(before) != model.version else ""
    run = f", run {model.run_id}" if model.run_id else ""
    print(
        f"[promote] models:/{model.name}@{a.alias} -> version {model.version}{was}: a "
        f"{model.kind}{run}"
    )
    if model.kind == "sampler":
        print(f"[promote] serve it: svg-ray serve --model-uri models:/{model.name}@{a.alias}")
    return 0


if __name__ == "__main__":
    from svg_ray.cli import main as cli_main

    sys.exit(cli_main(["promote", *sys.argv[1:]]))
