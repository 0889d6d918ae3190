"""The job contract: the typed request that RunPod delivers as `job["input"]`."""

from __future__ import annotations

import difflib
import json
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    StringConstraints,
    ValidationError,
)

from .errors import Problem


def _not_dot_names(value: str) -> str:
    if value in (".", ".."):
        raise ValueError("must not be '.' or '..'")
    return value


SafeId = Annotated[
    str,
    StringConstraints(pattern=r"^[A-Za-z0-9._-]+$", min_length=1, max_length=64),
    AfterValidator(_not_dot_names),
]
SAFE_ID_HINT = "use 1-64 letters, digits, '.', '_' or '-' (it names a directory)"


class Credentials(BaseModel):
    """Per-job secrets; a missing one falls back to the worker's environment."""

    model_config = ConfigDict(extra="forbid")

    hf_token: SecretStr | None = None
    wandb_api_key: SecretStr | None = None


HUB_REPO_ID = r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$"


class PublishOptions(BaseModel):
    """What to publish besides the adapter (or full model) that goes to args.hub_model_id."""

    model_config = ConfigDict(extra="forbid")

    merge_lora: bool = Field(default=False, description="Also merge the LoRA into the base model and keep (and push) the merged weights.")
    merged_hub_model_id: Annotated[str, StringConstraints(pattern=HUB_REPO_ID)] | None = Field(
        default=None, description="Repo for the merged weights; default: the merged/ folder of hub_model_id."
    )


class JobInput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    user_id: SafeId
    model_id: SafeId
    run_id: SafeId
    credentials: Credentials = Field(default_factory=Credentials)
    args: dict[str, Any] = Field(description="An Axolotl config: any option `axolotl train` accepts.")
    publish: PublishOptions = Field(default_factory=PublishOptions)
    mode: Literal["train", "preflight"] = Field(
        default="train",
        description="preflight: validate, load and tokenize the datasets exactly as training would, report statistics "
        "and marked-up examples, and stop without training (needs the tokenizer, not the model weights).",
    )
    restart: bool = Field(
        default=False,
        description="Train this run_id again from scratch; an earlier attempt is kept, renamed <run_id>.previous-<time>.",
    )


def format_loc(loc: tuple[Any, ...] | list[Any]) -> str:
    """('args', 'datasets', 0, 'type') -> 'args.datasets[0].type'."""
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text


def suggest(word: str, candidates: list[str]) -> str:
    match = difflib.get_close_matches(word, candidates, n=1, cutoff=0.75)
    return f"; did you mean '{match[0]}'?" if match else ""


def _problem_from_pydantic(error: dict) -> Problem:
    loc = tuple(error["loc"])
    kind = error["type"]
    field = loc[-1] if loc else ""
    if kind == "extra_forbidden":
        model = {"credentials": Credentials, "publish": PublishOptions}.get(loc[0], JobInput) if len(loc) > 1 else JobInput
        return Problem(format_loc(loc), f"unknown field{suggest(str(field), list(model.model_fields))}")
    if kind == "missing":
        return Problem(format_loc(loc), "required field is missing")
    if field in ("user_id", "model_id", "run_id"):
        return Problem(format_loc(loc), f"invalid id; {SAFE_ID_HINT}")
    if kind == "string_pattern_mismatch" and field == "merged_hub_model_id":
        return Problem(format_loc(loc), "must be a Hub repo id like 'owner/name'")
    message = error["msg"].removeprefix("Value error, ")
    return Problem(format_loc(loc), message)


def parse_job_input(raw: Any, max_bytes: int) -> tuple[JobInput | None, list[Problem]]:
    """Parse the request; return the job or every problem found."""
    if not isinstance(raw, dict):
        return None, [Problem("input", "must be a JSON object with user_id, model_id, run_id, credentials and args")]
    size = len(json.dumps(raw, default=str))
    if size > max_bytes:
        return None, [Problem("input", f"request is {size} bytes; the limit is {max_bytes} bytes")]
    try:
        return JobInput.model_validate(raw), []
    except ValidationError as exc:
        return None, [_problem_from_pydantic(e) for e in exc.errors()]
