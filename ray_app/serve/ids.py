"""Model ids in serving: `NAME/VERSION`, `NAME@ALIAS`, a bare `VERSION` or `@ALIAS` (the default NAME).

Ids are parsed against a strict grammar and only ever used as registry keys, never as file paths.
"""

from __future__ import annotations

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
    match = _GRAMMAR.match(text.strip()) if isinstance(text, str) else None
    if match is None:
        raise BadModelId(
            f"model id {text!r} is not NAME/VERSION, NAME@ALIAS, VERSION or @ALIAS (e.g. 'projects-classifier/3', "
            "'@champion')"
        )
    if match["bare"]:
        return ModelRef(default_name, version=match["bare"])
    return ModelRef(match["name"] or default_name, version=match["version"], alias=match["alias"])


class Resolver:
    """Alias -> version through the MLflow registry, cached for `ttl_s` so a promotion shows within seconds.

    Concrete versions are checked once and cached for good: a version number never changes meaning.
    """

    def __init__(self, client, ttl_s: float, clock=time.monotonic) -> None:
        self._client = client
        self._ttl = ttl_s
        self._clock = clock
        self._aliases: dict[tuple[str, str], tuple[str, float]] = {}
        self._known: set[tuple[str, str]] = set()

    def cached(self, ref: ModelRef) -> ModelRef | None:
        """The answer without asking the registry, when it is known and fresh; None when `resolve` must ask."""
        if ref.alias is not None:
            hit = self._aliases.get((ref.name, ref.alias))
            return ModelRef(ref.name, version=hit[0], alias=ref.alias) if hit and hit[1] > self._clock() else None
        return ref if (ref.name, ref.version) in self._known else None

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
                raise UnknownModel(f"model {ref} is not in the registry") from None
            raise RegistryUnavailable(f"the model registry could not resolve {ref}: {exc.error_code}") from None
        except OSError as exc:
            raise RegistryUnavailable(f"the model registry is unreachable: {exc}") from None

    def _alias(self, name: str, alias: str) -> str:
        now = self._clock()
        hit = self._aliases.get((name, alias))
        if hit is not None and hit[1] > now:
            return hit[0]
        version = str(self._client.get_model_version_by_alias(name, alias).version)
        self._aliases[(name, alias)] = (version, now + self._ttl)
        return version
