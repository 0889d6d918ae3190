"""The run directory on the volume: created once, never wiped by the worker."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml


@dataclass(frozen=True)
class RunPaths:
    """Everything a run writes lives under its run directory. On a cluster, node 0 owns it;
    node k > 0 keeps its own files (lock, events, log, config, data) in nodes/node-<k>/
    and trains into the same output/ (the one output on a shared volume, its own copy
    otherwise)."""

    run_dir: Path
    node: int = 0

    @property
    def home(self) -> Path:
        """Where this node's own files live: the run directory on node 0 (and off a cluster)."""
        return self.run_dir if self.node == 0 else self.run_dir / "nodes" / f"node-{self.node}"

    @property
    def nonce_file(self) -> Path:
        """A random value this node writes before training: which nodes can read it tells a shared volume from separate ones."""
        return self.run_dir / "nodes" / f"node-{self.node}.nonce"

    @property
    def config_file(self) -> Path:
        return self.home / "config.yaml"

    @property
    def job_file(self) -> Path:
        return self.home / "job.json"

    @property
    def events_file(self) -> Path:
        return self.home / "events.jsonl"

    @property
    def progress_file(self) -> Path:
        return self.home / "progress.jsonl"

    @property
    def log_file(self) -> Path:
        return self.home / "train.log"

    @property
    def output_dir(self) -> Path:
        return self.run_dir / "output"

    @property
    def gguf_dir(self) -> Path:
        """`export:`'s GGUF files: in the output, so they are pushed with the model."""
        return self.output_dir / "gguf"

    @property
    def result_file(self) -> Path:
        return self.home / "result.json"

    @property
    def trained_file(self) -> Path:
        """Written when training completed: a resubmission only publishes."""
        return self.home / "trained.json"

    @property
    def loss_curve(self) -> Path:
        return self.home / "loss.png"

    @property
    def hub_dir(self) -> Path:
        return self.home / "hub"

    @property
    def data_dir(self) -> Path:
        """Datasets sent inline or by URL, written here before Axolotl reads them."""
        return self.home / "data"

    @property
    def evaluation_file(self) -> Path:
        return self.home / "evaluation.json"

    @property
    def export_file(self) -> Path:
        """The GGUF files of `export:` once written: a resubmission pushes them without exporting again."""
        return self.home / "export.json"

    @property
    def preflight_file(self) -> Path:
        return self.home / "preflight.json"

    @property
    def stop_file(self) -> Path:
        """Its presence asks the training to save a checkpoint at its next step and stop there (a budget run out)."""
        return self.home / ".stop-at-checkpoint"

    @property
    def lock_file(self) -> Path:
        # Beside the run directory, so it can be held before the directory exists
        # and while an earlier attempt is moved aside.
        node = "" if self.node == 0 else f".node-{self.node}"
        return self.run_dir.with_name(f"{self.run_dir.name}{node}.lock")


def run_paths(runs_dir: Path, user_id: str, run_id: str, node: int = 0) -> RunPaths:
    return RunPaths(runs_dir / user_id / run_id, node)


def through_link(run_dir: Path) -> bool:
    """A run directory that is a symbolic link, or lies in a user directory that is one:
    the worker never follows it (it could lead into another user's runs)."""
    return run_dir.is_symlink() or run_dir.parent.is_symlink()


def prepare_run_dir(paths: RunPaths) -> None:
    paths.home.mkdir(parents=True, exist_ok=True)
    paths.output_dir.mkdir(exist_ok=True)


def write_atomic(path: Path, text: str) -> None:
    """Write via a temporary file and rename, so readers never see half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_config(config_file: Path, config: dict[str, Any]) -> None:
    """A run's (or a Pod's) config.yaml, the one Axolotl reads; the only writer of one."""
    config_file.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(config_file, yaml.safe_dump(config, sort_keys=False, allow_unicode=True))


def write_json(path: Path, value: Any) -> None:
    write_atomic(path, json.dumps(value, indent=2, default=str) + "\n")


def append_event(events_file: Path, event: dict) -> None:
    """Record an event in a run's events.jsonl; a full disk must not stop the job from reporting it."""
    try:
        with open(events_file, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(event, default=str) + "\n")
    except OSError as exc:
        print(f"finetune-worker: could not record an event in {events_file}: {exc}", file=sys.stderr)


def read_config(path: Path) -> dict | None:
    """A run's config.yaml, or None when it is missing or not a YAML mapping; the only reader of one."""
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return None
    return config if isinstance(config, dict) else None


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, ValueError):
        return None


# ---------------------------------------------------------------- earlier attempts
WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "pytorch_model_fsdp*", "global_step*")


