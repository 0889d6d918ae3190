"""The job contract: the typed request that RunPod delivers as `job["input"]`."""

from __future__ import annotations

import difflib
import json
import math
from typing import Annotated, Any, Literal, get_args

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    StringConstraints,
    ValidationError,
    model_validator,
)

from finetune_worker.contract.errors import Problem


def _not_dot_names(value: str) -> str:
    if value in (".", ".."):
        raise ValueError("must not be '.' or '..'")
    if value.endswith(".lock") or ".previous-" in value:
        raise ValueError("must not end with '.lock' or contain '.previous-' (the worker's own names beside a run)")
    return value


SafeId = Annotated[
    str,
    # Not starting with '-': an id may become a program argument (a served model's name, a run given to `serve`).
    StringConstraints(pattern=r"^[A-Za-z0-9._][A-Za-z0-9._-]*$", min_length=1, max_length=64),
    AfterValidator(_not_dot_names),
]
SAFE_ID_HINT = "use 1-64 letters, digits, '.', '_' or '-', not starting with '-' (it names a directory)"


class Credentials(BaseModel):
    """Per-job secrets; a missing token or key falls back to the worker's environment (user_token never does)."""

    model_config = ConfigDict(extra="forbid")

    hf_token: SecretStr | None = None
    wandb_api_key: SecretStr | None = None
    comet_api_key: SecretStr | None = Field(default=None, description="Comet ML key (COMET_API_KEY in the training child); never in args.")
    swanlab_api_key: SecretStr | None = Field(default=None, description="SwanLab key (SWANLAB_API_KEY in the training child); never in args.")
    s3_access_key_id: SecretStr | None = Field(default=None, description="The key of the job's own `storage` destination (S3-compatible).")
    s3_secret_access_key: SecretStr | None = Field(default=None, description="Its secret; with `storage`, both are required.")
    s3_session_token: SecretStr | None = Field(default=None, description="A temporary key's session token (AWS STS), when it has one.")
    user_token: SecretStr | None = Field(
        default=None,
        description="A JWT signed by the operator's service, whose `sub` is this job's user_id; "
        "required when the endpoint sets FINETUNE_USER_TOKEN_SECRET or FINETUNE_USER_TOKEN_PUBLIC_KEY, ignored otherwise.",
    )


HUB_REPO_ID = r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$"
HUB_REPO_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$"  # no owner: the token's user


class PublishOptions(BaseModel):
    """What to publish besides the adapter (or full model) that goes to args.hub_model_id."""

    model_config = ConfigDict(extra="forbid")

    merge_lora: bool = Field(default=False, description="Also merge the LoRA into the base model and keep (and push) the merged weights.")
    merged_hub_model_id: Annotated[str, StringConstraints(pattern=HUB_REPO_ID)] | None = Field(
        default=None, description="Repo for the merged weights; default: the merged/ folder of hub_model_id."
    )


