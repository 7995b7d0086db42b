"""The MLflow model: a plain `mlflow.pyfunc.load_model(...).predict(frame)` runs the shared predict path.

Kept apart from the rest of the package so that loading a registered model imports only torch and transformers.
"""

from __future__ import annotations

import mlflow.pyfunc
import pandas as pd

from ray_app.model import TextClassifier


class ClassifierModel(mlflow.pyfunc.PythonModel):
    """Input: a frame with the text columns (title, description); output: `label` and `prob_<label>` columns."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        config = context.model_config or {}
        self.text_columns: list[str] = list(config.get("text_columns", ["title", "description"]))
        self.classifier = TextClassifier.load(context.artifacts["model_dir"], max_length=config.get("max_length", 128))

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        missing = [c for c in self.text_columns if c not in model_input.columns]
        if missing:
            raise ValueError(f"input lacks column(s) {missing}; the model reads {self.text_columns}")
        return self.classifier.predict_frame(model_input, self.text_columns).reset_index(drop=True)
