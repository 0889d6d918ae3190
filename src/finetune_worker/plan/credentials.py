"""The job's credentials, each falling back to the worker's own; they go only into
child processes' environments (see plan.build_child_env)."""

from __future__ import annotations

from finetune_worker.checks.options import CREDENTIAL_ENV
from finetune_worker.checks.storage import StorageTarget
from finetune_worker.checks.tenancy import endpoint_wandb_key
from finetune_worker.contract.job import JobInput
from finetune_worker.contract.settings import WorkerSettings


def hub_and_wandb_secrets(job: JobInput, settings: WorkerSettings) -> tuple[str | None, str | None]:
    """The Hub token (the endpoint's reads for any job; where it may write is checks/tenancy.hub_writes)
    and the W&B key (the endpoint's only where it may log for this job: checks/tenancy.py)."""
    creds = job.credentials
    return _secret(creds.hf_token, settings.hf_token), _secret(creds.wandb_api_key, endpoint_wandb_key(settings))


def tracker_secrets(job: JobInput) -> dict[str, str]:
    """Other trackers' keys from the job's credentials, under the names their libraries read."""
    creds = job.credentials
    given = {env: getattr(creds, field) for field, env in CREDENTIAL_ENV.items()}
    return {env: value.get_secret_value() for env, value in given.items() if value is not None}


def _secret(job_value, worker_value) -> str | None:
    chosen = job_value or worker_value
    return chosen.get_secret_value() if chosen else None


# Where the storage child (host/bucket.py) reads its keys; no other child gets them.
STORAGE_KEY_ENV = ("FINETUNE_S3_ACCESS_KEY_ID", "FINETUNE_S3_SECRET_ACCESS_KEY", "FINETUNE_S3_SESSION_TOKEN")


def storage_secrets(job: JobInput, target: StorageTarget, settings: WorkerSettings) -> dict[str, str]:
    """The keys of the run's bucket: the job's own for its own destination, the operator's for
    the operator's (checks/storage.py); never one for the other."""
    if target.owner == "job":
        creds = job.credentials
        values = (creds.s3_access_key_id, creds.s3_secret_access_key, creds.s3_session_token)
    else:
        values = (settings.storage_access_key_id, settings.storage_secret_access_key, None)
    return {name: value.get_secret_value() for name, value in zip(STORAGE_KEY_ENV, values, strict=True) if value is not None}
