"""The pyfunc classes of svg-ray models: what ``mlflow.pyfunc.load_model`` instantiates.

A logged model's code file (written by ``svg_ray.mlflow_model.log_model``) is two lines that
hand one of these to ``mlflow.models.set_model``. They wrap the predictors in
``svg_ray.mlflow_model``, which imports no MLflow, so serving and training stay light.
"""

from typing import Any

import numpy as np
import pandas as pd
from mlflow.pyfunc import PythonModel

from svg_ray.mlflow_model import (
    ARTIFACT,
    AUTOENCODER,
    DEVICE_ENV,
    SAMPLER,
    AutoencoderPredictor,
    SamplerPredictor,
)


def _device() -> str:
    import os

    return os.environ.get(DEVICE_ENV, "auto")


class SamplerPyfunc(PythonModel):
    """A sampler bundle: one image per DataFrame row."""

    def load_context(self, context: Any) -> None:
        """Load the bundle onto SVG_RAY_DEVICE (default: CUDA when present, else CPU)."""
        self.impl = SamplerPredictor(context.artifacts[ARTIFACT[SAMPLER]], _device())

    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> np.ndarray:
        """uint8 images (N, H, W, 3), one per row of ``label`` [, seed, steps, cfg_scale]."""
        return self.impl.predict(model_input)


class AutoencoderPyfunc(PythonModel):
    """An autoencoder: ``params={"mode": "encode"}`` (default) or ``{"mode": "decode"}``."""

    def load_context(self, context: Any) -> None:
        """Load the autoencoder onto SVG_RAY_DEVICE (default: CUDA when present, else CPU)."""
        self.impl = AutoencoderPredictor(context.artifacts[ARTIFACT[AUTOENCODER]], _device())

    def predict(
        self, context: Any, model_input: np.ndarray, params: dict[str, Any] | None = None
    ) -> np.ndarray:
        """Latents (N, C, h, w) of images (N, H, W, 3) in [0, 1], or images of latents."""
        return self.impl.predict(model_input, str((params or {}).get("mode", "encode")))