S3_URI = r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/[A-Za-z0-9!_.*'()/-]*)?$"  # a bucket name, then an optional prefix
S3_ENDPOINT_URL = r"^https?://[^\s/?#]+/?$"  # a scheme and a host (and port): no path, query or fragment
S3_REGION = r"^[A-Za-z0-9-]{1,64}$"


class StorageOptions(BaseModel):
    """Where the run's checkpoints and outputs are kept, besides the volume: an S3-compatible bucket."""

    model_config = ConfigDict(extra="forbid")

    uri: Annotated[str, StringConstraints(pattern=S3_URI, max_length=512)] = Field(
        description="s3://bucket/prefix: the run's objects go under <prefix>/<user_id>/<run_id>/.")
    endpoint_url: Annotated[str, StringConstraints(pattern=S3_ENDPOINT_URL, max_length=512)] | None = Field(
        default=None, description="The S3 API's address for a service other than AWS (R2, B2, MinIO, RunPod's S3 API); AWS when unset.")
    region: Annotated[str, StringConstraints(pattern=S3_REGION)] | None = Field(
        default=None, description="The bucket's region (AWS: us-east-1 when unset; R2: auto; RunPod: the datacenter, EUR-IS-1).")


EvalMetric = Literal["exact_match", "jaccard", "rouge1", "rouge2", "rougeL", "bleu", "loss", "perplexity"]
EVAL_METRICS: tuple[str, ...] = get_args(EvalMetric)


class EvaluationDataset(BaseModel):
    """The eval examples: a Hub dataset, a file on the volume, or rows in the request."""

    model_config = ConfigDict(extra="forbid")

    path: str | None = Field(default=None, description="A Hub dataset id or a file on the volume (.jsonl, .json, .csv, .parquet).")
    rows: list[dict[str, Any]] | None = Field(default=None, max_length=1000, description="Examples inline in the request.")
    format: Literal["auto", "alpaca", "messages", "prompt_completion"] = Field(
        default="auto",
        description="alpaca: instruction/input/output; messages: a conversation ending with the assistant's reference answer; "
        "prompt_completion: prompt/completion; auto: told by the fields.",
    )
    name: str | None = Field(default=None, description="The Hub dataset's configuration name.")
    split: str = "train"

    @model_validator(mode="after")
    def _one_source(self) -> EvaluationDataset:
        if (self.path is None) == (self.rows is None):
            raise ValueError("give exactly one of path (a Hub dataset or a file on the volume) or rows (inline examples)")
        if self.rows is not None and not self.rows:
            raise ValueError("rows must not be empty")
        return self


GENERATION_BATCH = 8  # prompts per generate() call: the evaluation's answers and mode generate's


class EvaluationOptions(BaseModel):
    """Compare the fine-tune with its base model after training, and optionally gate the push."""

    model_config = ConfigDict(extra="forbid")

    dataset: EvaluationDataset
    num_examples: int = Field(default=20, ge=1, le=1000, description="How many examples (the first N) to evaluate.")
    max_new_tokens: int = Field(default=64, ge=1, le=2048)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0, description="0 means greedy decoding (the default).")
    samples: int = Field(default=3, ge=0, le=20, description="How many examples to show in the result and the model card.")
    publish_if_better: EvalMetric | None = Field(
        default=None, description="Push only if the fine-tune beats the base model on this metric (loss/perplexity: lower is better)."
    )
    min_improvement: float = Field(default=0.0, ge=0.0, description="With publish_if_better: by more than this much.")


# Modes that only read the user's runs on the volume: no args, no lock, no child.
HISTORY_MODES = ("runs", "events")
# generate: a finished run answers prompts (in a child); it never trains, takes no lock.
GENERATE_MODE = "generate"
READING_MODES = (*HISTORY_MODES, GENERATE_MODE)  # modes without model_id and args
RUNS_PAGE_DEFAULT, RUNS_PAGE_MAX = 50, 200
EVENTS_PAGE_DEFAULT, EVENTS_PAGE_MAX = 200, 1000
GENERATION_FIELDS = ("prompts", "messages", "max_new_tokens", "temperature", "top_p", "checkpoint")
# What each reading mode needs besides its mode; every other field is refused there.
LORA_ADAPTERS = ("lora", "qlora")  # Axolotl's adapters that save a PEFT LoRA adapter (adapter_config.json)
MODE_FIELDS = {"runs": {"user_id", "mode", "credentials", "limit", "offset"},
               "events": {"user_id", "mode", "credentials", "run_id", "limit", "offset"},
               GENERATE_MODE: {"user_id", "mode", "credentials", "run_id", *GENERATION_FIELDS}}
# The credentials a reading mode uses: generate may need the Hub token for a gated base model.
MODE_CREDENTIALS = {"runs": {"user_token"}, "events": {"user_token"}, GENERATE_MODE: {"user_token", "hf_token"}}
TRAINING_REQUIRED = ("model_id", "run_id", "args")


Checkpoint = Literal["final"] | Annotated[int, Field(ge=1)]


class ChatMessage(BaseModel):
    """One message of a conversation, as a chat template reads it."""

    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant", "tool"]
    content: str


class ContinueFrom(BaseModel):
    """An earlier run of the same user_id that this run starts from (its own run_id)."""

    model_config = ConfigDict(extra="forbid")

    run_id: SafeId = Field(description="The earlier run, on the volume under this job's user_id.")
    checkpoint: Checkpoint = Field(
        default="final",
        description="final: the earlier run's finished output (a LoRA adapter, a full fine-tune's weights, or its merged "
        "LoRA for a full fine-tune); a number: that step's checkpoint (output/checkpoint-N).",
    )


# generate's hard bounds (the operator's FINETUNE_MAX_GENERATE_PROMPTS / FINETUNE_MAX_NEW_TOKENS may lower them).
MAX_GENERATE_PROMPTS, MAX_NEW_TOKENS, DEFAULT_NEW_TOKENS = 256, 8192, 128


ESTIMATE_MODE = "estimate"
ESTIMATING_MODES = ("preflight", ESTIMATE_MODE)  # tokenize, answer, and stop before any model loads


