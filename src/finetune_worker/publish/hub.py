"""Hugging Face Hub steps, run as a child process so the token lives only in its env.

    python -m finetune_worker.publish.hub check --repo-id=alice/x [--repo-id=acme/y ...] --out result.json
    python -m finetune_worker.publish.hub push --spec publish.json --out result.json
    python -m finetune_worker.publish.hub model-config --model org/name [--revision REV] --out result.json

All read HF_TOKEN (and HF_ENDPOINT) from the environment and write one JSON
object to --out: {"ok": true, ...} or {"ok": false, "code": ..., "message": ...}.

`model-config` downloads only the base model's config.json and, when the repo has
one, model.safetensors.index.json (whose metadata.total_size is the weights' size)
into the Hub cache under HF_HOME, where Axolotl finds them later; no weights. Its
codes: auth_error (gated, or the token refused), model_load_error (no such repo,
revision or config.json), network (the Hub could not be reached: not the user's fault).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

RETRY_STATUSES = (429, 500, 502, 503, 504)
WRITE_ROLES_IN_ORG = ("admin", "write", "contributor")
# Never pushed: checkpoints (optimizer states), the training log, pickled arguments,
# Axolotl's own README (the worker writes the card), and the merged weights
# (pushed separately, where the job asks).
IGNORED = ("checkpoint-*", "checkpoint-*/*", "debug.log", "README.md", "training_args.bin", "merged", "merged/*", "*.pt", "*.pth")


class HubFailure(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def token_problem(whoami: dict, repo_id: str) -> str | None:
    """Why this token cannot write to repo_id's namespace, or None when it can."""
    namespace = repo_id.split("/")[0]
    user = whoami.get("name", "?")
    orgs = {org.get("name"): org for org in whoami.get("orgs") or []}
    if namespace != user and namespace not in orgs:
        names = ", ".join([user, *orgs]) or user
        return f"the token belongs to '{user}', who cannot write to '{namespace}' (namespaces: {names})"
    if namespace in orgs and orgs[namespace].get("roleInOrg") not in WRITE_ROLES_IN_ORG:
        return f"'{user}' has the role '{orgs[namespace].get('roleInOrg')}' in '{namespace}', which cannot create or write repos"
    access = (whoami.get("auth") or {}).get("accessToken") or {}
    role = access.get("role")
    if role == "read":
        return f"the token '{access.get('displayName', '')}' is read-only; create a token with write access"
    if role == "fineGrained":
        fine = access.get("fineGrained") or {}
        scoped = [s for s in fine.get("scoped") or [] if (s.get("entity") or {}).get("name") == namespace]
        allowed = any("repo.write" in s.get("permissions", []) for s in scoped) or "repo.write" in (fine.get("global") or [])
        if not allowed:
            return f"the fine-grained token '{access.get('displayName', '')}' has no repo.write permission on '{namespace}'"
    return None


def _status(exc: Exception) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def with_retries(action: Callable[[], Any], attempts: int, backoff: float, sleep=time.sleep) -> Any:
    """Retry 429/5xx and network errors with exponential backoff."""
    import httpx

    for attempt in range(1, attempts + 1):
        try:
            return action()
        except Exception as exc:
            transient = _status(exc) in RETRY_STATUSES or isinstance(exc, (httpx.TransportError, ConnectionError))
            if not transient or attempt == attempts:
                raise
            wait = backoff * 2 ** (attempt - 1)
            print(f"hub: attempt {attempt} failed ({_status(exc) or type(exc).__name__}); retrying in {wait:.0f}s", flush=True)
            sleep(wait)


def check(api, *repo_ids: str) -> dict:
    """Whether the token may write to every repo (one `whoami`); each repo with its owner."""
    from huggingface_hub.errors import HfHubHTTPError

    try:
        whoami = api.whoami()
    except HfHubHTTPError as exc:
        if _status(exc) in (401, 403):
            raise HubFailure("auth_error", "the Hugging Face token was refused (invalid or expired); check hf_token") from None
        raise
    # like the Hub itself: a repo without an owner goes to the token's user
    owned = [repo_id if "/" in repo_id else f"{whoami.get('name')}/{repo_id}" for repo_id in repo_ids]
    problems = [f"cannot push to {repo_id}: {problem}" for repo_id in owned if (problem := token_problem(whoami, repo_id))]
    if problems:
        raise HubFailure("auth_error", "; ".join(problems))
    return {"user": whoami.get("name"), "repo_ids": owned}


def folder_files(folder: Path, ignored: tuple[str, ...] = IGNORED) -> list[str]:
    files = []
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder).as_posix()
        if path.is_file() and not any(fnmatch.fnmatch(relative, pattern) for pattern in ignored):
            files.append(relative)
    return files


def _operations(folder: Path, prefix: str, extra: dict[str, str]):
    from huggingface_hub import CommitOperationAdd

    ops = [CommitOperationAdd(path_in_repo=f"{prefix}{name}", path_or_fileobj=str(folder / name)) for name in folder_files(folder)]
    ops += [CommitOperationAdd(path_in_repo=f"{prefix}{name}", path_or_fileobj=source) for name, source in extra.items()]
    return ops


