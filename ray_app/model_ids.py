"""Model ids in serving: `NAME/VERSION`, `NAME@ALIAS`, a bare `VERSION` or `@ALIAS` (the default NAME).

Ids are parsed against a strict grammar and only ever used as registry keys, never as file paths.
"""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass

_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}"
_VERSION = r"[1-9][0-9]{0,8}"
_ALIAS = r"[A-Za-z][A-Za-z0-9_-]{0,63}"
_GRAMMAR = re.compile(
    rf"^(?:(?P<name>{_NAME})?(?:/(?P<version>{_VERSION})|@(?P<alias>{_ALIAS}))|(?P<bare>{_VERSION}))$"
)


# The same grammar for JSON Schema (ECMA-262 has no named groups): published in /openapi.json for clients.
SCHEMA_PATTERN = re.sub(r"\?P<\w+>", "?:", _GRAMMAR.pattern)


class BadModelId(ValueError):
    """The id does not follow the grammar (a client's mistake: 422)."""


class UnknownModel(LookupError):
    """The registry has no such name, version or alias (404)."""


class RegistryUnavailable(RuntimeError):
    """The registry could not be asked (503)."""


@dataclass(frozen=True)
class ModelRef:
    name: str
    version: str | None = None
    alias: str | None = None

    @property
    def concrete(self) -> str:
        """The multiplexed model id replicas cache by: always NAME/VERSION."""
        assert self.version is not None, "resolve the alias first"
        return f"{self.name}/{self.version}"

    def __str__(self) -> str:
        return f"{self.name}/{self.version}" if self.version else f"{self.name}@{self.alias}"


def parse_model_id(text: str, default_name: str) -> ModelRef:
    match = _GRAMMAR.fullmatch(text) if isinstance(text, str) else None
    if match is None:
        raise BadModelId(
            f"model id {text!r} is not NAME/VERSION, NAME@ALIAS, VERSION or @ALIAS (e.g. 'projects-classifier/3', "
            "'@champion')"
        )
    if match["bare"]:
        return ModelRef(default_name, version=match["bare"])
    return ModelRef(match["name"] or default_name, version=match["version"], alias=match["alias"])


NEWEST_TTL_S = 1.0  # how long a model's newest version number decides that higher numbers are unknown


class Resolver:
    """Alias -> version through the MLflow registry, cached for `ttl_s` so a promotion shows within seconds.

    Concrete versions are checked once and cached until a load of theirs fails (`forget`): a version number never
    changes meaning, but it can be deleted. Ids the registry does not know are cached as unknown for `ttl_s` too, so
    a flood of them is answered without asking again; and a miss also asks for the model's newest version number,
    so for NEWEST_TTL_S every number above it is unknown without a lookup (a flood of new numbers costs two registry
    calls a second, not one per id). A version registered meanwhile is servable by number a second later at most.
    """

    def __init__(self, client, ttl_s: float, clock=time.monotonic) -> None:
        self._client = client
        self._ttl = ttl_s
        self._clock = clock
        self._aliases: dict[tuple[str, str], tuple[str, float]] = {}
        self._known: set[tuple[str, str]] = set()
        self._unknown: dict[ModelRef, float] = {}
        self._newest: dict[str, tuple[int, float]] = {}  # name -> (newest version number, valid until)

    def cached(self, ref: ModelRef) -> ModelRef | None:
        """The answer without asking the registry, when it is known and fresh; None when `resolve` must ask.
        Raises UnknownModel for an id the registry said it does not have, within `ttl_s` of saying so."""
        if self._unknown.get(ref, 0.0) > self._clock():
            raise UnknownModel(f"model {ref} is not in the registry")
        if ref.alias is not None:
            hit = self._aliases.get((ref.name, ref.alias))
            return ModelRef(ref.name, version=hit[0], alias=ref.alias) if hit and hit[1] > self._clock() else None
        if (ref.name, ref.version) in self._known:
            return ref
        newest, until = self._newest.get(ref.name, (0, 0.0))
        if until > self._clock() and int(ref.version) > newest:
            raise UnknownModel(f"model {ref} is not in the registry (its newest version is {newest or 'none'})")
        return None

    def stale(self, ref: ModelRef) -> ModelRef | None:
        """An alias's last answer even past its TTL: served while a refresh runs, so known traffic never waits."""
        hit = self._aliases.get((ref.name, ref.alias)) if ref.alias is not None else None
        return ModelRef(ref.name, version=hit[0], alias=ref.alias) if hit else None

    def forget(self, ref: ModelRef) -> None:
        """The version failed to load: ask the registry again next time (it may have been deleted: then 404)."""
        if ref.version is not None:
            self._known.discard((ref.name, ref.version))

    def resolve(self, ref: ModelRef) -> ModelRef:
        from mlflow.exceptions import MlflowException

        try:
            if ref.alias is not None:
                return ModelRef(ref.name, version=self._alias(ref.name, ref.alias), alias=ref.alias)
            if (ref.name, ref.version) not in self._known:
                self._client.get_model_version(ref.name, ref.version)
                self._known.add((ref.name, ref.version))
            return ref
        except MlflowException as exc:
            if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
                self._unknown[ref] = self._clock() + self._ttl
                if ref.version is not None:
                    self._look_up_newest(ref.name)
                if ref.alias is not None:  # the alias was removed: its last answer must not be served any more
                    self._aliases.pop((ref.name, ref.alias), None)
                if len(self._unknown) > 10_000:  # bounded: drop what has expired
                    now = self._clock()
                    self._unknown = {k: t for k, t in self._unknown.items() if t > now}
                raise UnknownModel(f"model {ref} is not in the registry") from None
            raise RegistryUnavailable(f"the model registry could not resolve {ref}: {exc.error_code}") from None
        except OSError as exc:
            raise RegistryUnavailable(f"the model registry is unreachable: {exc}") from None

    def _look_up_newest(self, name: str) -> None:
        """The newest version number of `name` (0: no such model), valid for NEWEST_TTL_S; best effort."""
        from mlflow.exceptions import MlflowException

        try:
            found = self._client.search_model_versions(
                f"name='{name}'", max_results=1, order_by=["version_number DESC"]
            )
        except (MlflowException, OSError):
            return  # the next miss asks again; the id itself is already cached as unknown
        now = self._clock()
        if len(self._newest) > 10_000:  # bounded, as the unknown ids are: a flood of new names expires
            self._newest = {k: v for k, v in self._newest.items() if v[1] > now}
        self._newest[name] = (int(found[0].version) if found else 0, now + min(self._ttl, NEWEST_TTL_S))

    def _alias(self, name: str, alias: str) -> str:
        now = self._clock()
        hit = self._aliases.get((name, alias))
        if hit is not None and hit[1] > now:
            return hit[0]
        version = str(self._client.get_model_version_by_alias(name, alias).version)
        self._aliases[(name, alias)] = (version, now + self._ttl)
        return version


