"""A run's copy in S3-compatible storage, as a child process so that the storage keys live
only in its environment (s3fs: the library Axolotl reads `s3://` datasets with).

    python -m finetune_worker.host.bucket probe --uri s3://bucket/prefix/user/run --out out.json
    python -m finetune_worker.host.bucket put --src DIR_OR_FILE --uri s3://.../output/checkpoint-4 [--last trainer_state.json]
                                          [--skip checkpoint-*] [--keep-checkpoints N --checkpoints-uri s3://.../output] --out out.json
    python -m finetune_worker.host.bucket find --uri s3://bucket/prefix/user/run --out out.json
    python -m finetune_worker.host.bucket get --uri s3://... --dest PATH [--max-bytes N] --out out.json

Keys come from FINETUNE_S3_ACCESS_KEY_ID, FINETUNE_S3_SECRET_ACCESS_KEY and (optional)
FINETUNE_S3_SESSION_TOKEN, and only from there: never from ~/.aws, an instance's
metadata or the AWS_* variables of the machine. The endpoint and region are arguments.
Each command writes one JSON object to --out: {"ok": true, ...} or {"ok": false,
"kind": "auth" | "bucket" | "endpoint" | "denied" | "missing" | "too_big" | "other", "message": ...}.

A directory is uploaded file by file (each retried with backoff), the file named by
`--last` after all the others: a checkpoint in the bucket counts as complete once its
trainer_state.json is there, as on the volume. Downloads go through a `.part` file.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from finetune_worker.host.rundir import TRAINER_STATE, checkpoint_step

KEY_ENV, SECRET_ENV, TOKEN_ENV = "FINETUNE_S3_ACCESS_KEY_ID", "FINETUNE_S3_SECRET_ACCESS_KEY", "FINETUNE_S3_SESSION_TOKEN"
ATTEMPTS = 4  # each object: the first try and three more, after 1, 2 and 4 s
BACKOFF_S = 1.0
AUTH_CODES = ("InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidClientTokenId", "ExpiredToken", "InvalidToken", "AuthFailure")


class StorageFailure(Exception):
    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind
        self.message = message


def split_uri(uri: str) -> tuple[str, str]:
    """s3://bucket/some/prefix -> ("bucket", "some/prefix")."""
    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    return bucket, prefix.strip("/")


def connect(endpoint_url: str | None, region: str | None):
    import s3fs

    key, secret = os.environ.get(KEY_ENV), os.environ.get(SECRET_ENV)
    if not key or not secret:
        raise StorageFailure("auth", "no storage keys reached the storage step")
    client_kwargs = {"region_name": region} if region else {}
    return s3fs.S3FileSystem(key=key, secret=secret, token=os.environ.get(TOKEN_ENV) or None, endpoint_url=endpoint_url,
                             client_kwargs=client_kwargs, use_listings_cache=False, skip_instance_cache=True)


def failure(exc: BaseException, uri: str) -> StorageFailure:
    """What went wrong, as a kind the worker names a field for."""
    text = f"{type(exc).__name__}: {exc}".splitlines()[0][:400]
    code = _error_code(exc)
    if code in AUTH_CODES:
        return StorageFailure("auth", f"the storage refused the access key ({code})")
    if code == "NoSuchBucket" or "NoSuchBucket" in text or "bucket does not exist" in text.lower():
        return StorageFailure("bucket", f"the bucket {split_uri(uri)[0]!r} does not exist")
    if code in ("AccessDenied", "Forbidden", "403") or isinstance(exc, PermissionError):
        return StorageFailure("denied", f"the key may not do this under {uri} ({code or text})")
    if isinstance(exc, FileNotFoundError):
        return StorageFailure("missing", f"nothing at {uri}")
    if _is_connection_error(exc):
        return StorageFailure("endpoint", f"the storage endpoint could not be reached: {text}")
    return StorageFailure("other", text)


def _error_code(exc: BaseException) -> str:
    for candidate in (exc, exc.__cause__, exc.__context__):
        response = getattr(candidate, "response", None)
        if isinstance(response, dict):
            return str((response.get("Error") or {}).get("Code") or "")
    return ""