def push_one(api, *, repo_id: str, private: bool, revision: str | None, folder: Path, prefix: str, extra: dict[str, str],
             message: str, attempts: int, backoff: float) -> dict:
    """Create the repo if needed and commit the folder in one commit (idempotent)."""
    with_retries(lambda: api.create_repo(repo_id, private=private, exist_ok=True), attempts, backoff)
    if revision:
        with_retries(lambda: api.create_branch(repo_id, branch=revision, exist_ok=True), attempts, backoff)
    commit = with_retries(
        lambda: api.create_commit(repo_id, operations=_operations(folder, prefix, extra), commit_message=message, revision=revision),
        attempts,
        backoff,
    )
    return {
        "repo_id": repo_id,
        "url": f"{api.endpoint}/{repo_id}",
        "revision": commit.oid,
        "commit_url": commit.commit_url,
        "private": private,
        "files": [f"{prefix}{name}" for name in folder_files(folder)] + [f"{prefix}{name}" for name in extra],
    }


def push(api, spec: dict) -> dict:
    from huggingface_hub.errors import HfHubHTTPError

    attempts, backoff = spec.get("attempts", 5), spec.get("backoff_seconds", 1.0)
    try:
        result = push_one(
            api, repo_id=spec["repo_id"], private=spec["private"], revision=spec.get("revision"), folder=Path(spec["folder"]),
            prefix="", extra=spec.get("extra_files", {}), message=spec["commit_message"], attempts=attempts, backoff=backoff,
        )
        merged = spec.get("merged")
        if merged:
            result["merged"] = push_one(
                api, repo_id=merged["repo_id"], private=spec["private"], revision=spec.get("revision"),
                folder=Path(merged["folder"]), prefix=merged.get("prefix", ""), extra={}, message=spec["commit_message"] + " (merged weights)",
                attempts=attempts, backoff=backoff,
            )
        return result
    except HfHubHTTPError as exc:
        if _status(exc) in (401, 403):
            raise HubFailure("auth_error", f"the Hub refused the push to {spec['repo_id']} ({_status(exc)})") from None
        raise HubFailure("push_failed", f"the Hub answered {_status(exc)} to the push to {spec['repo_id']}: {str(exc).splitlines()[0]}") from None
    except Exception as exc:
        raise HubFailure("push_failed", f"pushing to {spec['repo_id']} failed: {type(exc).__name__}: {exc}") from None


CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
NETWORK = "network"  # model-config only: the Hub was unreachable or failing; the worker goes on without it


def model_config(model: str, revision: str | None) -> dict:
    """Download config.json (and the safetensors index where there is one) into the HF cache."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"base_model '{model}'" + (f" (revision '{revision}')" if revision else "")
    try:
        config = hf_hub_download(model, CONFIG_FILE, revision=revision)
        try:
            index = hf_hub_download(model, INDEX_FILE, revision=revision)
        except RemoteEntryNotFoundError:
            index = None  # a single-file model (or .bin weights): the config alone gives the memory estimate
    except GatedRepoError:
        raise HubFailure(
            "auth_error",
            f"{where} is gated: accept its terms on the Hugging Face Hub with the account of the job's hf_token, "
            "then resubmit (with credentials.hf_token set to that account's token)",
        ) from None
    except RevisionNotFoundError:
        raise HubFailure("model_load_error", f"{where}: the repo has no such revision; check revision_of_model") from None
    except RepositoryNotFoundError:
        raise HubFailure(
            "model_load_error",
            f"{where} was not found on the Hugging Face Hub; check the name, or if the repo is private, "
            "give an hf_token that can read it",
        ) from None
    except RemoteEntryNotFoundError:  # (LocalEntryNotFoundError, also an EntryNotFoundError, is a network failure)
        raise HubFailure(
            "model_load_error", f"{where} has no {CONFIG_FILE}, so it is not a model Axolotl can load; check base_model"
        ) from None
    except HFValidationError as exc:
        raise HubFailure("model_load_error", f"{where} is not a valid model name: {exc}") from None
    except HfHubHTTPError as exc:
        if _status(exc) in (401, 403):
            raise HubFailure(
                "auth_error",
                f"the Hugging Face Hub refused the token for {where} ({_status(exc)}): the hf_token is invalid or expired, "
                "or lacks read access to this repo; check credentials.hf_token",
            ) from None
        raise HubFailure(NETWORK, f"the Hub answered {_status(exc)} for {where}: {str(exc).splitlines()[0]}") from None
    except (OSError, ValueError) as exc:  # LocalEntryNotFoundError (unreachable), httpx errors, a full disk
        raise HubFailure(NETWORK, f"could not fetch the config of {where}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
    return {"config": config, "index": index, "snapshot": str(Path(config).parent)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m finetune_worker.publish.hub")
    parser.add_argument("command", choices=("check", "push", "model-config"))
    parser.add_argument("--repo-id", action="append", default=[], help="check: each repo the job writes to")
    parser.add_argument("--model")
    parser.add_argument("--revision")
    parser.add_argument("--spec", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    from huggingface_hub import HfApi

    api = HfApi()  # HF_TOKEN and HF_ENDPOINT come from this process's environment
    try:
        if args.command == "check":
            outcome = {"ok": True, **check(api, *args.repo_id)}
        elif args.command == "model-config":
            outcome = {"ok": True, **model_config(args.model, args.revision)}
        else:
            outcome = {"ok": True, **push(api, json.loads(args.spec.read_text(encoding="utf-8")))}
    except HubFailure as failure:
        outcome = {"ok": False, "code": failure.code, "message": failure.message}
    except Exception as exc:  # noqa: BLE001 - reported to the worker, which names it
        fallback = {"push": "push_failed", "check": "auth_error", "model-config": NETWORK}[args.command]
        outcome = {"ok": False, "code": fallback, "message": f"{type(exc).__name__}: {exc}"}
    args.out.write_text(json.dumps(outcome), encoding="utf-8")
    return 0 if outcome["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
