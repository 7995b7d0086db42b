"""A version's drift reference: built and logged when the version is registered, read back by every check.

The reference is the version's own answers on the held-out rows (validation and test, never the training rows, where
the model is over-confident, so fresh traffic would always look drifted), described by the same descriptors a check
computes on traffic; `describe` lives here so both sides use one code path. The registration path (`pipeline`)
imports this module, so it imports neither Evidently (seconds to import) nor the check.
"""

from __future__ import annotations

import re
import tempfile
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from ray_app.config import AppConfig
from ray_app.drift import EMBEDDING
from ray_app.errors import AppError
from ray_app.text import join_text

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from ray_app.model import TextClassifier

REFERENCE_TAG = "monitoring.reference"
REFERENCE_FILE = "reference.parquet"
_WORD = re.compile(r"\w+")


# ---- descriptors: the same code for the reference and for traffic ----------------------------------------------------


def wordpiece_share(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> np.ndarray:
    """Per text, the share of its words that the tokenizer cannot keep whole (cut into several pieces, or unknown).

    A rise means words the model never learned: new jargon, another language, garbled input. Computed here rather
    than with Evidently's out-of-vocabulary descriptor, which downloads word lists at run time."""
    words = [_WORD.findall(t) for t in texts]
    out = np.zeros(len(texts), dtype=np.float32)
    rows = [i for i, w in enumerate(words) if w]
    if not rows:
        return out
    enc = tokenizer([words[i] for i in rows], is_split_into_words=True, add_special_tokens=False)
    for j, i in enumerate(rows):
        pieces: Counter[int] = Counter()
        unknown = set()
        for token, word in zip(enc["input_ids"][j], enc.word_ids(j), strict=True):
            if word is not None:
                pieces[word] += 1
                if token == tokenizer.unk_token_id:
                    unknown.add(word)
        out[i] = sum(1 for w in range(len(words[i])) if pieces[w] > 1 or w in unknown) / len(words[i])
    return out


def describe(clf: TextClassifier, texts: list[str]) -> pd.DataFrame:
    """Length (as the prediction log counts it), word-piece share and the sentence embedding of each text."""
    return pd.DataFrame(
        {
            "text_chars": [len(t) for t in texts],
            "text_words": [len(t.split()) for t in texts],
            "wordpiece_share": wordpiece_share(clf.tokenizer, texts),
            EMBEDDING: list(clf.embed(texts)),
        }
    )


# ---- built at registration -------------------------------------------------------------------------------------------


def build_reference(
    clf: TextClassifier, rows: pd.DataFrame, text_columns: Sequence[str], id_column: str
) -> pd.DataFrame:
    """The version's own answers on held-out rows (`split`, `label` columns), described as traffic will be."""
    texts = join_text(rows, text_columns)  # what the Serve ingress builds from title and description
    probs = clf.predict_proba(texts)
    frame = pd.DataFrame(
        {
            "id": rows[id_column].astype(str).to_numpy(),
            "split": rows["split"].to_numpy(),
            "true_label": rows["label"].to_numpy(),
            "text": texts,
            "label": [clf.labels[i] for i in probs.argmax(axis=1)],
            "confidence": probs.max(axis=1),
        }
    )
    return pd.concat([frame, describe(clf, texts)], axis=1)


def log_reference(
    cfg: AppConfig, model_dir: str, splits, model_uri: str, held_out: tuple[str, ...] = ("val", "test")
) -> str:
    """Build the reference of a model being registered and log it into the active run, in a folder named after the
    logged model so two versions from one run never share one; returns its artifact path (the version's tag).
    `held_out` names the splits the model never trained on (a refit on train+val leaves only test)."""
    from ray_app.model import TextClassifier

    clf = TextClassifier.load(model_dir, cfg.data.max_length)
    rows = pd.concat([splits.frame(name).assign(split=name) for name in held_out], ignore_index=True)
    reference = build_reference(clf, rows, cfg.data.text_columns, cfg.data.id_column)
    folder = f"monitoring/{model_uri.rstrip('/').rsplit('/', 1)[-1]}"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / REFERENCE_FILE
        reference.to_parquet(path, index=False)
        mlflow.log_artifact(str(path), artifact_path=folder)
    return f"{folder}/{REFERENCE_FILE}"


# ---- read back at check time -----------------------------------------------------------------------------------------


def load_reference(name: str, version: str) -> tuple[pd.DataFrame, str]:
    """The reference `name` version `version` was registered with, and its artifact path (the version's tag)."""
    mv = MlflowClient().get_model_version(name, version)
    path = mv.tags.get(REFERENCE_TAG)
    if not path:
        raise AppError(
            f"model {name} version {version} has no drift reference (no '{REFERENCE_TAG}' tag): it was registered "
            "before monitoring existed or without `ray-app register`/`pipeline`. Register its checkpoint again "
            "(`ray-app register --checkpoint ... --run-id ...`) or retrain, and check the new version"
        )
    try:
        local = mlflow.artifacts.download_artifacts(run_id=mv.run_id, artifact_path=path)
        return pd.read_parquet(local), path
    except (MlflowException, OSError) as exc:
        raise AppError(
            f"the drift reference {path} of {name} version {version} (run {mv.run_id}) cannot be read: "
            f"{str(exc).splitlines()[0]}"
        ) from None
