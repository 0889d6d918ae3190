"""`continue_from`: which earlier run a job starts from, checked before anything loads.

The earlier run is looked up only under the job's own user (`runs/<user_id>/<run_id>`):
another user's run is never read, and answers exactly as a run that does not exist.
Pure but for reading the earlier run's files (job.json, config.yaml, trained.json,
its output and adapter_config.json).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from finetune_worker.checks.paths import PathRoots, config_path_problem
from finetune_worker.contract.errors import Problem
from finetune_worker.contract.job import (
    LORA_ADAPTERS,
    JobInput,
)
from finetune_worker.host.rundir import (
    checkpoints_named,
    has_weights,
    is_complete_checkpoint,
    read_config,
    read_json,
    run_paths,
    through_link,
    weights_problem,
)

MAX_LINEAGE = 100  # runs in one chain: past this, job.json files point in a circle


@dataclass(frozen=True)
class Origin:
    """What the new run starts from: an adapter (`lora_model_dir`) or weights (`base_model`)."""

    run_id: str
    checkpoint: str | int
    path: Path
    starts_as: str  # "adapter" or "base_model"
    base_model: str  # the model the chain started from (what the job's base_model must name)
    earlier: tuple[dict, ...]  # the lineage up to and including the earlier run
    tokenizer: str | None = None  # the base model's tokenizer, when the weights directory has none


def no_such_run(run_id: str) -> Problem:
    # The same words for a run that does not exist and for another user's run.
    return Problem("continue_from.run_id", f"no such run: {run_id!r} (continue_from names an earlier run of this user_id)")


def resolve_continue_from(job: JobInput, args: dict[str, Any], runs_dir: Path, roots: PathRoots) -> tuple[Origin | None, list[Problem]]:
    """The earlier run's output this job starts from, or the problems that refuse it.
    `args`: the checked args (local paths absolute); empty when they failed their checks.
    A run directory that is a link is not followed, and the paths the earlier run's
    config.yaml names are confined to what this job's user may read (`roots`)."""
    wanted = job.continue_from
    if wanted is None:
        return None, []
    if wanted.run_id == job.run_id:
        return None, [Problem("continue_from.run_id", "names this run itself; to resume it after a stop, send the same job "
                                                      "without continue_from (it resumes from its last checkpoint)")]
    paths = run_paths(runs_dir, job.user_id, wanted.run_id)
    if through_link(paths.run_dir) or not paths.run_dir.is_dir():
        return None, [no_such_run(wanted.run_id)]
    record = read_json(paths.job_file)
    earlier_config = read_config(paths.config_file)
    if not isinstance(record, dict) or not isinstance(earlier_config, dict):
        return None, [no_such_run(wanted.run_id)]
    if problem := config_path_problem(earlier_config, roots):
        return None, [Problem("continue_from.run_id", f"run {wanted.run_id!r} cannot be continued: its config.yaml's {problem}")]
    adapter_run = earlier_config.get("adapter") in LORA_ADAPTERS
    wants_adapter = args.get("adapter") in LORA_ADAPTERS if args else None  # None: the args failed their own checks
    where, problem = _earlier_output(paths, wanted.checkpoint, adapter_run, wants_adapter)
    if problem:
        return None, [problem]
    base = base_model_of(record, earlier_config)
    origin = Origin(
        run_id=wanted.run_id, checkpoint=wanted.checkpoint, path=where,
        starts_as="adapter" if adapter_run and wants_adapter is not False else "base_model",
        base_model=base, earlier=tuple(lineage_of(record, earlier_config)),
    )
    if not args:
        return origin, []
    problems = _compatibility_problems(origin, args, earlier_config)
    if origin.starts_as == "base_model" and not (where / "tokenizer_config.json").exists() and not args.get("tokenizer_config"):
        origin = replace(origin, tokenizer=base)
    return (None, problems) if problems else (origin, [])


def _earlier_output(paths, checkpoint: str | int, adapter_run: bool, wants_adapter: bool | None) -> tuple[Path, Problem | None]:
    """The directory to start from: the final output, its merged LoRA, or a checkpoint."""
    run_id = paths.run_dir.name
    if checkpoint == "final":
        output = paths.output_dir
        if read_json(paths.trained_file) is None:
            return output, Problem("continue_from", f"run {run_id!r} has not finished training (no final output); "
                                                    "continue from one of its checkpoints (checkpoint: <step>) or wait for it")
    else:
        output = paths.output_dir / f"checkpoint-{checkpoint}"
        if not (output.is_dir() and is_complete_checkpoint(output)):
            return output, Problem("continue_from.checkpoint",
                                   f"run {run_id!r} has no checkpoint at step {checkpoint}{checkpoints_named(paths.output_dir)}")
    if adapter_run and wants_adapter is False:
        merged = paths.output_dir / "merged"
        if checkpoint == "final" and merged.is_dir() and has_weights(merged):
            return merged, None
        return output, Problem("continue_from", f"run {run_id!r} trained a LoRA adapter: continue it with adapter: lora, "
                                                "or merge its final adapter first (publish.merge_lora) to continue as a full fine-tune")
    if missing := weights_problem(run_id, output, adapter_run):
        return output, Problem("continue_from", missing)
    return output, None