def _is_connection_error(exc: BaseException) -> bool:
    names = {type(candidate).__name__ for candidate in (exc, exc.__cause__, exc.__context__) if candidate is not None}
    return bool(names & {"EndpointConnectionError", "ConnectTimeoutError", "ConnectionRefusedError", "ClientConnectorError",
                         "ConnectionError", "ReadTimeoutError", "ServerDisconnectedError"})


def retried(action, what: str, uri: str):
    """`action()`, tried again after a connection error or a server's 5xx (1, 2, 4 s apart)."""
    for attempt in range(ATTEMPTS):
        try:
            return action()
        except StorageFailure:
            raise
        except Exception as exc:  # noqa: BLE001 - classified below
            found = failure(exc, uri)
            if found.kind in ("auth", "bucket", "denied", "missing") or attempt == ATTEMPTS - 1:
                raise StorageFailure(found.kind, f"{what}: {found.message}") from None
            time.sleep(BACKOFF_S * 2**attempt)
    raise AssertionError("unreachable")


def probe(fs, uri: str) -> dict:
    """Write, read back and delete a small object under the run's prefix."""
    bucket, prefix = split_uri(uri)
    path = f"{bucket}/{prefix}/.finetune-probe-{uuid.uuid4().hex}".replace("//", "/")
    body = uuid.uuid4().hex.encode()
    retried(lambda: fs.pipe_file(path, body), "writing a test object", uri)
    read = retried(lambda: fs.cat_file(path), "reading the test object back", uri)
    retried(lambda: fs.rm_file(path), "deleting the test object", uri)
    if read != body:
        raise StorageFailure("other", "the test object read back differs from what was written")
    return {"checked": f"s3://{path}"}


def local_files(src: Path, skip: list[str], last: str | None) -> list[Path]:
    """The files to upload, in order: everything (but the skipped) and, at the end, `last`."""
    if src.is_file():
        return [src]
    files = sorted(p for p in src.rglob("*") if p.is_file() and not p.name.endswith(".part")
                   and not any(fnmatch.fnmatch(part, pattern) for pattern in skip for part in p.relative_to(src).parts))
    return sorted(files, key=lambda p: p.name == last)


def put(fs, src: Path, uri: str, skip: list[str], last: str | None) -> dict:
    if not src.exists():
        raise StorageFailure("missing", f"{src} is not on the volume")
    bucket, prefix = split_uri(uri)
    started, sent, objects = time.monotonic(), 0, []
    for file in local_files(src, skip, last):
        key = f"{prefix}/{file.relative_to(src).as_posix()}" if src.is_dir() else prefix
        retried(lambda file=file, key=key: fs.put_file(str(file), f"{bucket}/{key}"), f"uploading {file.name}", uri)
        sent += file.stat().st_size
        objects.append(f"s3://{bucket}/{key}")
    return {"bytes": sent, "seconds": round(time.monotonic() - started, 3), "objects": objects}


def checkpoint_steps(fs, uri: str, complete_only: bool) -> list[int]:
    """The steps of the checkpoints under `uri` (an output prefix), oldest first."""
    bucket, prefix = split_uri(uri)
    try:
        names = retried(lambda: fs.ls(f"{bucket}/{prefix}", detail=False), "listing the checkpoints", uri)
    except StorageFailure as exc:
        if exc.kind == "missing":
            return []
        raise
    steps = []
    for name in names:
        step = checkpoint_step(Path(name.rstrip("/")))
        if step is not None and (not complete_only or retried(lambda name=name: fs.exists(f"{name}/{TRAINER_STATE}"), "listing", uri)):
            steps.append(step)
    return sorted(steps)


def prune(fs, uri: str, keep: int) -> list[str]:
    """save_total_limit in the bucket: only the newest `keep` checkpoints under `uri` stay."""
    bucket, prefix = split_uri(uri)
    removed = []
    for step in checkpoint_steps(fs, uri, complete_only=False)[:-keep]:
        path = f"{bucket}/{prefix}/checkpoint-{step}"
        retried(lambda path=path: fs.rm(path, recursive=True), f"deleting checkpoint-{step}", uri)
        removed.append(f"s3://{path}")
    return removed


