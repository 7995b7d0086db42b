"""A key's fixed place in [0, 1): the same key lands on the same side of every threshold, in every process and on
every machine (Python's `hash` is salted per process). The data split and the canary split both cut on it."""

from __future__ import annotations

import hashlib


def bucket(key: str) -> float:
    digest = hashlib.sha256(key.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64
