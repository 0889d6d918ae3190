"""Where a local path in a job may point, and what a name that is not local means.

A value is either a local path inside an allowed root (returned absolute), a
Hugging Face Hub id (returned unchanged), or a problem. Pure: the only I/O is
asking whether a candidate path exists.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
DATA_FILE_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet", ".arrow", ".txt", ".tsv")
REMOTE_DATA_SCHEMES = ("s3://", "gs://", "gcs://", "az://", "abfs://", "oci://")


# Names the worker gives its own files beside a run: never a run id, never readable.
LOCK_SUFFIX = ".lock"
SET_ASIDE_MARKER = ".previous-"
# The worker's own directories on the volume.
RUNS_DIR = "runs"
CACHE_DIR = "cache"


@dataclass(frozen=True)
class PathRoots:
    """`allowed`: where local paths may point, less `denied` (the worker's own
    directories and other users' runs), plus `granted` (this job's user's runs).
    `lookup`: where relative paths are searched."""

    allowed: tuple[Path, ...]
    lookup: tuple[Path, ...]
    denied: tuple[Path, ...] = ()
    granted: tuple[Path, ...] = ()

    def contains(self, path: Path) -> bool:
        if any(part.endswith(LOCK_SUFFIX) or SET_ASIDE_MARKER in part for part in self._run_parts(path)):
            return False
        if any(_within(root, path) for root in self.denied):
            return False  # a folder that holds the worker's own (the volume itself, "runs")
        if any(_within(path, root) for root in self.granted):
            return True
        if any(_within(path, root) for root in self.denied):
            return False
        return any(_within(path, root) for root in self.allowed)

    def _run_parts(self, path: Path) -> tuple[str, ...]:
        for root in (*self.granted, *self.denied):
            if root.name == RUNS_DIR and _within(path, root):
                return path.relative_to(root).parts
        return ()

    def describe(self) -> str:
        return ", ".join(str(r) for r in self.allowed)


def _within(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def make_roots(base_volume: Path, examples_dir: Path, user_id: str | None = None) -> PathRoots:
    """A job reads the volume (less the worker's runs and caches), its own user's
    runs, and the worker's bundled examples."""
    volume = base_volume.resolve()
    runs = volume / RUNS_DIR
    granted = (runs / user_id,) if user_id else ()
    return PathRoots(
        allowed=(volume, examples_dir.resolve()),
        lookup=(volume, examples_dir.resolve().parent),
        denied=(runs, volume / CACHE_DIR),
        granted=granted,
    )


class PathRejected(ValueError):
    pass


def resolve_local_or_hub(value: str, roots: PathRoots, *, remote_ok: bool = False, url_ok: bool = False) -> str:
    """Return an absolute local path, or the value itself when it names a Hub repo
    (or, with `remote_ok`, a cloud bucket; with `url_ok`, an https URL)."""
    try:
        return _resolve_local_or_hub(value, roots, remote_ok=remote_ok, url_ok=url_ok)
    except OSError as exc:  # a name too long, a loop of links, a component that is a file...
        reason = exc.strerror or type(exc).__name__
        raise PathRejected(f"cannot be used as a path on this machine ({reason})") from None


def _resolve_local_or_hub(value: str, roots: PathRoots, *, remote_ok: bool, url_ok: bool) -> str:
    if not isinstance(value, str) or not value.strip():
        raise PathRejected("must be a non-empty string")
    if "://" in value:
        if remote_ok and value.startswith(REMOTE_DATA_SCHEMES):
            return value
        if url_ok and is_https_url(value):
            return value
        hint = "an https URL, " if url_ok else ""
        raise PathRejected(f"this URL is not accepted here; use {hint}a Hub id or a path on the volume")
    if "\x00" in value:
        raise PathRejected("contains a NUL character")
    pure = PurePosixPath(value)
    if ".." in pure.parts:
        raise PathRejected("must not contain '..'")
    if pure.is_absolute():
        resolved = Path(value).resolve()
        if not any(_within(resolved, root) for root in roots.allowed):
            raise PathRejected(f"absolute paths must be inside the allowed roots ({roots.describe()})")
        if not roots.contains(resolved) or not resolved.exists():
            # Another user's run answers exactly like a path that does not exist.
            raise PathRejected(f"no such file or directory: {value}")
        return str(resolved)
    for base in roots.lookup:
        candidate = (base / value).resolve()
        if not candidate.exists() or (_within(candidate, base) and not roots.contains(candidate)):
            continue
        if not roots.contains(candidate):
            raise PathRejected(f"resolves outside the allowed roots ({roots.describe()}), through a symlink")
        return str(candidate)
    if HUB_ID.match(value) and not value.lower().endswith(DATA_FILE_SUFFIXES):
        return value
    raise PathRejected(
        f"not found under {roots.describe()} and not a Hugging Face Hub id (owner/name)"
    )


def is_https_url(value: str) -> bool:
    parts = urlsplit(value)
    return parts.scheme == "https" and bool(parts.hostname) and not parts.username and not parts.password


# How many entries a dataset folder's walk looks at before it gives up (and refuses).
MAX_FOLDER_ENTRIES = 20_000


def worker_files_problem(resolved: str, roots: PathRoots) -> str | None:
    """A folder of the user's own runs area that holds the worker's lock files or
    set-aside attempts (at any depth) is refused: a job never reads them. Folders
    elsewhere on the volume cannot hold them and are not walked."""
    folder = Path(resolved)
    if not any(_within(folder, root) for root in roots.granted) or not folder.is_dir():
        return None
    seen = 0
    for _, dirs, files in os.walk(folder):
        for name in (*dirs, *files):
            seen += 1
            if name.endswith(LOCK_SUFFIX) or SET_ASIDE_MARKER in name:
                return (f"this folder holds the worker's lock files or set-aside attempts ({name}); "
                        "name the run's own folder or its data files instead")
            if seen > MAX_FOLDER_ENTRIES:
                return f"this folder holds more than {MAX_FOLDER_ENTRIES} entries; name the data files or a smaller folder"
    return None


def resolve_inside(value: str, roots: PathRoots) -> str:
    """A path that must be local (never a Hub id)."""
    resolved = resolve_local_or_hub(value, roots)
    if not Path(resolved).is_absolute():
        raise PathRejected(f"not found under {roots.describe()}")
    return resolved


# The paths a run's config.yaml names that a child loads again later (generate,
# continue_from): confined again, as if the job had sent them. Its output_dir is never
# read back: the worker knows where a run's output is.
CONFIG_PATH_KEYS = ("base_model", "base_model_config", "tokenizer_config", "lora_model_dir")


def config_path_problem(config: dict, roots: PathRoots) -> str | None:
    """Why a stored run config may not be loaded for this job's user (a path outside
    what the user may read), or None."""
    for key in CONFIG_PATH_KEYS:
        value = config.get(key)
        if value is None:
            continue
        try:
            resolve_local_or_hub(value if isinstance(value, str) else "", roots)
        except PathRejected as exc:
            return f"{key}: {exc}"
    return None