def _compatibility_problems(origin: Origin, args: dict[str, Any], earlier_config: dict) -> list[Problem]:
    """The new config must fit what it starts from: the same base model; for an adapter,
    the same adapter type, rank and target modules as its adapter_config.json."""
    problems = []
    if str(args.get("base_model", "")) != origin.base_model:
        problems.append(Problem("args.base_model", f"{args.get('base_model')!r} is not the base model of run {origin.run_id!r} "
                                                   f"({origin.base_model!r}); continue_from needs the same base_model"))
    if origin.starts_as != "adapter":
        return problems
    if (earlier_config.get("adapter") == "qlora") != (args.get("adapter") == "qlora"):
        problems.append(Problem("args.adapter", f"run {origin.run_id!r} trained with adapter: {earlier_config.get('adapter')}; "
                                                f"continue it with the same adapter type, not {args.get('adapter')}"))
    adapter = read_json(origin.path / "adapter_config.json") or {}
    rank = adapter.get("r")
    if rank is not None and args.get("lora_r") != rank:
        problems.append(Problem("args.lora_r", f"{args.get('lora_r')} does not match the adapter of run {origin.run_id!r} "
                                               f"(lora_r: {rank}); continue_from needs the same rank"))
    problems += _target_problems(origin, args, earlier_config, adapter)
    return problems


def _target_problems(origin: Origin, args: dict, earlier_config: dict, adapter: dict) -> list[Problem]:
    saved = adapter.get("target_modules")
    saved = sorted(saved) if isinstance(saved, (list, tuple)) else [saved] if isinstance(saved, str) else None
    if args.get("lora_target_linear"):
        if earlier_config.get("lora_target_linear"):
            return []
        want = "lora_target_linear: true"
    else:
        modules = args.get("lora_target_modules")
        modules = [modules] if isinstance(modules, str) else sorted(modules or [])
        if saved is None or modules == saved:
            return []
        want = f"lora_target_modules: {modules}"
    return [Problem("args.lora_target_modules", f"{want} does not match the adapter of run {origin.run_id!r} "
                                                f"(target modules {saved}); continue_from needs the same target modules")]


# ---------------------------------------------------------------- lineage


def base_model_of(record: dict, config: dict) -> str:
    """The model a run's chain started from: its lineage's base, else its config's base_model."""
    lineage = record.get("lineage")
    if isinstance(lineage, dict) and isinstance(lineage.get("base_model"), str):
        return lineage["base_model"]
    return str(config.get("base_model", ""))


def lineage_of(record: dict, config: dict) -> list[dict]:
    """The runs of a chain up to and including the run of this job.json (its stored lineage,
    which each run keeps; a run from before lineage was kept stands alone)."""
    lineage = record.get("lineage")
    if isinstance(lineage, dict) and isinstance(lineage.get("runs"), list):
        return lineage["runs"][-MAX_LINEAGE:]
    return [run_entry(record.get("run_id", "?"), record.get("model_id", "?"), config, record.get("continue_from"))]


def run_entry(run_id: str, model_id: str, args: dict, continue_from: dict | None) -> dict:
    """One run of a lineage: what it was, how it trained, on what."""
    entry = {"run_id": run_id, "model_id": model_id, "method": method_of(args), "datasets": dataset_labels(args)}
    if continue_from:
        entry["continue_from"] = continue_from
    return entry


def lineage(job: JobInput, args: dict[str, Any], origin: Origin | None) -> dict:
    """Base model -> each earlier run -> this run, with their datasets and methods."""
    cont = None if job.continue_from is None else job.continue_from.model_dump()
    this = run_entry(job.run_id, job.model_id, args, cont)
    if origin is None:
        return {"base_model": str(args.get("base_model", "")), "runs": [this]}
    return {"base_model": origin.base_model, "runs": [*origin.earlier, this]}


def method_of(args: dict) -> str:
    training = {"dpo": "DPO", "ipo": "IPO", "kto": "KTO", "orpo": "ORPO", "simpo": "SimPO", "grpo": "GRPO"}.get(str(args.get("rl") or ""), "SFT")
    adapter = args.get("adapter")
    return f"{training}, {'QLoRA' if adapter == 'qlora' else 'LoRA' if adapter == 'lora' else 'full fine-tune'}"


def dataset_labels(args: dict) -> list[str]:
    """The datasets by name: a Hub id, a file's name, a URL's file name, or inline rows; never a local path."""
    labels = []
    for entry in args.get("datasets") or []:
        if not isinstance(entry, dict):
            continue
        if isinstance(entry.get("rows"), list):
            labels.append(f"{len(entry['rows'])} inline rows")
            continue
        path = str(entry.get("path", ""))
        if "://" in path:
            labels.append(Path(path.split("?", 1)[0]).name or path)
        elif path.startswith(("/", ".")):
            labels.append(Path(path).name)
        else:
            labels.append(path)
    return labels
