"""Which weights answer: a finished run's output (its adapter or full weights), or one of
its checkpoints. Read from the run's own files only (config.yaml, trained.json, output/).

A job finds its run only under its own user (`runs/<user_id>/<run_id>`): another user's
run answers exactly as a run that does not exist.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune_worker.checks.paths import PathRoots, config_path_problem
from finetune_worker.contract import errors
from finetune_worker.contract.errors import JobError
from finetune_worker.contract.job import LORA_ADAPTERS
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


@dataclass(frozen=True)
class RunOutput:
    """A run's weights, ready to load or serve."""

    name: str  # the run's id (or its directory's name)
    run_dir: Path  # where its config.yaml (and, for a worker run, job.json) live
    config: dict[str, Any]  # the run's Axolotl config (config.yaml)
    model_dir: Path  # the LoRA adapter, or the full weights
    adapter: bool  # a LoRA adapter on config["base_model"]
    checkpoint: str | int  # "final" or a step
    merged_dir: Path | None = None  # the merged LoRA (output/merged), when there is one

    @property
    def config_file(self) -> Path:
        return self.run_dir / "config.yaml"

    @property
    def served_name(self) -> str:
        """What clients call it: the job's model_id for a worker run, else the run's name."""
        record = read_json(self.run_dir / "job.json")
        return str(record.get("model_id")) if isinstance(record, dict) and record.get("model_id") else self.name

    @property
    def base_model(self) -> str:
        return str(self.config.get("base_model", ""))

    @property
    def full_weights(self) -> Path | None:
        """Weights that load on their own: the full fine-tune, or the merged LoRA."""
        return self.merged_dir if self.adapter else self.model_dir

    @property
    def lora_rank(self) -> int | None:
        adapter = read_json(self.model_dir / "adapter_config.json") if self.adapter else None
        rank = adapter.get("r") if isinstance(adapter, dict) else self.config.get("lora_r")
        return rank if isinstance(rank, int) else None


def finished_run(runs_dir: Path, user_id: str, run_id: str, checkpoint: str | int = "final", roots: PathRoots | None = None) -> RunOutput:
    """A job's run to answer with: it must be this user's, and finished (or have that checkpoint).
    A run directory that is a link is not followed; with `roots` (a job's), the paths its
    config.yaml names must be ones that job's user may read."""
    paths = run_paths(runs_dir, user_id, run_id)
    found = paths.run_dir.is_dir() and paths.job_file.is_file() and not through_link(paths.run_dir)
    config = read_config(paths.config_file) if found else None
    if config is None:
        raise errors.run_not_found(user_id, run_id)
    if roots is not None and (problem := config_path_problem(config, roots)):
        raise JobError(errors.INVALID_INPUT, f"run {run_id!r} cannot be loaded: its config.yaml's {problem}")
    if checkpoint == "final" and read_json(paths.trained_file) is None:
        raise JobError(errors.INVALID_INPUT, f"run {run_id!r} has not finished training; wait for it, or answer with one of "
                                             f"its checkpoints (checkpoint: <step>){checkpoints_named(paths.output_dir)}")
    return output_of(run_id, paths.run_dir, config, paths.output_dir, checkpoint)


def run_in_directory(directory: Path, checkpoint: str | int = "final") -> RunOutput:
    """A run given by its directory (a worker run dir or a Pod dir: config.yaml inside)."""
    config = read_config(directory / "config.yaml")
    if config is None:
        raise JobError(errors.RUN_NOT_FOUND, f"{directory} holds no run (no readable config.yaml)")
    output_dir = Path(str(config.get("output_dir") or "output"))
    return output_of(directory.name, directory, config, output_dir if output_dir.is_absolute() else directory / output_dir, checkpoint)


def output_of(name: str, run_dir: Path, config: dict, output_dir: Path, checkpoint: str | int) -> RunOutput:
    adapter = config.get("adapter") in LORA_ADAPTERS
    if checkpoint == "final":
        where = output_dir
    else:
        where = output_dir / f"checkpoint-{checkpoint}"
        if not (where.is_dir() and is_complete_checkpoint(where)):
            raise JobError(errors.INVALID_INPUT, f"run {name!r} has no checkpoint at step {checkpoint}{checkpoints_named(output_dir)}")
    if missing := weights_problem(name, where, adapter):
        raise JobError(errors.INVALID_INPUT, missing)
    merged = output_dir / "merged"
    merged_dir = merged if adapter and checkpoint == "final" and has_weights(merged) else None
    return RunOutput(name=name, run_dir=run_dir, config=config, model_dir=where, adapter=adapter, checkpoint=checkpoint, merged_dir=merged_dir)


