"""svg-ray models as MLflow pyfunc models: what ``mlflow.pyfunc.load_model`` and
``mlflow models serve`` run.

Two kinds (their PythonModel classes are in ``svg_ray/mlflow_pyfunc.py``):

- **sampler**: the sampler bundle directory (``svg_ray.checkpoint``) is the model's artifact
  ``bundle``. Input: a DataFrame with ``label`` and optional ``seed``, ``steps``, ``cfg_scale``
  (one image per row; a missing seed is the row index, so a prediction is reproducible). Output:
  uint8 images (N, H, W, 3). Sampling is ``serving.SamplerModel``'s, the code the Serve endpoint
  runs, with its defaults and bounds.
- **autoencoder**: ``autoencoder.safetensors`` is the artifact ``autoencoder``. Input: float32
  images (N, H, W, 3) in [0, 1] with ``params={"mode": "encode"}`` (the default), or latents
  (N, C, h, w) with ``{"mode": "decode"}``. Output: latents, or images in [0, 1].

The weights are the same files ``svg-ray serve --model-uri models:/...`` reads
(``serving/source.py`` finds them through the MLmodel file). The model is logged "from code":
MLflow runs a two-line file that instantiates a class of ``svg_ray/mlflow_pyfunc.py`` (around
the predictors here) at load time, nothing is unpickled, and the ``svg_ray``
package travels with the model (``code_paths``), so it loads wherever its pinned requirements are
installed. Nothing is downloaded at load: the DINO weights are inside the autoencoder file.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

SAMPLER = "sampler"
AUTOENCODER = "autoencoder"
KINDS = (SAMPLER, AUTOENCODER)
ARTIFACT = {SAMPLER: "bundle", AUTOENCODER: "autoencoder"}
"""Kind -> name of the pyfunc artifact holding the weights (a directory in both cases)."""
AE_FILE = "autoencoder.safetensors"
MODEL_KIND_TAG = "svg_ray.model_kind"
STEP_TAG = "svg_ray.step"
DEVICE_ENV = "SVG_RAY_DEVICE"
"""Device of a loaded pyfunc model: 'auto' (default: CUDA when present), 'cpu' or 'cuda[:i]'."""
PYFUNC_CLASS = {SAMPLER: "SamplerPyfunc", AUTOENCODER: "AutoencoderPyfunc"}
"""Kind -> its class in svg_ray.mlflow_pyfunc."""
MODEL_CODE = '''"""An svg-ray {kind} as an MLflow pyfunc model (written by svg_ray.mlflow_model)."""

from mlflow.models import set_model

from svg_ray.mlflow_pyfunc import {cls}

set_model({cls}())
'''
"""The model code MLflow runs at load time ("models from code": nothing is unpickled)."""

# Distributions the model's code imports at load and predict time (measured: the modules a
# loaded model pulls in), pinned to the versions installed where it was logged.
REQUIREMENTS = (
    "torch",
    "torchvision",
    "timm",
    "numpy",
    "pandas",
    "pillow",
    "safetensors",
    "pyarrow",
    "pydantic",
    "pyyaml",
)


def pip_requirements() -> list[str]:
    """``name==version`` of every requirement, as installed in this environment."""
    out = []
    for dist in REQUIREMENTS:
        version = importlib.metadata.version(dist).split("+", 1)[0]  # drop a local build tag
        out.append(f"{dist}=={version}")
    return out


# --------------------------------------------------------------------------------------------
# Signatures and input examples
# --------------------------------------------------------------------------------------------


def sampler_signature(resolution: int) -> Any:
    """label (+ optional seed, steps, cfg_scale) per row -> uint8 images (N, R, R, 3)."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema, TensorSpec

    inputs = Schema(
        [
            ColSpec("long", "label"),
            ColSpec("long", "seed", required=False),
            ColSpec("long", "steps", required=False),
            ColSpec("double", "cfg_scale", required=False),
        ]
    )
    outputs = Schema([TensorSpec(np.dtype(np.uint8), (-1, resolution, resolution, 3))])
    return ModelSignature(inputs=inputs, outputs=outputs)


def autoencoder_signature() -> Any:
    """float32 tensors in and out; ``mode`` ('encode' or 'decode') chooses the direction."""
    from mlflow.models import ModelSignature
    from mlflow.types import ParamSchema, ParamSpec, Schema, TensorSpec

    tensor = Schema([TensorSpec(np.dtype(np.float32), (-1, -1, -1, -1))])
    params = ParamSchema([ParamSpec("mode", "string", "encode")])
    return ModelSignature(inputs=tensor, outputs=tensor, params=params)