def resolve_once(model_id: str, default_name: str) -> tuple[str, str]:
    """One id -> (name, concrete version), uncached, for a job that pins a version at its start (batch inference,
    a drift check), so an alias moved half-way through never mixes two versions. Errors are the user's to read."""
    from mlflow.tracking import MlflowClient

    from ray_app.errors import AppError

    try:
        ref = Resolver(MlflowClient(), ttl_s=0).resolve(parse_model_id(model_id, default_name))
    except BadModelId as exc:
        raise AppError(str(exc)) from None
    except UnknownModel as exc:
        raise AppError(f"{exc}; list versions and aliases in the MLflow UI (or check registry.model_name)") from None
    except RegistryUnavailable as exc:
        raise AppError(f"{exc}; check mlflow.tracking_uri / MLFLOW_TRACKING_URI") from None
    return ref.name, str(ref.version)


class RegistryBusy(RuntimeError):
    """More registry lookups are in flight or waiting in this replica than it allows (503, retry later)."""


class Lookups:
    """Registry lookups off the event loop, bounded and shared: one lookup per id however many requests ask for it
    at once, at most `threads` at a time, at most `max_pending` ids in flight or waiting, and at most `per_s` new
    ids asked about per second (a token bucket); beyond either bound, at once, `RegistryBusy`. A flood of unknown
    ids then costs a bounded share of the registry (and of the CPU it shares with the replicas) and never the known
    traffic, which is answered from the cache (an alias past its TTL from its last answer, refreshed in the
    background, outside the rate)."""

    def __init__(
        self, resolver: Resolver, threads: int = 2, max_pending: int = 8, per_s: float = 10.0, clock=time.monotonic
    ) -> None:
        import concurrent.futures

        self.resolver, self.max_pending, self.per_s, self._clock = resolver, max_pending, per_s, clock
        self._executor = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="registry")
        self._pending: dict[ModelRef, asyncio.Future] = {}
        self._tokens, self._filled_at = per_s, clock()

    async def resolve(self, ref: ModelRef) -> ModelRef:
        hit = self.resolver.cached(ref)  # raises UnknownModel for a recent miss
        if hit is not None:
            return hit
        stale = self.resolver.stale(ref)
        if stale is not None:
            if ref not in self._pending and len(self._pending) < self.max_pending:
                self._start(ref).add_done_callback(lambda f: f.cancelled() or f.exception())  # seen, not raised
            return stale
        pending = self._pending.get(ref)
        if pending is None:
            self._take_token()
            pending = self._start(ref)
        return await asyncio.shield(pending)

    def _take_token(self) -> None:
        now = self._clock()
        self._tokens = min(self.per_s, self._tokens + (now - self._filled_at) * self.per_s)
        self._filled_at = now
        if self._tokens < 1:
            raise RegistryBusy(f"more than {self.per_s:g} new model ids a second are being looked up in this replica")
        self._tokens -= 1

    def _start(self, ref: ModelRef) -> asyncio.Future:
        if len(self._pending) >= self.max_pending:
            raise RegistryBusy(f"{len(self._pending)} registry lookups are in flight in this replica")
        future = asyncio.get_running_loop().run_in_executor(self._executor, self.resolver.resolve, ref)
        self._pending[ref] = future
        future.add_done_callback(lambda _: self._pending.pop(ref, None))
        return future
