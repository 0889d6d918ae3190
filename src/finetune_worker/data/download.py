"""Datasets sent inline or by https URL, written into the run directory (through a
`.part` file, renamed once whole). A cancel sets `cancel`, checked between chunks."""

from __future__ import annotations

import errno
import http.client
import json
import json.scanner
import threading
import time
import urllib.error
from dataclasses import dataclass
from pathlib import Path

from finetune_worker.checks.urlguard import Guard, Refused, open_url, url_for_humans
from finetune_worker.contract import errors
from finetune_worker.contract.errors import JobError
from finetune_worker.contract.settings import DOWNLOAD_DEADLINE_S, MAX_DOWNLOAD_BYTES, WorkerSettings
from finetune_worker.plan.config import DataSource

CHUNK = 1 << 20
READ_CHUNK = 1 << 20  # local files are read this much at a time, whatever their size
Cancel = threading.Event | None


class Cancelled(Exception):
    """The job was cancelled while its data step ran (the step checks between chunks)."""


def raise_if_cancelled(cancel: Cancel) -> None:
    if cancel is not None and cancel.is_set():
        raise Cancelled


# -- inline rows and URLs ---------------------------------------------------------


@dataclass(frozen=True)
class DownloadRules:
    """The operator's limits on a dataset fetched from an https URL."""

    max_bytes: int = MAX_DOWNLOAD_BYTES
    deadline_s: float = DOWNLOAD_DEADLINE_S
    allowed_private_hosts: frozenset[str] = frozenset()

    @classmethod
    def from_settings(cls, settings: WorkerSettings) -> DownloadRules:
        return cls(settings.max_download_bytes, settings.download_deadline_s, frozenset(settings.allowed_private_hosts))


def materialise(sources: list[DataSource], rules: DownloadRules, cancel: Cancel = None) -> None:
    for source in sources:
        source.dest.parent.mkdir(parents=True, exist_ok=True)
        if source.rows is not None:
            write_rows(source.rows, source.dest, cancel)
        elif source.url is not None:
            download(source.url, source.dest, source.where, rules, cancel)


def write_rows(rows: list, dest: Path, cancel: Cancel = None) -> None:
    """JSON Lines into `dest.part`, renamed to `dest` once whole: a full volume or a cancel
    leaves no partial file behind."""
    partial = dest.with_name(dest.name + ".part")
    try:
        with open(partial, "w", encoding="utf-8") as out:
            for index, row in enumerate(rows):
                if index % 10_000 == 0:
                    raise_if_cancelled(cancel)
                out.write(json.dumps(row, ensure_ascii=False) + "\n")
        partial.replace(dest)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def download(url: str, dest: Path, where: str, rules: DownloadRules, cancel: Cancel = None) -> None:
    """Fetch an https URL into `dest` under the rules, or raise `dataset_error`."""
    shown = url_for_humans(url)
    partial = dest.with_name(dest.name + ".part")
    guard = Guard(allowed_hosts=rules.allowed_private_hosts, deadline=time.monotonic() + rules.deadline_s)
    try:
        with open_url(url, guard) as response, open(partial, "wb") as out:
            declared = int(response.headers.get("Content-Length") or 0)
            if declared > rules.max_bytes:
                raise _too_big(where, shown, declared, rules.max_bytes)
            written = 0
            while chunk := response.read1(CHUNK):  # what has arrived: a cancel is seen between reads
                raise_if_cancelled(cancel)
                written += len(chunk)
                if written > rules.max_bytes:
                    raise _too_big(where, shown, written, rules.max_bytes)
                out.write(chunk)
    except Refused as exc:
        failure = _refused(where, shown, guard, exc)
    except urllib.error.HTTPError as exc:
        failure = JobError(errors.DATASET_ERROR, f"{where}.path: downloading {shown} failed: HTTP {exc.code} {exc.reason}")
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        reason = getattr(exc, "reason", None)
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:  # writing `partial`, not the network
            failure = JobError(errors.DISK_FULL, f"{where}.path: the volume filled up while downloading {shown} (No space left on device); "
                               "free space or use a larger volume")
        elif isinstance(reason, Refused):  # raised while connecting: urllib wraps it
            failure = _refused(where, shown, guard, reason)
        elif guard.remaining() <= 0:
            failure = _too_slow(where, shown, rules.deadline_s)
        else:
            failure = JobError(errors.DATASET_ERROR, f"{where}.path: downloading {shown} failed: {reason or exc.__class__.__name__}")
    except JobError as exc:
        failure = exc
    except BaseException:  # cancelled
        partial.unlink(missing_ok=True)
        raise
    else:
        partial.replace(dest)
        return
    partial.unlink(missing_ok=True)
    raise failure from None


def _refused(where: str, shown: str, guard: Guard, refused: Refused) -> JobError:
    hop = f" (redirected to {url_for_humans(guard.visited[-1])})" if len(guard.visited) > 1 else ""
    allow = ", or ask the operator to allow the host with FINETUNE_ALLOWED_PRIVATE_HOSTS" if refused.operator_can_allow else ""
    return JobError(
        errors.DATASET_ERROR,
        f"{where}.path: {shown}{hop} was refused: {refused.reason}. Put the file on the volume or the Hub{allow}",
    )


def _too_slow(where: str, shown: str, deadline_s: float) -> JobError:
    return JobError(
        errors.DATASET_ERROR,
        f"{where}.path: downloading {shown} did not finish within the worker's {deadline_s:g} s deadline; "
        "put the file on the volume or the Hub (the operator sets FINETUNE_DOWNLOAD_DEADLINE_S)",
    )


def _too_big(where: str, shown: str, size: int, limit: int) -> JobError:
    return JobError(
        errors.DATASET_ERROR,
        f"{where}.path: {shown} is larger than the worker's download limit ({size} > {limit} bytes); "
        "put the file on the volume or the Hub (the operator sets FINETUNE_MAX_DOWNLOAD_BYTES)",
    )


