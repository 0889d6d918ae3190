"""Where a run's copy in S3-compatible storage goes, and whose keys write it.

- A job's own `storage` is written with the job's own keys (credentials.s3_*), never the
  operator's: both keys are required with it. Its endpoint must reach a public address,
  as a dataset URL must (FINETUNE_ALLOWED_PRIVATE_HOSTS names exceptions).
- Otherwise the operator's destination (FINETUNE_STORAGE_URI and its keys), if set, keeps
  every job's run; the job cannot choose the prefix there.
- Either way a run's objects live under `<prefix>/<user_id>/<run_id>/`, laid out like the
  run directory (output/checkpoint-N/..., result.json, events.jsonl, ...).
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

from finetune_worker.checks.options import INLINE_DATASET_KEYS
from finetune_worker.checks.urlguard import Guard, Refused
from finetune_worker.contract.errors import Problem
from finetune_worker.contract.job import JobInput
from finetune_worker.contract.settings import WorkerSettings

KEY_FIELDS = ("credentials.s3_access_key_id", "credentials.s3_secret_access_key")


@dataclass(frozen=True)
class StorageTarget:
    """One run's place in a bucket."""

    base: str  # s3://bucket/prefix, as the job or the operator gave it
    user_id: str
    run_id: str
    endpoint_url: str | None
    region: str | None
    owner: str  # "job": the job's own destination and keys; "operator": the endpoint's

    @property
    def uri(self) -> str:
        """s3://bucket/prefix/<user_id>/<run_id>"""
        return f"{self.base.rstrip('/')}/{self.user_id}/{self.run_id}"

    def at(self, relative: str) -> str:
        return f"{self.uri}/{relative.strip('/')}"

    @property
    def where(self) -> str:
        """Which field a refusal names."""
        return "storage.uri" if self.owner == "job" else "FINETUNE_STORAGE_URI (the operator's setting)"


def storage_target(job: JobInput, settings: WorkerSettings) -> StorageTarget | None:
    """The job's destination, else the operator's, else None (the volume only)."""
    if job.storage is not None:
        return StorageTarget(job.storage.uri, job.user_id, job.run_id, job.storage.endpoint_url, job.storage.region, "job")
    if settings.storage_uri:
        return StorageTarget(settings.storage_uri, job.user_id, job.run_id, settings.storage_endpoint_url, settings.storage_region, "operator")
    return None


def storage_problems(job: JobInput, settings: WorkerSettings) -> list[Problem]:
    """What is wrong with where the job's run would be kept, and with its s3:// datasets, before anything runs."""
    return _destination_problems(job, settings) + dataset_problems(job, settings)


def dataset_problems(job: JobInput, settings: WorkerSettings) -> list[Problem]:
    """An s3:// dataset is read by the storage child with the run's storage keys: the job's
    own (any object they may read), or the operator's, and then only under the user's own
    prefix there (`<FINETUNE_STORAGE_URI>/<user_id>/`)."""
    problems = []
    for key in INLINE_DATASET_KEYS:
        entries = (job.args or {}).get(key)
        for index, entry in enumerate(entries if isinstance(entries, list) else []):
            path = entry.get("path") if isinstance(entry, dict) else None
            if not (isinstance(path, str) and path.startswith("s3://")):
                continue
            where = f"args.{key}[{index}].path"
            if any(part in ("", ".", "..") for part in path.removeprefix("s3://").split("/")):
                problems.append(Problem(where, "an s3:// path may not have empty, '.' or '..' segments; name the object itself"))
            elif job.storage is None and not settings.storage_uri:
                problems.append(Problem(where, "an s3:// dataset is read with the job's storage keys: add storage (uri, and "
                                        "endpoint_url for a service other than AWS) and credentials.s3_access_key_id / s3_secret_access_key"))
            elif job.storage is None and not path.startswith(own := f"{settings.storage_uri.rstrip('/')}/{job.user_id}/"):
                problems.append(Problem(where, f"with this endpoint's storage, a dataset must be under {own}; or send storage "
                                        "with your own keys to read your own bucket"))
    return problems


def _destination_problems(job: JobInput, settings: WorkerSettings) -> list[Problem]:
    creds = job.credentials
    given = [name for name, value in zip(KEY_FIELDS, (creds.s3_access_key_id, creds.s3_secret_access_key), strict=True) if value]
    if job.storage is None:
        if given or creds.s3_session_token:
            return [Problem(given[0] if given else "credentials.s3_session_token",
                            "storage keys are used only with `storage` (the job's own bucket); add storage.uri or leave them out")]
        if settings.storage_uri and not (settings.storage_access_key_id and settings.storage_secret_access_key):
            return [Problem("storage", "this worker is misconfigured: FINETUNE_STORAGE_URI is set without FINETUNE_STORAGE_ACCESS_KEY_ID "
                            "and FINETUNE_STORAGE_SECRET_ACCESS_KEY (the operator must set them)")]
        return []
    problems = [Problem(name, "required with `storage`: the job's own bucket is written with the job's own keys, never the endpoint's")
                for name in KEY_FIELDS if name not in given]
    if job.storage.endpoint_url and (problem := endpoint_problem(job.storage.endpoint_url, settings.allowed_private_hosts)):
        problems.append(Problem("storage.endpoint_url", problem))
    return problems


def endpoint_problem(url: str, allowed_hosts: frozenset[str]) -> str | None:
    """Why the worker must not send the job's requests to this endpoint: a private or
    loopback address (unless the operator allowed that host), or a name that resolves nowhere."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        Guard(allowed_hosts=allowed_hosts).vetted_addresses(host, port)
    except Refused as exc:
        return (f"{exc.reason.replace('dataset URLs', 'storage endpoints')} (the operator may allow this host in "
                "FINETUNE_ALLOWED_PRIVATE_HOSTS)")
    except (socket.gaierror, UnicodeError) as exc:
        return f"{host!r} does not resolve ({exc}); check the address"
    return None
