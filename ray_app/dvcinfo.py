"""The DVC version of a data file or directory, recorded in MLflow beside the data digest.

The digest says which rows a run used; the DVC hash says which version of the file they came from, the hash that
`dvc.lock` (a stage dependency such as the bundled CSV) or a `.dvc` file (data added with `dvc add`, such as a
feedback store) records, so `git checkout <rev> && dvc pull` brings those bytes back. Outside a DVC repository, or
when DVC cannot answer, nothing is recorded: a run never fails over bookkeeping.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("ray_app")
RECORDED, MODIFIED, NEW = "recorded", "modified", "new"


@dataclass(frozen=True)
class DvcVersion:
    """`md5`: DVC's hash of the content now (what `dvc repro` / `dvc add` writes); `recorded`: what the repository
    holds for it (several values when stages were reproduced at different versions); `source`: where."""

    path: str
    md5: str
    recorded: tuple[str, ...]
    source: str

    @property
    def status(self) -> str:
        if not self.recorded:
            return NEW
        return RECORDED if set(self.recorded) == {self.md5} else MODIFIED

    def tags(self, prefix: str) -> dict[str, str]:
        tags = {
            f"{prefix}.md5": self.md5,
            f"{prefix}.status": self.status,
            f"{prefix}.tracked_by": self.source,
            f"{prefix}.path": self.path,
        }
        if self.recorded:
            tags[f"{prefix}.recorded_md5"] = ",".join(self.recorded)
        return tags


def find_dvc_root(path: Path) -> Path | None:
    """The nearest directory at or above `path` holding `.dvc/`; checked before DVC is imported at all."""
    for candidate in (path, *path.parents):
        if (candidate / ".dvc").is_dir():
            return candidate
    return None


def dvc_version(path: str | None) -> DvcVersion | None:
    """The DVC version of a local path tracked by a `.dvc` file or named as a stage dependency; None otherwise."""
    if not path or "://" in path:
        return None
    target = Path(path).expanduser().resolve()
    root = find_dvc_root(target.parent) if target.exists() else None
    if root is None:
        return None
    try:
        return _lookup(root, target)
    except Exception as exc:  # noqa: BLE001 - any DVC failure (broken dvc.yaml, no git, a lock) only costs the tag
        log.info("no DVC version recorded for %s: %s: %s", path, type(exc).__name__, exc)
        return None


def _lookup(root: Path, target: Path) -> DvcVersion | None:
    from dvc.exceptions import OutputNotFoundError
    from dvc.repo import Repo
    from dvc.scm import SCM

    # A Ray job's working dir is an unpacked copy with .dvc/ but no .git: DVC reads dvc.lock and hashes the file
    # without git, where asking for one fails the lookup (an SCMError in every job's log).
    in_git = any((p / ".git").exists() for p in (root, *root.parents))
    with Repo(str(root), scm=None if in_git else SCM(str(root), no_scm=True)) as repo:
        try:  # data added with `dvc add`, or a stage output: its own .dvc file / dvc.lock entry
            out = repo.find_outs_by_path(str(target), strict=False)[0]
        except OutputNotFoundError:
            out = None
        if out is not None:
            recorded = (out.hash_info.value,) if out.hash_info and out.hash_info.value else ()
            source = _rel(out.stage.dvcfile.path, root)
            return DvcVersion(_rel(out.fs_path, root), out.get_hash().value, recorded, source)
        deps = [
            (stage, dep)
            for stage in repo.index.stages
            for dep in stage.deps
            if dep.protocol == "local" and dep.fs.isin_or_eq(str(target), dep.fs_path)
        ]
        if not deps:
            return None
        recorded = tuple(sorted({d.hash_info.value for _, d in deps if d.hash_info and d.hash_info.value}))
        names = ", ".join(sorted({s.name or s.addressing for s, _ in deps}))
        dep = deps[0][1]
        return DvcVersion(_rel(dep.fs_path, root), dep.get_hash().value, recorded, f"dvc.lock ({names})")


def _rel(fs_path: str, root: Path) -> str:
    return Path(fs_path).resolve().relative_to(root).as_posix()