class JobInput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    user_id: SafeId
    model_id: SafeId | None = Field(default=None, description="Required for train, preflight and estimate; not used by runs and events.")
    run_id: SafeId | None = Field(default=None, description="Required for train, preflight, estimate and events; not used by runs.")
    credentials: Credentials = Field(default_factory=Credentials)
    args: dict[str, Any] | None = Field(default=None, description="An Axolotl config: any option `axolotl train` accepts.")
    publish: PublishOptions = Field(default_factory=PublishOptions)
    storage: StorageOptions | None = Field(
        default=None, description="Also keep checkpoints and outputs in this S3-compatible bucket (the keys in credentials.s3_*); "
        "a run missing from the volume resumes from there.")
    evaluation: EvaluationOptions | None = Field(default=None, description="Evaluate the fine-tune against its base model before publishing.")
    num_processes: int | None = Field(
        default=None, ge=1, le=64,
        description="Training processes (accelerate launch); default: one per visible GPU. On a CPU worker, >1 runs DDP over gloo.",
    )
    num_nodes: int | None = Field(
        default=None, ge=1, le=64,
        description="Machines the job trains on. More than 1 only with `finetune-worker cluster JOB.json` on every node of a "
        "cluster (RunPod Instant Clusters, dstack, SkyPilot, torchrun); a serverless endpoint runs a job on one machine.",
    )
    mode: Literal["train", "preflight", "estimate", "runs", "events", "generate"] = Field(
        default="train",
        description="preflight: validate, load and tokenize the datasets exactly as training would, report statistics "
        "and marked-up examples, and stop without training (needs the tokenizer, not the model weights). "
        "estimate: a preflight whose answer is the time and cost table: for each GPU type and count, fits or not, "
        "training and total seconds, cost; judged for GPUs, whatever machine answers it. "
        "runs: list this user's runs on the volume, newest first (limit, offset). "
        "events: one run's recorded events (run_id), from offset on. runs and events only read the volume. "
        "generate: a finished run (run_id, checkpoint) answers prompts or messages; nothing trains.",
    )
    max_cost: float | None = Field(
        default=None, gt=0, allow_inf_nan=False,
        description="US dollars this job may cost at the worker's price per hour (FINETUNE_GPU_PRICES): over its estimate, it is "
        "refused before anything downloads; a training whose measured pace would pass it stops at a checkpoint (budget_exceeded).")
    max_hours: float | None = Field(default=None, gt=0, allow_inf_nan=False, description="Hours this job may take, kept the same way as max_cost.")
    restart: bool = Field(
        default=False,
        description="Train this run_id again from scratch; an earlier attempt is kept, renamed <run_id>.previous-<time>.",
    )
    limit: int | None = Field(  # its cap depends on the mode: page_problems
        default=None, ge=1,
        description=f"runs and events only: the page size (runs: default {RUNS_PAGE_DEFAULT}, at most {RUNS_PAGE_MAX}; "
        f"events: default {EVENTS_PAGE_DEFAULT}, at most {EVENTS_PAGE_MAX}).",
    )
    offset: int | None = Field(
        default=None, ge=0,
        description="runs and events only: where the page starts (runs: how many of the newest runs to skip; "
        "events: the index of the first event, as the previous page's next_offset).",
    )

    prompts: list[Annotated[str, StringConstraints(min_length=1)]] | None = Field(
        default=None, min_length=1, max_length=MAX_GENERATE_PROMPTS,
        description="generate only: prompts, each formatted the way the run was trained (its prompt template, "
        "or one user message in its chat template, or as is for a completion run).",
    )
    messages: list[Annotated[list[ChatMessage], Field(min_length=1)]] | None = Field(
        default=None, min_length=1, max_length=MAX_GENERATE_PROMPTS,
        description="generate only: conversations, each ending with a user message, formatted by the run's chat template.",
    )
    max_new_tokens: int | None = Field(default=None, ge=1, le=MAX_NEW_TOKENS, description=f"generate only: default {DEFAULT_NEW_TOKENS}.")
    temperature: float | None = Field(default=None, ge=0.0, le=2.0, description="generate only: 0 (the default) is greedy decoding.")
    top_p: float | None = Field(default=None, gt=0.0, le=1.0, description="generate only: nucleus sampling (with temperature > 0); default 1.")
    checkpoint: Checkpoint | None = Field(
        default=None, description="generate only: final (the default: the run's finished output) or a step's checkpoint."
    )

    continue_from: ContinueFrom | None = Field(
        default=None,
        description="Start from an earlier run of this user_id: its LoRA adapter becomes the starting adapter "
        "(the same base_model, adapter, lora_r and target modules), or its full weights (or merged LoRA) the base model.",
    )


