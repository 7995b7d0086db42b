"""How training batches are formed from Ray Data blocks: rows of similar length together, each batch cut to its
longest real row. The loop and bench/train.py (which times it without Ray) both use these."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
import torch
from ray.data.collate_fn import NumpyBatchCollateFn


class TrimPadding(NumpyBatchCollateFn):
    """Dynamic padding: rows were padded to max_length in Ray Data; cut every batch to its longest real row."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        mask = batch["attention_mask"]
        width = max(int(mask.sum(axis=1).max()), 1)
        # torch.tensor copies: Ray's blocks are read-only, and sharing their memory (as_tensor, when the dtype already
        # matches) makes torch warn about a non-writable array on every batch.
        return {
            "input_ids": torch.tensor(batch["input_ids"][:, :width], dtype=torch.long),
            "attention_mask": torch.tensor(mask[:, :width], dtype=torch.long),
            "labels": torch.tensor(batch["labels"], dtype=torch.long),
        }


def length_bucketed(
    blocks: Iterable[dict[str, np.ndarray]], batch_size: int, rng: np.random.Generator
) -> Iterator[dict[str, torch.Tensor]]:
    """Each block of several batches' rows is sorted by length, cut into batches and served in random order.

    Rows of similar length share a batch, so trimming pads far less (about 40 % of tokens are padding with random
    batches on this data), while the shuffle buffer upstream still mixes which rows meet in a block.
    """
    collate = TrimPadding()
    for block in blocks:
        order = np.argsort(block["attention_mask"].sum(axis=1), kind="stable")
        chunks = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        for j in rng.permutation(len(chunks)):
            yield collate({k: v[chunks[j]] for k, v in block.items()})