def find(fs, uri: str) -> dict:
    """What a run left in the bucket: its result, its job record, its complete checkpoints."""
    bucket, prefix = split_uri(uri)
    found: dict[str, Any] = {}
    for name in ("result", "job"):
        try:
            found[name] = json.loads(retried(lambda name=name: fs.cat_file(f"{bucket}/{prefix}/{name}.json"), f"reading {name}.json", uri))
        except StorageFailure as exc:
            if exc.kind != "missing":
                raise
            found[name] = None
    found["checkpoints"] = checkpoint_steps(fs, f"{uri}/output", complete_only=True)
    return found


def local_target(dest: Path, prefix: str, key: str) -> Path:
    """Where the object `key` under `prefix` goes inside `dest`; an object whose name would
    leave `dest` (`..`, `.` or empty segments: S3 keys are plain strings) is refused."""
    relative = key.removeprefix(prefix).removeprefix("/")
    if not relative or any(part in ("", ".", "..") for part in relative.split("/")):
        raise StorageFailure("other", f"refusing the object {key!r}: its name would leave the download's folder")
    return dest / relative


def get(fs, uri: str, dest: Path, max_bytes: int | None) -> dict:
    """A file (or every object under a prefix) into dest, each through a `.part` file."""
    bucket, prefix = split_uri(uri)
    path = f"{bucket}/{prefix}"
    is_dir = retried(lambda: fs.isdir(path), "looking at the object", uri)
    pairs = ([(key, local_target(dest, path, key)) for key in retried(lambda: fs.find(path), "listing", uri)]
             if is_dir else [(path, dest)])
    total = sum(int(retried(lambda key=key: fs.info(key)["size"], "reading the object's size", uri)) for key, _ in pairs)
    if max_bytes is not None and total > max_bytes:
        raise StorageFailure("too_big", f"{uri} holds {total} bytes, over the limit of {max_bytes}")
    started = time.monotonic()
    for key, target in pairs:
        target.parent.mkdir(parents=True, exist_ok=True)
        part = target.with_name(target.name + ".part")
        retried(lambda key=key, part=part: fs.get_file(key, str(part)), f"downloading {Path(key).name}", uri)
        os.replace(part, target)
    return {"bytes": total, "files": len(pairs), "seconds": round(time.monotonic() - started, 3)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m finetune_worker.host.bucket")
    parser.add_argument("command", choices=("probe", "put", "find", "get"))
    parser.add_argument("--uri", required=True)
    parser.add_argument("--endpoint-url")
    parser.add_argument("--region")
    parser.add_argument("--src", type=Path)
    parser.add_argument("--dest", type=Path)
    parser.add_argument("--last")
    parser.add_argument("--skip", action="append", default=[])
    parser.add_argument("--keep-checkpoints", type=int)
    parser.add_argument("--checkpoints-uri")
    parser.add_argument("--max-bytes", type=int)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        fs = connect(args.endpoint_url, args.region)
        if args.command == "probe":
            outcome = probe(fs, args.uri)
        elif args.command == "find":
            outcome = find(fs, args.uri)
        elif args.command == "get":
            outcome = get(fs, args.uri, args.dest, args.max_bytes)
        else:
            outcome = put(fs, args.src, args.uri, args.skip, args.last)
            if args.keep_checkpoints:
                outcome["pruned"] = prune(fs, args.checkpoints_uri, args.keep_checkpoints)
        outcome = {"ok": True, **outcome}
    except StorageFailure as exc:
        outcome = {"ok": False, "kind": exc.kind, "message": exc.message}
    except Exception as exc:  # noqa: BLE001 - reported to the worker, which names it
        found = failure(exc, args.uri)
        outcome = {"ok": False, "kind": found.kind, "message": found.message}
    args.out.write_text(json.dumps(outcome), encoding="utf-8")
    return 0 if outcome["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