def mode_problems(raw: dict) -> list[Problem]:
    """The fields each mode needs, and those it refuses: train and preflight need
    model_id, run_id and args; runs, events and generate only read the volume (generate
    in a child), so they refuse what would only matter to a training."""
    mode = raw.get("mode", "train")
    if mode not in READING_MODES:
        problems = [Problem(name, "required field is missing") for name in TRAINING_REQUIRED if name not in raw]
        problems += [Problem(name, "Input should be a valid dictionary" if name == "args" else f"invalid id; {SAFE_ID_HINT}")
                     for name in TRAINING_REQUIRED if name in raw and raw[name] is None]  # the model takes None for reading modes
        problems += [Problem(name, "only used by mode 'runs' or 'events'") for name in ("limit", "offset") if name in raw]
        return problems + [Problem(name, "only used by mode 'generate'") for name in GENERATION_FIELDS if name in raw]
    what = "it answers prompts with a finished run" if mode == GENERATE_MODE else "it only reads this user's runs"
    problems = [Problem(name, f"not used by mode '{mode}' ({what})")
                for name in raw if name not in MODE_FIELDS[mode] | {"run_id"} and name in JobInput.model_fields]
    if mode in ("events", GENERATE_MODE) and raw.get("run_id") is None:
        whose = "whose events to read" if mode == "events" else "that answers"
        problems.append(Problem("run_id", f"required field is missing (the run {whose})"))
    if mode == "runs" and "run_id" in raw:
        problems.append(Problem("run_id", "mode 'runs' lists every run of this user; use mode 'events' with a run_id for one run"))
    if mode == GENERATE_MODE and ("prompts" in raw) == ("messages" in raw):
        problems.append(Problem("prompts", "give exactly one of prompts (a list of strings) or messages (a list of conversations)"))
    credentials = raw.get("credentials")
    if isinstance(credentials, dict):
        used = MODE_CREDENTIALS[mode]
        problems += [Problem(f"credentials.{name}", f"not used by mode '{mode}' (only {' and '.join(sorted(used))})")
                     for name in credentials if name not in used and name in Credentials.model_fields]
    return problems + _conversation_problems(raw.get("messages") if mode == GENERATE_MODE else None)


def _conversation_problems(conversations: Any) -> list[Problem]:
    """A conversation to answer must end with a message the model replies to."""
    if not isinstance(conversations, list):
        return []
    return [Problem(f"messages[{i}]", "ends with the assistant's message: end each conversation with the message to answer")
            for i, conversation in enumerate(conversations)
            if isinstance(conversation, list) and conversation and isinstance(conversation[-1], dict)
            and conversation[-1].get("role") == "assistant"]


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
    """A hint only when it is plausibly a typo: a few letters added, dropped, swapped
    or changed (two for a word of up to 12 letters, three beyond)."""
    allowed = 1 if len(word) <= 5 else 2 if len(word) <= 12 else 3
    scored = sorted((_typo_distance(word.lower(), c.lower()), c) for c in candidates if abs(len(c) - len(word)) <= allowed)
    if scored and scored[0][0] <= allowed:
        return f"; did you mean '{scored[0][1]}'?"
    match = difflib.get_close_matches(word, candidates, n=1, cutoff=0.9)
    return f"; did you mean '{match[0]}'?" if match else ""


def _typo_distance(a: str, b: str) -> int:
    """Edit distance counting a swap of two neighbouring letters as one edit."""
    rows = [list(range(len(b) + 1))]
    for i in range(1, len(a) + 1):
        row = [i] + [0] * len(b)
        for j in range(1, len(b) + 1):
            row[j] = min(rows[-1][j] + 1, row[j - 1] + 1, rows[-1][j - 1] + (a[i - 1] != b[j - 1]))
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                row[j] = min(row[j], rows[-2][j - 2] + 1)
        rows.append(row)
    return rows[-1][-1]


