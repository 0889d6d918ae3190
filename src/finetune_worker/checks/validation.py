"""Step 1 of the pipeline: the whole request checked at once, before any download."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Any

from finetune_worker.checks.args import ArgsContext, check_args, early_path_problems
from finetune_worker.checks.continue_from import Origin, lineage, resolve_continue_from
from finetune_worker.checks.export import export_problems
from finetune_worker.checks.options import AXOLOTL_KEPT_CHECKPOINTS, INLINE_DATASET_KEYS
from finetune_worker.checks.paths import make_roots
from finetune_worker.checks.storage import storage_problems
from finetune_worker.checks.tenancy import TRAINING_HUB_WRITES
from finetune_worker.checks.urlguard import without_url_queries
from finetune_worker.contract import errors
from finetune_worker.contract.errors import JobError, Problem, problems_error
from finetune_worker.contract.job import (
    DEFAULT_NEW_TOKENS,
    GENERATE_MODE,
    LORA_ADAPTERS,
    READING_MODES,
    JobInput,
    blocks_args_check,
    parse_job_input,
)
from finetune_worker.contract.settings import WorkerSettings
from finetune_worker.host.hardware import Hardware
from finetune_worker.host.rundir import args_digest


@dataclass(frozen=True)
class ValidJob:
    job: JobInput
    args: dict[str, Any]  # the endpoint's defaults + the user's args, local paths made absolute
    defaults_used: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()  # warnings about the endpoint's AXOLOTL_* defaults
    origin: Origin | None = None  # what continue_from starts from

    @property
    def lineage(self) -> dict:
        """Base model -> each earlier run (continue_from) -> this run."""
        return lineage(self.job, self.args, self.origin)

    def record(self) -> dict:
        """What job.json keeps: no credential, URLs without their query (a signed URL's query
        is one), and rows sent inline as their count and digest (training rows are in the run's data/)."""
        creds = self.job.credentials
        record = without_url_queries({
            **self.job.model_dump(exclude={"credentials", "args"}),
            "credentials_given": {name: getattr(creds, name) is not None for name in type(creds).model_fields},
            "args_sha256": args_digest(self.args),
            "args": self.job.args,
            "lineage": self.lineage,
        })
        for key in INLINE_DATASET_KEYS:
            for entry in (record.get("args") or {}).get(key) or []:
                _rows_as_digest(entry)
        if isinstance(record.get("evaluation"), dict):
            _rows_as_digest(record["evaluation"].get("dataset"))
        return record


def _rows_as_digest(entry: Any) -> None:
    """`rows: [...]` -> `rows: {"count": N, "sha256": ...}`, in place."""
    if isinstance(entry, dict) and isinstance(entry.get("rows"), list):
        rows = entry["rows"]
        entry["rows"] = {"count": len(rows), "sha256": hashlib.sha256(json.dumps(rows, sort_keys=True, default=str).encode()).hexdigest()}


def validate_job(
    raw: Any, settings: WorkerSettings, hardware: Hardware, parsed: tuple[JobInput | None, list[Problem]] | None = None
) -> ValidJob:
    """Return the checked job, or raise one JobError that lists every problem.
    `parsed`: what parse_job_input(raw) already returned, if the caller needed it first."""
    job, problems = parsed or parse_job_input(raw, settings.max_request_bytes)
    raw_args = raw.get("args") if isinstance(raw, dict) else None
    args: dict[str, Any] = {}
    arg_problems: list[Problem] = []
    defaults, used, notes = _endpoint_defaults(settings, raw_args)
    if isinstance(raw_args, dict) and not any(blocks_args_check(p) for p in problems):
        raw_args = {**defaults, **raw_args}
        context = ArgsContext(
            roots=make_roots(settings.base_volume, settings.examples_dir, job.user_id if job else None),
            hardware=hardware,
            allow_trust_remote_code=settings.allow_trust_remote_code,
        )
        args, arg_problems = check_args(raw_args, context)
        notes = (*notes, *context.notes)
    if job is not None and args:
        arg_problems += hub_write_problems(args, job)
        arg_problems += export_problems(args, settings.llama_cpp_dir)
    if job is not None and job.evaluation is not None:
        arg_problems += _evaluation_problems(job, make_roots(settings.base_volume, settings.examples_dir, job.user_id))
    if job is not None and job.num_processes and hardware.has_gpu and job.num_processes > hardware.gpu_count:
        arg_problems.append(Problem("num_processes", f"this worker has {hardware.gpu_count} GPU(s); use at most {hardware.gpu_count} processes, one per GPU"))
    if args:
        args = with_numbers_as_axolotl_reads(args)
        arg_problems += limit_problems(args, settings) + checkpoint_problems(args, settings)
    if job is not None and job.mode == GENERATE_MODE:
        problems = problems + generation_limit_problems(job, settings)
    if job is not None and job.publish.merge_lora and args.get("adapter") not in LORA_ADAPTERS:
        arg_problems.append(Problem("publish.merge_lora", "needs a LoRA run (args.adapter: lora or qlora); a full fine-tune is already merged"))
    origin = None
    if job is not None and job.continue_from is not None:
        if "lora_model_dir" in args:
            arg_problems.append(Problem("args.lora_model_dir", "continue_from sets the starting adapter; remove lora_model_dir"))
        roots = make_roots(settings.base_volume, settings.examples_dir, job.user_id)
        origin, continue_problems = resolve_continue_from(job, {} if arg_problems else args, settings.runs_dir, roots)
        problems = problems + continue_problems
    if problems or arg_problems:
        code = errors.INVALID_INPUT if problems else errors.INVALID_CONFIG
        raise problems_error(code, problems + arg_problems)
    assert job is not None
    return ValidJob(job=job, args=args, defaults_used=used, notes=notes, origin=origin)


def early_problems(raw: Any, parsed: tuple[JobInput | None, list[Problem]], settings: WorkerSettings) -> list[Problem]:
    """What is wrong without asking Axolotl, known within a second of the start: the
    request's own fields (ids, modes, credentials, options, num_nodes, storage) and, for a job
    that trains, args without a base_model, and dataset or base model paths that are missing
    or not this job's to read. Axolotl's schema takes seconds to import; its check
    (validate_job) runs once there is nothing here."""
    problems = list(parsed[1])
    args, mode = (raw.get("args"), raw.get("mode", "train")) if isinstance(raw, dict) else (None, None)
    if isinstance(args, dict) and mode not in READING_MODES and not any(p.path == "args.base_model" for p in problems):
        if not {**settings.default_args, **args}.get("base_model"):
            problems.append(Problem("args.base_model", "required field is missing: a Hugging Face Hub model id "
                                    "(e.g. NousResearch/Llama-3.2-1B) or a model directory on the volume"))
    job = parsed[0]
    if job is not None and job.mode not in READING_MODES:
        problems += storage_problems(job, settings)
    if job is not None and job.mode not in READING_MODES and isinstance(args, dict):
        roots = make_roots(settings.base_volume, settings.examples_dir, job.user_id)
        known = {p.path for p in problems}
        path_problems, resolved = early_path_problems({**settings.default_args, **args}, roots)
        if not path_problems:
            path_problems = limit_problems(resolved, settings, reads=early_reads) + checkpoint_problems(resolved, settings)
        problems += [p for p in path_problems if p.path not in known]
    return problems


def early_problems_error(problems: list[Problem], parse_problems: list[Problem]) -> JobError:
    """The fast refusal: it says that Axolotl's own check of args has not run yet."""
    about_the_request = parse_problems or any(not p.path.startswith("args.") for p in problems)  # storage, its keys
    error = problems_error(errors.INVALID_INPUT if about_the_request else errors.INVALID_CONFIG, problems)
    error.message += " (found before Axolotl's check of args, which runs once these are fixed)"
    return error


def hub_write_problems(args: dict[str, Any], job: JobInput) -> list[Problem]:
    """The training child's HF_TOKEN is the job's hf_token, else the endpoint's own: a
    config that writes to the Hub must bring its own token, or it would write to any
    repo the operator's token can (validate_job serves shared endpoints only)."""
    if job.credentials.hf_token is not None:
        return []
    return [
        Problem(f"args.{key}", "writes to the Hugging Face Hub during training; send credentials.hf_token with write access "
                "to that repo (the endpoint's own token is not used for this)")
        for key in TRAINING_HUB_WRITES
        if args.get(key)
    ]


AXOLOTL_DEFAULT_SEQUENCE_LEN = 512  # AxolotlInputConfig.sequence_len


def limit_problems(args: dict[str, Any], settings: WorkerSettings, reads: Callable[[str, Any], Any] | None = None) -> list[Problem]:
    """The operator's limits (FINETUNE_MAX_*), against the checked args (local paths absolute).
    `reads`: how an option's value is read as a number (Axolotl's schema, unless early_reads)."""
    problems = []
    read = reads or as_axolotl_reads

    def over(where: str, value: Any, limit: int | float | None, name: str, what: str = "") -> None:
        if limit is not None and isinstance(value, (int, float)) and not isinstance(value, bool) and value > limit:
            problems.append(Problem(where, f"{value}{what} is over this worker's limit of {limit} ({name})"))

    over("args.max_steps", read("max_steps", args.get("max_steps")), settings.max_steps, "FINETUNE_MAX_STEPS")
    sequence_len = args.get("sequence_len")
    over("args.sequence_len", AXOLOTL_DEFAULT_SEQUENCE_LEN if sequence_len is None else read("sequence_len", sequence_len),
         settings.max_sequence_len, "FINETUNE_MAX_SEQUENCE_LEN", " (Axolotl's default)" if sequence_len is None else "")
    if args.get("adapter") in LORA_ADAPTERS:
        over("args.lora_r", read("lora_r", args.get("lora_r")), settings.max_lora_r, "FINETUNE_MAX_LORA_R")
    if settings.max_dataset_bytes is not None:
        total = local_dataset_bytes(args)
        if total > settings.max_dataset_bytes:
            problems.append(Problem(
                "args.datasets", f"the local datasets hold {total} bytes, over this worker's limit of {settings.max_dataset_bytes} (FINETUNE_MAX_DATASET_BYTES)"
            ))
    return problems


def checkpoint_problems(args: dict[str, Any], settings: WorkerSettings) -> list[Problem]:
    """save_total_limit: at or below 0 the Trainer keeps every checkpoint (a run that saves
    every step fills the volume), and over FINETUNE_MAX_CHECKPOINTS it keeps more than the operator allows."""
    kept = args.get("save_total_limit")
    if not isinstance(kept, int) or isinstance(kept, bool):
        return []  # unset (Axolotl keeps 4, capped by the plan), or not a number (Axolotl's schema says so)
    if kept <= 0:
        return [Problem("args.save_total_limit", f"{kept} would keep every checkpoint the run saves; give how many to keep "
                                                 f"(1 or more; unset, Axolotl keeps {AXOLOTL_KEPT_CHECKPOINTS}), or save none with save_strategy: no")]
    if settings.max_checkpoints is not None and kept > settings.max_checkpoints:
        return [Problem("args.save_total_limit", f"{kept} is over this worker's limit of {settings.max_checkpoints} "
                                                 "checkpoints kept per run (FINETUNE_MAX_CHECKPOINTS)")]
    return []


def generation_limit_problems(job: JobInput, settings: WorkerSettings) -> list[Problem]:
    """The operator's caps on a generate job (FINETUNE_MAX_GENERATE_PROMPTS, FINETUNE_MAX_NEW_TOKENS),
    checked before any weights load."""
    problems = []
    field, items = ("prompts", job.prompts) if job.prompts is not None else ("messages", job.messages or [])
    if settings.max_generate_prompts is not None and len(items) > settings.max_generate_prompts:
        problems.append(Problem(field, f"{len(items)} is over this worker's limit of {settings.max_generate_prompts} per job "
                                       "(FINETUNE_MAX_GENERATE_PROMPTS); send them in several jobs"))
    tokens = job.max_new_tokens or DEFAULT_NEW_TOKENS
    if settings.max_new_tokens is not None and tokens > settings.max_new_tokens:
        problems.append(Problem("max_new_tokens", f"{tokens}{'' if job.max_new_tokens else ' (the default)'} is over this worker's "
                                                  f"limit of {settings.max_new_tokens} (FINETUNE_MAX_NEW_TOKENS)"))
    return problems


def as_axolotl_reads(key: str, value: Any) -> Any:
    """`value` as Axolotl's schema will read option `key` ("100000" -> 100000, 1e7 -> 10000000);
    unchanged when the schema would refuse it (the args check reports that)."""
    return _read_with(_option_adapter, key, value)


# The options the operator limits, with the types Axolotl's schema gives them (test_fail_fast
# checks that they still match): read without importing Axolotl, for the early check.
EARLY_NUMBER_TYPES: dict[str, Any] = {"max_steps": int | None, "sequence_len": int, "lora_r": int | None}


def early_reads(key: str, value: Any) -> Any:
    """as_axolotl_reads for an option in EARLY_NUMBER_TYPES, known before Axolotl's schema is imported."""
    return _read_with(_early_adapter, key, value)


def _read_with(adapter: Callable[[str], Any], key: str, value: Any) -> Any:
    if value is None or isinstance(value, bool):
        return value
    from pydantic import ValidationError

    try:
        read = adapter(key).validate_python(value)
    except (ValidationError, ValueError, TypeError, RecursionError):
        return value
    return value if isinstance(read, float) and not math.isfinite(read) else read  # "nan" stays a string: events stay JSON


def with_numbers_as_axolotl_reads(args: dict[str, Any]) -> dict[str, Any]:
    """`args` with each numeric option sent as a string ("10", " 2 ", "1e-4") replaced by the
    number Axolotl's schema reads from it, so the worker's limits and estimates see that number."""
    numeric = _numeric_options()
    return {key: as_axolotl_reads(key, value) if isinstance(value, str) and key in numeric else value for key, value in args.items()}


@cache
def _numeric_options() -> frozenset[str]:
    """Axolotl's top-level options whose type holds only numbers (and None)."""
    from finetune_worker.checks import axolotl_schema
    from finetune_worker.checks.options import _leaves

    numbers = (int, float, type(None))
    return frozenset(
        name for name, info in axolotl_schema.input_config_model().model_fields.items()
        if (leaves := _leaves(info.annotation)) and all(leaf in numbers for leaf in leaves) and (int in leaves or float in leaves)
    )


@cache
def _early_adapter(key: str) -> Any:
    from pydantic import TypeAdapter

    return TypeAdapter(EARLY_NUMBER_TYPES[key])


@cache
def _option_adapter(key: str) -> Any:
    from pydantic import TypeAdapter

    from finetune_worker.checks import axolotl_schema

    return TypeAdapter(axolotl_schema.input_config_model().model_fields[key].annotation)


def local_dataset_bytes(args: dict[str, Any]) -> int:
    """The size of the datasets' local files (a directory: every file in it) and inline rows.
    Each file counts once, however many entries name it (a directory and its own data_files,
    one file in two lists, a link and its target)."""
    import json
    from pathlib import Path

    total = 0
    files: dict[Path, int] = {}  # resolved file -> size
    for key in ("datasets", "test_datasets", "pretraining_dataset"):
        for entry in args.get(key) or []:
            if not isinstance(entry, dict):
                continue
            if isinstance(entry.get("rows"), list):
                total += len(json.dumps(entry["rows"]))
            data_files = entry.get("data_files")
            names = [entry.get("path")] + (data_files if isinstance(data_files, list) else [data_files])
            for name in {n for n in names if isinstance(n, str) and n.startswith("/")}:
                path = Path(name)
                try:
                    found = [path] if path.is_file() else [f for f in path.rglob("*") if f.is_file()] if path.is_dir() else []
                    for file in found:
                        real = file.resolve()
                        if real not in files:
                            files[real] = real.stat().st_size
                except (OSError, ValueError, RuntimeError):
                    continue
    return total + sum(files.values())


def _evaluation_problems(job: JobInput, roots) -> list[Problem]:
    """Resolve the eval dataset's path (in place) and check inline eval rows."""
    from finetune_worker.checks.paths import PathRejected, resolve_local_or_hub, worker_files_problem
    from finetune_worker.checks.rows import eval_row_shape, row_problem

    dataset = job.evaluation.dataset
    if dataset.path is not None:
        try:
            dataset.path = resolve_local_or_hub(dataset.path, roots)
            if message := worker_files_problem(dataset.path, roots):
                raise PathRejected(message)
        except PathRejected as exc:
            return [Problem("evaluation.dataset.path", str(exc))]
        return []
    shape = eval_row_shape(dataset.format)
    for index, row in enumerate(dataset.rows or []):
        problem, _ = row_problem(row, shape)
        if problem:
            return [Problem(f"evaluation.dataset.rows[{index}]", problem)]
    return []


def _endpoint_defaults(settings: WorkerSettings, raw_args: Any) -> tuple[dict, tuple[str, ...], tuple[str, ...]]:
    """The endpoint's AXOLOTL_* defaults a job does not set itself; unknown ones are ignored with a note."""
    if not settings.default_args and not settings.default_arg_problems:
        return {}, (), ()
    from finetune_worker.checks import axolotl_schema

    known = axolotl_schema.known_keys()
    defaults = {k: v for k, v in settings.default_args.items() if k in known}
    notes = [f"endpoint default ignored: {p}" for p in settings.default_arg_problems]
    notes += [f"endpoint default AXOLOTL_{k.upper()} is not an Axolotl option and was ignored" for k in settings.default_args if k not in known]
    given = raw_args if isinstance(raw_args, dict) else {}
    used = tuple(sorted(k for k in defaults if k not in given))
    return defaults, used, tuple(notes)


def config_problems_error(problems: list[Problem]) -> JobError:
    return problems_error(errors.INVALID_CONFIG, problems)