def json_digest(value: Any) -> str:
    """sha256 of a JSON value with its keys sorted: equal values, equal digests."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def args_digest(args: dict[str, Any]) -> str:
    return json_digest(args)


TRAINER_STATE = "trainer_state.json"  # the Trainer writes it last into a checkpoint: its mark of completeness


def checkpoint_step(path: Path) -> int | None:
    suffix = path.name.removeprefix("checkpoint-")
    return int(suffix) if suffix.isdigit() and path.name.startswith("checkpoint-") else None


def is_complete_checkpoint(path: Path) -> bool:
    """The Trainer writes trainer_state.json last: a checkpoint is complete when it
    parses, names this step, and the weights are there."""
    state = read_json(path / TRAINER_STATE)
    if not isinstance(state, dict) or state.get("global_step") != checkpoint_step(path):
        return False
    return any(match.name not in NOT_WEIGHTS for pattern in WEIGHT_PATTERNS for match in path.glob(pattern))


NOT_WEIGHTS = ("training_args.bin",)  # the Trainer's arguments, in every checkpoint: no weights
MODEL_WEIGHTS = ("*.safetensors", "*.bin")  # what from_pretrained loads


def has_weights(directory: Path) -> bool:
    """A directory with model (or adapter) weights that from_pretrained can load."""
    return directory.is_dir() and any(any(directory.glob(pattern)) for pattern in MODEL_WEIGHTS)


# The tokenizer a run saves, chat template included (transformers 5 writes it to chat_template.jinja).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "chat_template.jinja",
                   "chat_template.json", "tokenizer.model", "vocab.json", "merges.txt")


# The tokens chat templates end a turn with (ChatML, Llama 3, Gemma, Phi-3, Qwen).
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>")


def copy_run_tokenizer(output_dir: Path, merged_dir: Path) -> None:
    """Give merged weights the tokenizer the run trained with (merge-lora saves the base
    model's, which lacks a chat template the run's config set), and let generation stop
    at its end-of-turn token: a chat fine-tune of a base model ends answers with one, and
    servers (vLLM, transformers serve) stop only at generation_config's eos_token_id."""
    for name in TOKENIZER_FILES:
        if (output_dir / name).is_file():
            shutil.copyfile(output_dir / name, merged_dir / name)
    tokenizer, generation = read_json(merged_dir / "tokenizer.json"), read_json(merged_dir / "generation_config.json")
    if not isinstance(tokenizer, dict) or not isinstance(generation, dict):
        return
    turns = [t["id"] for t in tokenizer.get("added_tokens") or [] if t.get("special") and t.get("content") in END_OF_TURN_TOKENS]
    eos = generation.get("eos_token_id")
    eos = eos if isinstance(eos, list) else [eos] if isinstance(eos, int) else []
    if set(turns) - set(eos):
        write_json(merged_dir / "generation_config.json", {**generation, "eos_token_id": [*eos, *sorted(set(turns) - set(eos))]})


def weights_problem(run_id: str, where: Path, adapter: bool) -> str | None:
    """Why a run's output (or checkpoint) cannot be loaded: no adapter, or no weights."""
    if adapter and not (where / "adapter_config.json").is_file():
        return f"run {run_id!r} left no LoRA adapter in {where.name} (no adapter_config.json)"
    if not adapter and not has_weights(where):
        return f"run {run_id!r} left no model weights in {where.name}"
    return None


def checkpoints_named(output_dir: Path) -> str:
    """The complete checkpoints a run kept, said after a refusal that names a step."""
    steps = [checkpoint_step(p) for p in checkpoints(output_dir) if is_complete_checkpoint(p)]
    return f"; its checkpoints: {', '.join(map(str, steps))}" if steps else "; it has no complete checkpoint"


def checkpoints(output_dir: Path) -> list[Path]:
    found = [p for p in output_dir.glob("checkpoint-*") if p.is_dir() and checkpoint_step(p) is not None]
    return sorted(found, key=checkpoint_step)


def last_complete_checkpoint(output_dir: Path) -> Path | None:
    for path in reversed(checkpoints(output_dir)):
        if is_complete_checkpoint(path):
            return path
    return None


@dataclass(frozen=True)
class PreviousRun:
    """What an earlier attempt at this run left on the volume."""

    exists: bool
    args_digest: str | None = None
    result: dict | None = None
    trained: dict | None = None
    checkpoint: Path | None = None
    skipped_checkpoints: tuple[Path, ...] = ()
    continue_from: dict | None = None  # what the earlier attempt started from (job.json)

    @property
    def has_work(self) -> bool:
        return self.result is not None or self.trained is not None or self.checkpoint is not None


def inspect_previous(paths: RunPaths) -> PreviousRun:
    if not paths.run_dir.is_dir():
        return PreviousRun(exists=False)
    job = read_json(paths.job_file) or {}
    resume = last_complete_checkpoint(paths.output_dir)
    newer = tuple(p for p in checkpoints(paths.output_dir) if resume is None or checkpoint_step(p) > checkpoint_step(resume))
    return PreviousRun(
        exists=True,
        args_digest=job.get("args_sha256"),
        result=read_json(paths.result_file),
        trained=read_json(paths.trained_file),
        checkpoint=resume,
        skipped_checkpoints=newer,
        continue_from=job.get("continue_from"),
    )


def move_aside(run_dir: Path) -> Path | None:
    """Keep an earlier attempt (never delete): rename it <run_id>.previous-<time>."""
    if not run_dir.exists():
        return None
    target = run_dir.with_name(f"{run_dir.name}.previous-{time.strftime('%Y%m%d-%H%M%S')}")
    os.rename(run_dir, target)
    return target


def set_aside_diverged(output_dir: Path, nan_step: int) -> list[Path]:
    """Checkpoints written at or after a NaN hold poisoned weights: rename them
    checkpoint-N.diverged so a resume never picks them (they are kept, not deleted)."""
    moved = []
    for path in checkpoints(output_dir):
        if checkpoint_step(path) >= nan_step:
            target = path.with_name(f"{path.name}.diverged")
            os.rename(path, target)
            moved.append(target)
    return moved