def _sampler_example(bundle_dir: str) -> tuple[Any, int]:
    """A two-row input example (labels 0 and 1, cheap settings) and the image resolution."""
    import pandas as pd

    meta = json.loads(Path(bundle_dir, "bundle.json").read_text())
    n_cls = int(meta["dit_config"]["num_classes"])
    example = pd.DataFrame(
        {
            "label": [0, min(1, n_cls - 1)],
            "seed": [0, 1],
            "steps": [2, 2],
            "cfg_scale": [4.0, 4.0],
        }
    )
    return example, int(meta["autoencoder_config"]["resolution"])


def _autoencoder_example(ae_file: str) -> tuple[np.ndarray, dict[str, str]]:
    """One mid-grey image at the checkpoint's resolution, to encode."""
    from svg_ray.checkpoint import read_metadata

    res = int(json.loads(read_metadata(ae_file)["config"])["resolution"])
    return np.full((1, res, res, 3), 0.5, dtype=np.float32), {"mode": "encode"}


# --------------------------------------------------------------------------------------------
# Logging
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _tracking(uri: str, experiment_id: str | None = None) -> Iterator[None]:
    """Use tracking ``uri`` (and ``experiment_id``) process-wide for the duration: Model.log and
    a sqlite registry read them from there, not from the client they are given."""
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    key = "MLFLOW_EXPERIMENT_ID"
    before = os.environ.get(key)
    if experiment_id is not None:
        os.environ[key] = experiment_id
    try:
        with _use_tracking_uri(uri):
            yield
    finally:
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before


def log_model(
    tracking_uri: str,
    run_id: str,
    kind: str,
    path: str,
    step: int,
    tags: dict[str, str] | None = None,
) -> str:
    """Log ``path`` (a bundle directory, or an autoencoder file) as a pyfunc model of ``run_id``.

    Returns the LoggedModel id. The model appears under the run's "Logged models" and in the
    experiment's Models tab; registering it is ``tracking.register_model``'s job.
    """
    import mlflow.pyfunc
    from mlflow import MlflowClient
    from mlflow.models import Model

    import svg_ray

    if kind not in KINDS:
        raise ValueError(f"unknown model kind {kind!r}; expected one of {KINDS}")
    with tempfile.TemporaryDirectory(prefix="svg-model-") as tmp:
        if kind == SAMPLER:
            files = path
            example, resolution = _sampler_example(path)
            signature, input_example = sampler_signature(resolution), example
        else:
            # The artifact is a directory holding the one file, so both kinds resolve alike.
            files = str(Path(tmp, ARTIFACT[AUTOENCODER]))
            os.makedirs(files)
            _link_or_copy(path, str(Path(files, AE_FILE)))
            signature, input_example = autoencoder_signature(), _autoencoder_example(path)
        code = Path(tmp, f"svg_ray_{kind}_model.py")
        code.write_text(MODEL_CODE.format(kind=kind, cls=PYFUNC_CLASS[kind]))
        all_tags = {MODEL_KIND_TAG: kind, STEP_TAG: str(step), **(tags or {})}
        experiment_id = MlflowClient(tracking_uri).get_run(run_id).info.experiment_id
        with _tracking(tracking_uri, experiment_id):
            info = Model.log(
                artifact_path=None,
                name=ARTIFACT[kind],
                flavor=mlflow.pyfunc,
                run_id=run_id,
                python_model=str(code),
                artifacts={ARTIFACT[kind]: files},
                code_paths=[str(Path(svg_ray.__file__).parent)],
                signature=signature,
                input_example=input_example,
                pip_requirements=pip_requirements(),
                tags=all_tags,
                step=step,
            )
    return str(info.model_id)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)  # no copy of a multi-GB file when it is on the same filesystem
    except OSError:
        import shutil

        shutil.copyfile(src, dst)


def weights_from_mlmodel(mlmodel: dict[str, Any], kind: str | None = None) -> tuple[str, str]:
    """(kind, artifact-relative weights directory) from a parsed MLmodel; ValueError if none."""
    artifacts = (mlmodel.get("flavors", {}).get("python_function", {}) or {}).get("artifacts")
    for k in (kind,) if kind else KINDS:
        entry = (artifacts or {}).get(ARTIFACT[str(k)])
        if entry:
            return str(k), str(entry["path"])
    wanted = f"a {kind}" if kind else "an svg-ray"
    raise ValueError(f"not {wanted} pyfunc model (no matching artifact in its MLmodel)")