def _problem_from_pydantic(error: dict) -> Problem:
    loc = tuple(error["loc"])
    kind = error["type"]
    field = loc[-1] if loc else ""
    if kind == "extra_forbidden":
        return Problem(format_loc(loc), f"unknown field{suggest(str(field), list(_model_at(loc[:-1]).model_fields))}")
    if kind == "missing":
        return Problem(format_loc(loc), "required field is missing")
    if field in ("user_id", "model_id", "run_id"):
        return Problem(format_loc(loc), f"invalid id; {SAFE_ID_HINT}")
    if kind == "string_pattern_mismatch" and field == "merged_hub_model_id":
        return Problem(format_loc(loc), "must be a Hub repo id like 'owner/name'")
    message = error["msg"].removeprefix("Value error, ")
    return Problem(format_loc(loc), message)


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel]:
    """The pydantic model that holds the field at `loc`."""
    model: type[BaseModel] = JobInput
    for part in loc:
        annotation = model.model_fields[part].annotation if part in model.model_fields else None
        nested = next((t for t in (annotation, *getattr(annotation, "__args__", ())) if isinstance(t, type) and issubclass(t, BaseModel)), None)
        if nested is None:
            break
        model = nested
    return model


# Lists and objects inside one another, counting the request itself: a real
# Axolotl config needs fewer than 10; past this, the checks would recurse too deep.
MAX_NESTING_DEPTH = 32


def nesting_depth(value: Any, stop_after: int = MAX_NESTING_DEPTH) -> int:
    """How deeply lists and objects nest in `value` (a scalar: 0), without recursion;
    stops counting past `stop_after`."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            children = node.values()
        elif isinstance(node, (list, tuple)):
            children = node
        else:
            continue
        deepest = max(deepest, depth)
        if deepest > stop_after:
            break
        stack.extend((child, depth + 1) for child in children)
    return deepest


def printable(text: str) -> str:
    """`text` with any lone surrogate written as an escape, so it can be printed or saved."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def value_problems(raw: Any) -> list[Problem]:
    """Numbers that are not finite (NaN, Infinity: JSON has neither, but Python's parser
    accepts them, and 1e400 reads as Infinity) and strings with a lone surrogate (they
    cannot be written as UTF-8), anywhere in the request, keys included."""
    problems: list[Problem] = []
    stack: list[tuple[Any, tuple]] = [(raw, ())]
    while stack and len(problems) < 20:
        node, loc = stack.pop()
        if isinstance(node, float) and not math.isfinite(node):
            problems.append(Problem(printable(format_loc(loc)) or "input", f"must be a finite number, not {node}"))
        elif isinstance(node, str) and printable(node) != node:
            problems.append(Problem(printable(format_loc(loc)) or "input", "contains a lone surrogate (\\ud800-\\udfff): not valid Unicode text"))
        elif isinstance(node, dict):
            for key, value in node.items():
                if isinstance(key, str) and printable(key) != key:
                    problems.append(Problem(printable(format_loc((*loc, key))), "this key contains a lone surrogate: not valid Unicode text"))
                stack.append((value, (*loc, key)))
        elif isinstance(node, list):
            stack.extend((value, (*loc, index)) for index, value in enumerate(node))
    return sorted(problems, key=lambda p: p.path)


def blocks_args_check(problem: Problem) -> bool:
    """A problem the parser found that the args check must not run past."""
    return problem.path == "input" or problem.path.startswith(("args.", "args["))


def parse_job_input(raw: Any, max_bytes: int) -> tuple[JobInput | None, list[Problem]]:
    """Parse the request; return the job or every problem found."""
    if not isinstance(raw, dict):
        return None, [Problem("input", "must be a JSON object with user_id, model_id, run_id, credentials and args")]
    if nesting_depth(raw) > MAX_NESTING_DEPTH:
        return None, [Problem("input", f"lists and objects are nested more than {MAX_NESTING_DEPTH} levels deep; no job needs that many")]
    odd_values = value_problems(raw)
    if odd_values:
        return None, odd_values
    size = len(json.dumps(raw, default=str))
    if size > max_bytes:
        return None, [Problem("input", f"request is {size} bytes; the limit is {max_bytes} bytes")]
    problems = mode_problems(raw)
    try:
        job = JobInput.model_validate(raw)
    except ValidationError as exc:
        found = {p.path for p in problems}
        return None, problems + [p for p in map(_problem_from_pydantic, exc.errors()) if p.path not in found]
    problems += page_problems(job)
    return (None, problems) if problems else (job, [])


def page_problems(job: JobInput) -> list[Problem]:
    """A page's size, checked on the parsed value: "1000" and 1000 meet the same cap."""
    top = RUNS_PAGE_MAX if job.mode == "runs" else EVENTS_PAGE_MAX
    if job.limit is not None and job.limit > top:
        return [Problem("limit", f"at most {top} for mode '{job.mode}'")]
    return []
