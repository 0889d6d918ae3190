"""Whose credentials write where, on an endpoint that several tenants share.

An endpoint that checks user tokens (FINETUNE_USER_TOKEN_SECRET or _PUBLIC_KEY) serves
several tenants. There the operator's own credentials, the fallback for a job that
brings none, never write for a job outside what the operator allowed for its user:

- Hugging Face: the endpoint's HF_TOKEN writes for a job only when the operator names
  a namespace (FINETUNE_HUB_NAMESPACE), and then only to repos of the job's user there:
  `<namespace>/<user_id>__<name>`; a hub_model_id without an owner goes there. (The
  Hub refuses `--` in a repo id, so the separator is `__`; a name may not contain it,
  so a repo has one owner: `bob__x__y` could be user `bob__x`'s or `bob`'s.) What the
  training writes itself (push_dataset_to_hub, trackio_space_id) always needs the job's
  own token (checks/validation.hub_write_problems).
- W&B: the endpoint's WANDB_API_KEY logs for a job only when the operator names an
  entity (FINETUNE_WANDB_ENTITY), and then only to that entity, in the project
  `<user_id>__<project>` (the job's wandb_project, else its model_id).

A job with its own hf_token or wandb_api_key writes where that credential may. An
endpoint without user tokens (one tenant) uses its credentials as it always has.
Every destination is decided here, before anything runs; the Hub check child then asks
the Hub whether the token that will be used may write to each of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from finetune_worker.checks.options import CLASSIFIED, Kind
from finetune_worker.contract import errors
from finetune_worker.contract.errors import JobError, Problem
from finetune_worker.contract.job import JobInput
from finetune_worker.contract.settings import WorkerSettings

TENANT_SEPARATOR = "__"
HUB_MODEL_ID = "args.hub_model_id"
MERGED_HUB_MODEL_ID = "publish.merged_hub_model_id"
# Hub repos the training itself writes to, with HF_TOKEN in its environment.
TRAINING_HUB_WRITES = tuple(sorted(name for name, kind in CLASSIFIED.items() if kind is Kind.HUB))


@dataclass(frozen=True)
class HubWrites:
    """Every Hub repo a job writes to, by the field that names it, as the Hub check gets it
    (a hub_model_id without an owner stays bare, for the token's user, unless placed)."""

    repos: dict[str, str]
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class WandbTarget:
    """Where the endpoint's W&B key logs a job on a shared endpoint (entity and project
    forced), or why W&B is off for a job without a key."""

    entity: str | None = None
    project: str | None = None
    off_reason: str = "no wandb_api_key in the job or the worker's environment"
    notes: tuple[str, ...] = ()


def shared(settings: WorkerSettings) -> bool:
    return settings.user_tokens_required


def named_hub_writes(job: JobInput, args: dict[str, Any]) -> dict[str, str]:
    named = {HUB_MODEL_ID: args.get("hub_model_id"), MERGED_HUB_MODEL_ID: job.publish.merged_hub_model_id}
    named |= {f"args.{key}": args.get(key) for key in TRAINING_HUB_WRITES}
    return {where: repo for where, repo in named.items() if isinstance(repo, str) and repo}


def hub_writes(job: JobInput, args: dict[str, Any], settings: WorkerSettings) -> HubWrites:
    """Where each Hub write goes. On a shared endpoint without the job's own token, only
    to the user's repos in the operator's namespace: anything else is an `auth_error`."""
    repos = named_hub_writes(job, args)
    if not repos or not shared(settings) or job.credentials.hf_token is not None or settings.hf_token is None:
        return HubWrites(repos)
    # Here every write is the worker's own push: validation refused the training's Hub writes without the job's token.
    namespace = settings.hub_namespace
    if namespace is None:
        raise JobError(
            errors.AUTH_ERROR,
            "this endpoint serves several users, and its own Hugging Face token writes nothing for them: send "
            "credentials.hf_token with write access to the repos this job names (the operator may instead set "
            "FINETUNE_HUB_NAMESPACE to give each user repos of their own there)",
            [f"{where}: {repo!r}" for where, repo in repos.items()],
        )
    placed, notes, problems = {}, [], []
    form = f"{namespace}/{job.user_id}{TENANT_SEPARATOR}<name>"
    user_problem = tenant_problem(job.user_id, namespace)
    for where, repo in repos.items():
        owner, _, name = repo.rpartition("/")
        if user_problem:
            problems.append(Problem(where, f"{repo!r}: {user_problem}"))
        elif not owner:
            try:
                placed[where] = f"{namespace}/{tenant_name(job.user_id, name)}"
            except ValueError as exc:
                problems.append(Problem(where, f"{repo!r}: {exc}"))
                continue
            notes.append(f"hub_model_id {repo!r} has no owner; on this shared endpoint the endpoint's token writes only to "
                         f"{form}, so it goes to {placed[where]}")
        elif owner != namespace or tenant_name_problem(job.user_id, name):
            problems.append(Problem(where, f"{repo!r} is not one of this user's repos in the endpoint's namespace"))
        else:
            placed[where] = repo
        if where in placed and (invalid := repo_id_problem(placed[where])):
            target = "" if placed[where] == repo else f" (as {placed[where]!r})"
            problems.append(Problem(where, f"{repo!r}{target}: {invalid}"))
    if problems:
        raise JobError(
            errors.AUTH_ERROR,
            f"on this endpoint, its own Hugging Face token writes for a job only to {form} (a name without "
            f"'{TENANT_SEPARATOR}'): name such a repo, or give hub_model_id without an owner (it goes there), "
            "or send credentials.hf_token with write access to the repos you named",
            [str(p) for p in problems],
        )
    return HubWrites({**repos, **placed}, tuple(notes))


def tenant_name(user_id: str, name: str) -> str:
    """`<user_id>__<name>` for `name` (which may carry that prefix already); ValueError if it cannot be one."""
    rest = name.removeprefix(f"{user_id}{TENANT_SEPARATOR}")
    if not rest or TENANT_SEPARATOR in rest:
        raise ValueError(f"a name in the endpoint's namespace may not contain '{TENANT_SEPARATOR}' (it separates the user_id)")
    return f"{user_id}{TENANT_SEPARATOR}{rest}"


def tenant_name_problem(user_id: str, name: str) -> bool:
    """Whether `name` is not exactly one of this user's names."""
    try:
        return tenant_name(user_id, name) != name
    except ValueError:
        return True


def tenant_problem(user_id: str, namespace: str) -> str | None:
    """Why repos named after this user_id cannot be the user's own, or None."""
    if user_id != user_id.lower():
        return (f"the user_id {user_id!r} has capital letters, and the Hub ignores case in repo names, so its repos would "
                "be those of the lower-case user_id too; the endpoint's token writes only for lower-case user_ids "
                "(send credentials.hf_token instead)")
    if repo_id_problem(f"{namespace}/{user_id}{TENANT_SEPARATOR}x"):
        return (f"the user_id {user_id!r} cannot begin a Hub repo name (the Hub refuses a name that starts with '.' "
                "or holds '--' or '..'); send credentials.hf_token instead")
    return None


def repo_id_problem(repo_id: str) -> str | None:
    """What the Hub's own rules (huggingface_hub's validate_repo_id) say against this repo id, or None."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        return str(exc)
    return None


def endpoint_wandb_key(settings: WorkerSettings):
    """The endpoint's W&B key, where it may log for a job: one tenant, or an operator's entity for tenants."""
    return settings.wandb_api_key if not shared(settings) or settings.wandb_entity is not None else None


def wandb_target(job: JobInput, args: dict[str, Any], settings: WorkerSettings) -> WandbTarget:
    """Where W&B logs a job: as the job asks with its own key or on an endpoint with one
    tenant; with the endpoint's key on a shared one, only into FINETUNE_WANDB_ENTITY, in
    the project `<user_id>__<project>` (the job's wandb_project, else its model_id)."""
    if job.credentials.wandb_api_key is not None or settings.wandb_api_key is None or not shared(settings):
        return WandbTarget()
    entity = settings.wandb_entity
    if entity is None:
        return WandbTarget(off_reason="this endpoint's own W&B key logs nothing for its users (the operator has set no "
                                      "FINETUNE_WANDB_ENTITY); send credentials.wandb_api_key to log to W&B")
    asked_entity, project = args.get("wandb_entity"), str(args.get("wandb_project") or job.model_id)
    problems = []
    if asked_entity not in (None, entity):
        problems.append(f"args.wandb_entity: {asked_entity!r} is not the endpoint's W&B entity {entity!r}")
    try:
        placed = tenant_name(job.user_id, project)
    except ValueError as exc:
        problems.append(f"args.wandb_project: {project!r}: {exc}")
    if problems:
        raise JobError(
            errors.AUTH_ERROR,
            f"on this endpoint, its own W&B key logs a job only to the entity {entity!r}, in a project "
            f"<user_id>{TENANT_SEPARATOR}<project> (a project name without '{TENANT_SEPARATOR}'): leave out wandb_entity "
            f"(or set it to {entity!r}) and name the project so, or send credentials.wandb_api_key",
            problems,
        )
    note = (f"W&B: the endpoint's key logs this job to the entity {entity!r}, project {placed!r} "
            f"(on this shared endpoint a user's projects are <user_id>{TENANT_SEPARATOR}<project>)")
    return WandbTarget(entity=entity, project=placed, notes=(note,))
