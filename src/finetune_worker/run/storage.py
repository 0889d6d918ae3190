"""The run's copy in S3-compatible storage (checks/storage.py says where and with whose keys).

Checked before anything loads (an object written, read back, deleted); each complete
checkpoint uploaded while the training goes on; the outputs at the end, result.json last;
a run missing from the volume restored from there: its stored result answers, or its
newest complete checkpoint is downloaded and the training resumes from it. The work is
the storage child's (host/bucket.py), which alone holds the keys.
"""

from __future__ import annotations

import asyncio
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from finetune_worker.checks.storage import StorageTarget
from finetune_worker.contract import errors, events
from finetune_worker.contract.errors import JobError
from finetune_worker.host.children import ChildProcess
from finetune_worker.host.resources import JobResources
from finetune_worker.host.rundir import TRAINER_STATE, RunPaths, args_digest, inspect_previous, read_json, write_json
from finetune_worker.host.tools import job_child
from finetune_worker.plan.children import build_bucket_argv
from finetune_worker.run.job import JobRun

NOT_UPLOADED = ("checkpoint-*", "data", "nodes", "hub", ".*", "*.lock", "result.json", "events.jsonl", "progress.jsonl")
# What each kind of failure of the storage child says, and which field it names (the job's or the operator's).
KEY_FIELDS = {"job": "credentials.s3_access_key_id and credentials.s3_secret_access_key",
              "operator": "FINETUNE_STORAGE_ACCESS_KEY_ID and FINETUNE_STORAGE_SECRET_ACCESS_KEY (the operator's)"}
ENDPOINT_FIELDS = {"job": "storage.endpoint_url", "operator": "FINETUNE_STORAGE_ENDPOINT_URL (the operator's)"}
# The storage child never reads the machine's own AWS configuration or an instance's metadata.
ISOLATED_AWS_ENV = {"AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": "/dev/null", "AWS_SHARED_CREDENTIALS_FILE": "/dev/null"}


@dataclass(frozen=True)
class Bucket:
    """The run's place in the bucket and the storage child's environment (its keys)."""

    target: StorageTarget
    env: dict[str, str]
    log_dir: Path


def open_bucket(target: StorageTarget, child_env: dict[str, str], keys: dict[str, str], paths: RunPaths) -> Bucket:
    return Bucket(target, {**child_env, **ISOLATED_AWS_ENV, **keys}, paths.home)


async def call(bucket: Bucket, resources: JobResources, command: str, uri: str, *args: str) -> tuple[ChildProcess, dict | None]:
    """One storage child to its end (its log: storage.log); (the process, its JSON answer)."""
    out = bucket.log_dir / f".storage-{uuid.uuid4().hex[:8]}.json"
    target = bucket.target
    argv = build_bucket_argv(sys.executable, command, uri, target.endpoint_url, target.region, *args, out=out)
    bucket.log_dir.mkdir(parents=True, exist_ok=True)
    child = job_child(argv, bucket.env, bucket.log_dir / "storage.log", bucket.log_dir / ".storage.records", "storage", resources)
    resources.background.append(child)
    try:
        await child.start()
        async for _ in child.records():
            pass
        return child, read_json(out)
    finally:
        resources.background.remove(child)
        out.unlink(missing_ok=True)


def storage_error(bucket: Bucket, answer: dict | None, child: ChildProcess, doing: str) -> JobError:
    """The storage child's failure as the job's error, naming the field to fix."""
    target = bucket.target
    if answer is None:
        return JobError(errors.STORAGE_ERROR, f"{doing} at {target.uri} failed: the storage step exited with code {child.returncode}",
                        log_tail=child.log_tail())
    kind, message = answer.get("kind"), answer.get("message", "")
    fix = {
        "auth": f"check {KEY_FIELDS[target.owner]}",
        "bucket": f"create the bucket or fix {target.where}",
        "denied": f"give the key s3:PutObject, s3:GetObject, s3:DeleteObject and s3:ListBucket under {target.uri} ({KEY_FIELDS[target.owner]})",
        "endpoint": f"check {ENDPOINT_FIELDS[target.owner]} and that the service is up",
    }.get(kind, "see the worker's storage.log")
    return JobError(errors.STORAGE_ERROR, f"{doing} at {target.uri} failed: {message}; {fix}")


async def probe(bucket: Bucket, resources: JobResources) -> None:
    child, answer = await call(bucket, resources, "probe", bucket.target.uri)
    if not (answer and answer.get("ok")):
        raise storage_error(bucket, answer, child, "checking the storage (write, read back, delete a test object)")


async def restore(run: JobRun, resources: JobResources) -> AsyncIterator[dict]:
    """A run with nothing on this volume: its result kept in the bucket answers; else its
    newest complete checkpoint there is downloaded, and the training resumes from it."""
    bucket, paths = run.bucket, run.paths
    child, found = await call(bucket, resources, "find", bucket.target.uri)
    if not (found and found.get("ok")):
        raise storage_error(bucket, found, child, "looking for this run in the storage")
    if not (found.get("result") or found.get("checkpoints")):
        return
    recorded = (found.get("job") or {}).get("args_sha256")
    if recorded not in (None, args_digest(run.valid.args)):
        raise JobError(errors.INVALID_INPUT, f"this run_id has checkpoints or a result in {bucket.target.uri} from a different config (args); "
                       "use a new run_id, or send restart: true to train it again from scratch")
    if isinstance(result := found.get("result"), dict):
        yield events.status("preparing", f"this run already completed; returning the result kept in {bucket.target.uri} "
                            "(send restart: true to train it again)")
        yield {**result, "reused": True}
        run.done = True
        return
    step = found["checkpoints"][-1]
    where = paths.output_dir / f"checkpoint-{step}"
    yield events.status("downloading", f"this run is not on this volume: downloading checkpoint-{step} from {bucket.target.uri} to resume from it")
    child, got = await call(bucket, resources, "get", bucket.target.at(f"output/checkpoint-{step}"), "--dest", str(where))
    if not (got and got.get("ok")):
        raise storage_error(bucket, got, child, f"downloading checkpoint-{step}")
    yield events.storage("restored", bucket.target.at(f"output/checkpoint-{step}"), got["bytes"], got["seconds"], step=step)
    run.previous = inspect_previous(paths)