# --------------------------------------------------------------------------------------------
# Predictors (what the pyfunc classes call; no MLflow import until an input is refused)
# --------------------------------------------------------------------------------------------


def _bad_input(message: str) -> Exception:
    from mlflow.exceptions import MlflowException

    return MlflowException.invalid_parameter_value(message)


class SamplerPredictor:
    """One image per DataFrame row, through the Serve endpoint's sampler and validation."""

    def __init__(self, bundle_dir: str, device: str) -> None:
        """Load the bundle in ``bundle_dir`` onto ``device`` ('auto', 'cpu', 'cuda[:i]')."""
        from svg_ray.serving import AppArgs, SamplerModel, ServerConfig

        self.model = SamplerModel.load(
            AppArgs(model_uri=bundle_dir, server=ServerConfig(device=device))
        )

    def predict(self, model_input: Any) -> np.ndarray:
        """uint8 images (N, H, W, 3) for rows of label [, seed, steps, cfg_scale]."""
        import pandas as pd

        from svg_ray.serving.schema import RequestError, parse_generate

        df = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        if "label" not in df.columns:
            raise _bad_input("input needs a 'label' column (class index per image)")
        jobs = []
        for i, row in enumerate(df.to_dict("records")):
            # numpy scalars -> Python values; the request schema then checks types strictly.
            body: dict[str, Any] = {"labels": [_plain(row["label"])], "seed": i}
            for key in ("seed", "steps", "cfg_scale"):
                value = row.get(key)
                if value is not None and not pd.isna(value):
                    body[key] = _plain(value)
            try:
                jobs.append(parse_generate(json.dumps(body).encode(), self.model.limits))
            except RequestError as e:
                raise _bad_input(f"row {i}: {e}") from None
        if not jobs:
            raise _bad_input("input has no rows")
        images, _ = self.model.sample_images(jobs)
        return np.stack([imgs[0] for imgs in images])  # (N, H, W, 3) uint8


def _plain(value: Any) -> Any:
    """A numpy/pandas scalar as the Python value it holds."""
    return value.item() if hasattr(value, "item") else value


class AutoencoderPredictor:
    """encode: images (N, H, W, 3) in [0, 1] -> latents; decode: latents -> images."""

    BATCH = 32

    def __init__(self, weights_dir: str, device: str) -> None:
        """Load ``weights_dir``/autoencoder.safetensors onto ``device``."""
        import torch

        from svg_ray.checkpoint import load_autoencoder
        from svg_ray.serving.sampler import torch_device

        self.device = torch_device(device)
        self.ae = load_autoencoder(str(Path(weights_dir, AE_FILE)), self.device)
        self.torch = torch

    def predict(self, model_input: Any, mode: str) -> np.ndarray:
        """Latents of images (mode 'encode') or images of latents ('decode'), float32."""
        torch = self.torch
        x = np.asarray(model_input, dtype=np.float32)
        res, (c, h, w) = self.ae.cfg.resolution, self.ae.latent_shape
        if mode == "encode" and (x.ndim != 4 or x.shape[1:] != (res, res, 3)):
            raise _bad_input(f"encode takes images (N, {res}, {res}, 3) in [0, 1], got {x.shape}")
        if mode == "decode" and (x.ndim != 4 or x.shape[1:] != (c, h, w)):
            raise _bad_input(f"decode takes latents (N, {c}, {h}, {w}), got {x.shape}")
        if mode not in ("encode", "decode"):
            raise _bad_input(f"params.mode must be 'encode' or 'decode', got {mode!r}")
        out = []
        with torch.no_grad():
            for i in range(0, len(x), self.BATCH):
                t = torch.from_numpy(x[i : i + self.BATCH]).to(self.device)
                if mode == "encode":
                    images = t.permute(0, 3, 1, 2) * 2 - 1  # (B, 3, R, R) in [-1, 1]
                    out.append(self.ae.encode(images).float().cpu())
                else:
                    images = self.ae.decode(t).clamp(-1, 1)  # (B, 3, R, R)
                    out.append(((images + 1) / 2).permute(0, 2, 3, 1).float().cpu())
        return torch.cat(out).numpy()
