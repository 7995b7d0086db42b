"""Batches that take whatever queued while the previous forward pass ran: run now when idle, fill while busy.

Why not `@serve.batch`: in Ray 2.60 it cuts a batch when it is full or `batch_wait_timeout_s` after its first
request, and never waits for the forward pass that is running. A zero wait gives batches of one or two under load;
a long wait taxes every request at low load (bench/serve.py's numbers are in docs/serving.md: a 20 ms wait doubles
the concurrency-1 p50). Here one forward pass runs at a time per replica (two would share the same
cores and the same torch threads), a request that finds the replica idle runs at once, and the requests that
queued meanwhile go together in the next pass, up to `max_items` items and always for one model id.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

Run = Callable[[str, list[Any]], Awaitable[list[Any]]]


@dataclass
class _Waiting:
    payload: Any
    items: int
    future: asyncio.Future
    queued_at: float = field(default_factory=time.monotonic)


class DrainBatcher:
    """`submit(key, payload, items)` waits for `run(key, payloads)`'s answer for that payload; `run` sees payloads of
    one key only, at most `max_items` items in all (a single larger payload still runs, alone)."""

    def __init__(self, run: Run, max_items: int, wait_s: float = 0.0) -> None:
        self._run, self.max_items, self.wait_s = run, max_items, wait_s
        self._queues: dict[str, deque[_Waiting]] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self.running = 0  # items in the forward pass under way: a newcomer waits for it too

    def queued(self) -> int:
        """Items waiting for a forward pass (not counting the one running)."""
        return sum(w.items for q in self._queues.values() for w in q)

    async def submit(self, key: str, payload: Any, items: int) -> Any:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._drain())
        waiting = _Waiting(payload, items, asyncio.get_running_loop().create_future())
        self._queues.setdefault(key, deque()).append(waiting)
        self._wake.set()
        return await waiting.future

    def _next_key(self) -> str | None:
        """The key whose oldest request has waited longest, so no version starves behind a busy one."""
        heads = [(q[0].queued_at, key) for key, q in self._queues.items() if q]
        return min(heads)[1] if heads else None

    def _take(self, key: str) -> list[_Waiting]:
        queue, batch, items = self._queues[key], [], 0
        while queue and (not batch or items + queue[0].items <= self.max_items):
            waiting = queue.popleft()
            if waiting.future.done():  # its caller went away (cancelled): nothing to compute
                continue
            batch.append(waiting)
            items += waiting.items
        if not queue:
            del self._queues[key]
        return batch

    async def _drain(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self.wait_s > 0:  # only when the replica was idle: a busy one fills its next batch meanwhile
                await asyncio.sleep(self.wait_s)
            while (key := self._next_key()) is not None:
                batch = self._take(key)
                if batch:
                    await self._answer(key, batch)

    async def _answer(self, key: str, batch: list[_Waiting]) -> None:
        self.running = sum(w.items for w in batch)
        try:
            results = await self._run(key, [w.payload for w in batch])
        except Exception as exc:  # noqa: BLE001 - the batch's callers get the error; the loop serves the next batch
            for waiting in batch:
                if not waiting.future.done():
                    waiting.future.set_exception(exc)
            return
        finally:
            self.running = 0
        for waiting, result in zip(batch, results, strict=True):
            if not waiting.future.done():
                waiting.future.set_result(result)
