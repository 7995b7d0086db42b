"""The pool's batcher on its own (plain asyncio): idle runs at once, busy fills the next batch, one key per batch."""

from __future__ import annotations

import asyncio

import pytest

from ray_app.serve.batcher import DrainBatcher


class Recorder:
    """A forward pass that takes `seconds` and answers each payload with (key, payload); it records every batch."""

    def __init__(self, seconds: float = 0.05, fail_on: str | None = None) -> None:
        self.seconds, self.fail_on, self.batches = seconds, fail_on, []

    async def __call__(self, key: str, payloads: list) -> list:
        self.batches.append((key, list(payloads)))
        await asyncio.sleep(self.seconds)
        if key == self.fail_on:
            raise RuntimeError(f"{key} failed")
        return [(key, p) for p in payloads]


def test_a_request_that_finds_the_batcher_idle_runs_at_once_and_the_rest_fill_the_next_pass() -> None:
    async def go():
        run = Recorder(seconds=0.05)
        batcher = DrainBatcher(run, max_items=32)
        first = asyncio.create_task(batcher.submit("m", 0, 1))
        await asyncio.sleep(0.01)  # the first pass is running now
        rest = [asyncio.create_task(batcher.submit("m", i, 1)) for i in range(1, 8)]
        answers = await asyncio.gather(first, *rest)
        return run.batches, answers

    batches, answers = asyncio.run(go())
    assert [len(p) for _, p in batches] == [1, 7]
    assert answers == [("m", i) for i in range(8)]


def test_batches_hold_one_key_and_at_most_max_items_without_splitting_a_request() -> None:
    async def go():
        run = Recorder(seconds=0.02)
        batcher = DrainBatcher(run, max_items=8)
        blocker = asyncio.create_task(batcher.submit("a", "blocker", 1))
        await asyncio.sleep(0.005)
        sizes = [3, 3, 3, 5, 8]
        tasks = [asyncio.create_task(batcher.submit("ab"[i % 2], (i, n), n)) for i, n in enumerate(sizes)]
        results = await asyncio.gather(blocker, *tasks)
        return run.batches, results, sizes

    batches, results, sizes = asyncio.run(go())
    for key, payloads in batches[1:]:
        assert all(ord(key) - ord("a") == i % 2 for i, _ in payloads), (key, payloads)
        assert sum(n for _, n in payloads) <= 8
    assert sorted(p for _, ps in batches[1:] for p in ps) == sorted(enumerate(sizes))
    assert results[1:] == [("ab"[i % 2], (i, n)) for i, n in enumerate(sizes)]


def test_the_oldest_waiting_key_goes_first_so_no_version_starves() -> None:
    async def go():
        run = Recorder(seconds=0.02)
        batcher = DrainBatcher(run, max_items=2)
        tasks = [asyncio.create_task(batcher.submit("busy", 0, 1))]
        await asyncio.sleep(0.005)
        tasks.append(asyncio.create_task(batcher.submit("rare", "r", 1)))
        await asyncio.sleep(0.001)
        tasks += [asyncio.create_task(batcher.submit("busy", i, 1)) for i in range(1, 7)]
        await asyncio.gather(*tasks)
        return [key for key, _ in run.batches]

    assert asyncio.run(go())[:2] == ["busy", "rare"]


def test_a_failed_pass_fails_its_own_callers_only_and_the_batcher_goes_on() -> None:
    async def go():
        run = Recorder(seconds=0.02, fail_on="bad")
        batcher = DrainBatcher(run, max_items=32)
        bad = asyncio.create_task(batcher.submit("bad", 1, 1))
        good = asyncio.create_task(batcher.submit("good", 2, 1))
        with pytest.raises(RuntimeError, match="bad failed"):
            await bad
        later = await batcher.submit("good", 3, 1)
        return await good, later

    assert asyncio.run(go()) == (("good", 2), ("good", 3))


def test_a_caller_that_went_away_is_not_computed() -> None:
    async def go():
        run = Recorder(seconds=0.05)
        batcher = DrainBatcher(run, max_items=32)
        first = asyncio.create_task(batcher.submit("m", "first", 1))
        await asyncio.sleep(0.01)
        gone = asyncio.create_task(batcher.submit("m", "gone", 1))
        kept = asyncio.create_task(batcher.submit("m", "kept", 1))
        await asyncio.sleep(0)
        gone.cancel()
        await asyncio.gather(first, kept)
        return run.batches

    assert [p for _, p in asyncio.run(go())] == [["first"], ["kept"]]


def test_batching_off_is_one_request_per_pass() -> None:
    async def go():
        run = Recorder(seconds=0.01)
        batcher = DrainBatcher(run, max_items=1)
        await asyncio.gather(*[batcher.submit("m", i, 1) for i in range(4)])
        return run.batches

    assert [len(p) for _, p in asyncio.run(go())] == [1, 1, 1, 1]


def test_the_pass_under_way_is_counted_apart_from_the_queue() -> None:
    """The pool's wait bound adds `running` to `queued()`: a newcomer waits for the pass under way too."""

    async def go():
        batcher = DrainBatcher(Recorder(seconds=0.05), max_items=32)
        first = asyncio.create_task(batcher.submit("m", 0, 3))
        await asyncio.sleep(0.01)
        rest = [asyncio.create_task(batcher.submit("m", i, 2)) for i in range(1, 3)]
        await asyncio.sleep(0)
        during = (batcher.running, batcher.queued())
        await asyncio.gather(first, *rest)
        return during, (batcher.running, batcher.queued())

    during, after = asyncio.run(go())
    assert during == (3, 4) and after == (0, 0)