async def fetch_datasets(run: JobRun, resources: JobResources) -> AsyncIterator[dict]:
    """s3:// datasets into the run's data/ (each within FINETUNE_MAX_DOWNLOAD_BYTES), read with
    the run's storage keys; the row check and Axolotl then read the local copy."""
    for source in (source for source in run.plan.data_sources if source.bucket_uri):
        if source.dest.exists():
            continue
        yield events.status("downloading", f"{source.where}: downloading {source.bucket_uri}")
        child, got = await call(run.bucket, resources, "get", source.bucket_uri, "--dest", str(source.dest),
                                "--max-bytes", str(run.settings.max_download_bytes))
        if not (got and got.get("ok")):
            if got and got.get("kind") in ("missing", "too_big"):
                what = "does not exist" if got["kind"] == "missing" else f"is too big: {got.get('message')} (FINETUNE_MAX_DOWNLOAD_BYTES)"
                raise JobError(errors.DATASET_ERROR, f"{source.where}.path: {source.bucket_uri} {what}")
            raise storage_error(run.bucket, got, child, f"downloading the dataset {source.bucket_uri}")
        yield events.storage("dataset", source.bucket_uri, got["bytes"], got["seconds"], where=source.where)


class CheckpointUploads:
    """Each complete checkpoint uploaded while the training goes on, one after another;
    save_total_limit applies in the bucket too. A failed upload is a warning: the
    checkpoint stays on the volume, and the outputs' upload at the end decides the job."""

    def __init__(self, bucket: Bucket, output_dir: Path, keep: int | None, resources: JobResources):
        self.bucket, self.output_dir, self.keep, self.resources = bucket, output_dir, keep, resources
        self.tail: asyncio.Task | None = None
        self.ready: list[dict] = []

    def start(self, step: int) -> None:
        self.tail = asyncio.create_task(self._upload(step, self.tail))

    async def _upload(self, step: int, before: asyncio.Task | None) -> None:
        if before is not None:
            await asyncio.wait([before])
        target, name = self.bucket.target, f"checkpoint-{step}"
        if not (self.output_dir / name).is_dir():  # rotated away (save_total_limit) while earlier uploads ran
            self.ready.append(events.status("training", f"{name} was removed by save_total_limit before its upload began: not uploaded"))
            return
        keep = ["--keep-checkpoints", str(self.keep), "--checkpoints-uri", target.at("output")] if self.keep else []
        child, answer = await call(self.bucket, self.resources, "put", target.at(f"output/{name}"),
                                   "--src", str(self.output_dir / name), "--last", TRAINER_STATE, *keep)  # last: the bucket's mark of a whole checkpoint
        if answer and answer.get("ok"):
            self.ready.append(events.storage("checkpoint", target.at(f"output/{name}"), answer["bytes"], answer["seconds"], step=step,
                                             **({"pruned": answer["pruned"]} if answer.get("pruned") else {})))
        else:
            error = storage_error(self.bucket, answer, child, f"uploading {name}")
            self.ready.append(events.warning(f"{error.message}; the checkpoint stays on the volume"))

    def finished(self) -> list[dict]:
        """The events of the uploads that ended since the last call."""
        done, self.ready = self.ready, []
        return done

    async def drain(self) -> list[dict]:
        """Wait for the uploads still running (the training has ended)."""
        if self.tail is not None:
            await asyncio.wait([self.tail])
        return self.finished()


async def upload_outputs(bucket: Bucket, resources: JobResources, paths: RunPaths) -> dict:
    """Everything the run made (output, merged weights, GGUF, card, loss curve, logs, job.json),
    but its checkpoints (uploaded as they landed) and result.json (last: upload_result)."""
    skip = [arg for pattern in NOT_UPLOADED for arg in ("--skip", pattern)]
    child, answer = await call(bucket, resources, "put", bucket.target.uri, "--src", str(paths.run_dir), *skip)
    if not (answer and answer.get("ok")):
        raise _kept_locally(storage_error(bucket, answer, child, "uploading the outputs"), paths)
    return answer


async def upload_result(bucket: Bucket, resources: JobResources, paths: RunPaths, result: dict) -> None:
    """events.jsonl, then result.json: a run in the bucket is finished once its result is
    there. result.json is written on the volume only after its upload, so that a failed
    upload is done again by a resubmission."""
    pending = paths.home / ".result.json.pending"
    write_json(pending, result)
    for file, name in ((paths.events_file, paths.events_file.name), (pending, paths.result_file.name)):
        child, answer = await call(bucket, resources, "put", bucket.target.at(name), "--src", str(file))
        if not (answer and answer.get("ok")):
            pending.unlink(missing_ok=True)
            raise _kept_locally(storage_error(bucket, answer, child, f"uploading {name}"), paths)
    pending.replace(paths.result_file)


def _kept_locally(error: JobError, paths: RunPaths) -> JobError:
    error.message += (f"; the run is complete on this worker's volume in {paths.run_dir} "
                      "(resubmit the same run_id to upload it again without training)")
    return error
