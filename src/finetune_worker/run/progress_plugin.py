"""The Axolotl plugin the worker adds to every run: it reports progress as JSON lines.

It runs inside the training child process. Each record is one JSON object per line
in the file named by FINETUNE_PROGRESS_FILE; the worker tails that file and turns
records into events. Only the main process (rank 0) writes.

Records: {"kind": "stage", "stage": ...}, {"kind": "downloaded", "at": ...} (when a base model
not yet cached finished downloading), {"kind": "train_begin", "max_steps": ...},
{"kind": "step", ...}, {"kind": "log", "logs": {...}}, {"kind": "checkpoint", ...},
{"kind": "eval", "metrics": {...}}, {"kind": "train_end", ...} (with "peak_memory_reserved" and
"peak_memory_allocated", bytes, the largest over ranks, and "peak_memory_per_rank" with
several processes, on a GPU), {"kind": "saved"}, {"kind": "lengths", "train": {...}, "eval": {...} or null} (the
prepared splits' lengths, for the time and cost table, before training begins),
{"kind": "nan_loss", ...}, {"kind": "disk_quota", "bytes": ..., "limit": ...}, {"kind": "stopped_at_checkpoint"}. Every record has "step" (when known) and "time".
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

from axolotl.integrations.base import BasePlugin
from transformers import TrainerCallback

from finetune_worker.data.preflight import save_one_process_datasets_in_this_process, split_lengths
from finetune_worker.host.hardware import any_rank, peak_gpu_memory, peaks_of_every_rank, wait_for_every_rank
from finetune_worker.plan.children import (
    CLUSTER_TRAINING_ARGS_ENV,
    PROGRESS_FILE_ENV,
    RUN_BYTES_LIMIT_ENV,
    STEP_LIMIT_ENV,
    STOP_FILE_ENV,
)
from finetune_worker.sizing.resources import download_ended


def _is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0" and os.environ.get("LOCAL_RANK", "0") == "0"


def _is_first_on_this_node() -> bool:
    return os.environ.get("LOCAL_RANK", "0") == "0"


def write_record(kind: str, every_node: bool = False, **fields) -> None:
    """A record for the worker (rank 0's; with every_node, each node's first process writes to its own worker)."""
    path = os.environ.get(PROGRESS_FILE_ENV)
    if not path or not (_is_first_on_this_node() if every_node else _is_main_process()):
        return
    record = {"kind": kind, "time": time.time(), **fields}
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record, default=str) + "\n")


def _numbers(logs: dict) -> dict:
    """Numeric entries only; NaN and inf become strings so every record is valid JSON."""
    numbers = {}
    for key, value in logs.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            numbers[key] = value if math.isfinite(value) else str(value)
    return numbers


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _wandb_run():
    import sys

    wandb = sys.modules.get("wandb")  # only when the Trainer's W&B callback imported it
    return getattr(wandb, "run", None) if wandb else None


def _rank_line(args, what: str, state) -> None:
    """Every rank says when it starts and ends, so the log shows that all of them trained."""
    rank, world = os.environ.get("RANK", "0"), os.environ.get("WORLD_SIZE", "1")  # set by torchrun
    print(f"\n[finetune-worker] rank {rank} of {world}: {what} at step {state.global_step}", flush=True)


def _stop_if_over_step_limit(max_steps: int) -> None:
    """The operator's FINETUNE_MAX_STEPS, enforced here, before the first step: stopping
    the child from the worker after it reads train_begin races the first steps."""
    limit = os.environ.get(STEP_LIMIT_ENV, "").strip()
    if limit.isdigit() and int(limit) > 0 and max_steps > int(limit):
        print(f"\n[finetune-worker] {max_steps} steps is over this worker's limit of {limit} ({STEP_LIMIT_ENV}); stopping", flush=True)
        os._exit(3)  # every rank sees the same max_steps and exits; nothing has been trained or saved


def tree_bytes(directory: Path) -> int:
    """Bytes in the files under `directory` (links not followed)."""
    total = 0
    for root, _, files in os.walk(directory):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                continue
    return total


def _stop_if_over_run_size(args, state) -> None:
    """The operator's FINETUNE_MAX_RUN_BYTES, checked after each checkpoint is complete (the
    Trainer calls on_save once it is written and older ones are rotated away): past it, the
    training ends here, this checkpoint kept for a resume. The run directory is output_dir's parent."""
    limit = os.environ.get(RUN_BYTES_LIMIT_ENV, "").strip()
    if not (limit.isdigit() and int(limit) > 0):
        return
    size = tree_bytes(Path(args.output_dir).parent)
    if size > int(limit):
        write_record("disk_quota", step=state.global_step, bytes=size, limit=int(limit))
        print(f"\n[finetune-worker] the run directory holds {size} bytes, over this worker's limit of {limit} ({RUN_BYTES_LIMIT_ENV}); "
              f"stopping at the checkpoint of step {state.global_step}", flush=True)
        os._exit(4)  # every rank sees the same directory and exits; the checkpoint is complete


def _stop_requested() -> bool:
    """The worker asked for a stop at the next checkpoint (a budget run out: sizing/budget.py)."""
    path = os.environ.get(STOP_FILE_ENV)
    return bool(path) and os.path.exists(path)


def _stop_here(state) -> None:
    """After the checkpoint the worker asked for: once every rank is past its save (rank 0's
    is complete then), every rank ends the training here, keeping it."""
    wait_for_every_rank()
    write_record("stopped_at_checkpoint", every_node=True, step=state.global_step)  # each node's worker learns why
    print(f"\n[finetune-worker] stopping at the checkpoint of step {state.global_step}, as the worker asked", flush=True)
    os._exit(5)


def _save_weights_on_this_node(args, state, model) -> None:
    """A cluster without a shared volume keeps a whole checkpoint on every node
    (save_on_each_node); the Trainer writes the weights from the global main process only,
    so the first process of each other node writes its own copy (DDP: every rank holds
    the same weights). The checkpoint counts as complete once they are there."""
    if model is None or not args.save_on_each_node or args.local_process_index != 0 or args.process_index == 0:
        return
    checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
    aside = checkpoint / ".node-weights"  # a node killed while writing leaves no weights in the checkpoint
    model.save_pretrained(aside)
    for written in sorted(aside.iterdir()):
        os.replace(written, checkpoint / written.name)
    aside.rmdir()


class ProgressCallback(TrainerCallback):
    def __init__(self):
        self.stopping = False  # the worker asked for a stop, and every rank agreed at the same step

    def on_train_begin(self, args, state, control, **kwargs):
        _rank_line(args, "training started", state)
        write_record(
            "train_begin",
            step=state.global_step,
            max_steps=state.max_steps,
            num_train_epochs=state.num_train_epochs,
            world_size=args.world_size,
            parallel_mode=str(args.parallel_mode.value),
        )
        _stop_if_over_step_limit(state.max_steps)
        run = _wandb_run()
        if run is not None:
            write_record("wandb", url=run.url, project=run.project, name=run.name, run_id=run.id, dir=run.dir)

    def on_step_end(self, args, state, control, **kwargs):
        # control.should_log is already this step's (the Trainer's DefaultFlowCallback runs first):
        # the worker then holds the step's progress event until its loss is logged
        write_record("step", step=state.global_step, max_steps=state.max_steps, epoch=state.epoch, log_follows=bool(control.should_log))
        # The stop file is on node 0 (and a rank may see it a step before another): every rank
        # takes the same decision at the same step, or the others would wait at the next collective.
        if not self.stopping and any_rank(_stop_requested(), args.device):
            self.stopping = True
            control.should_save = True  # on_save then ends the training at this checkpoint

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = _numbers(logs or {})
        write_record("log", step=state.global_step, max_steps=state.max_steps, logs=logs)
        diverged = {k: logs[k] for k in ("loss", "grad_norm") if isinstance(logs.get(k), str)}
        if diverged:
            # Axolotl's loss watchdog compares against a threshold, which NaN never
            # crosses, and the Trainer's logging_nan_inf_filter hides a NaN loss (it
            # logs 0.0), but the gradient norm still shows it: once it is NaN the
            # optimizer step has poisoned the weights.
            write_record("nan_loss", step=state.global_step, **diverged)
            control.should_training_stop = True

    def on_save(self, args, state, control, **kwargs):
        _save_weights_on_this_node(args, state, kwargs.get("model"))
        path = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        write_record("checkpoint", step=state.global_step, path=str(path))
        _stop_if_over_run_size(args, state)
        if self.stopping:
            _stop_here(state)

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        write_record("eval", step=state.global_step, metrics=_numbers(metrics or {}))

    def on_train_end(self, args, state, control, **kwargs):
        _rank_line(args, "training finished", state)
        peaks = peaks_of_every_rank(peak_gpu_memory())  # every rank calls on_train_end: the gather is collective
        write_record("train_end", step=state.global_step, max_steps=state.max_steps, **peaks)


class ProgressPlugin(BasePlugin):
    """Registered by the worker in `plugins:`; users never set it themselves."""

    def register(self, cfg):
        save_one_process_datasets_in_this_process()  # before Axolotl saves the prepared dataset
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not _has_cuda():
            # Axolotl 0.21 probes NCCL peer-to-peer access between GPUs before training
            # (utils/trainer.prepare_optim_env); without a GPU a CUDA build of torch raises
            # there. A multi-process run without GPUs (gloo) has no peer access to probe.
            import axolotl.utils.trainer

            axolotl.utils.trainer.check_cuda_p2p_ib_support = lambda: False

    def get_training_args(self, cfg):
        """The tokens trained on, counted by the Trainer (non-padding, summed over ranks: the
        measured tokens per second); on a cluster (run/cluster_rank.py) also gloo on CPU nodes,
        a checkpoint on every node without a shared volume, and the worker's process-group timeout.
        A preference trainer's batches have no input_ids to count."""
        extra = os.environ.get(CLUSTER_TRAINING_ARGS_ENV)
        found = json.loads(extra) if extra else {}
        if not cfg.get("rl"):
            found["include_num_input_tokens_seen"] = "non_padding"
        return found or None

    def load_datasets(self, cfg, preprocess: bool = False):
        write_record("stage", stage="preprocessing")
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not _has_cuda():
            # Axolotl (0.19 to 0.21) maps every rank to device index LOCAL_RANK, which means a
            # GPU; a multi-process run without one (gloo: the tests' proof of the
            # launch path) loads on the CPU. This is the last hook before the model
            # loader reads cfg.device_map.
            cfg.device_map = "cpu"
        return None  # let Axolotl load the datasets as usual

    def pre_model_load(self, cfg):
        self.loading_since = time.time()
        write_record("stage", stage="downloading")

    def post_model_load(self, cfg, model):
        """The download's end, apart from the loading: when the base model's last file landed in the Hub cache."""
        if not _is_main_process() or Path(str(cfg.base_model)).exists():
            return
        from huggingface_hub import constants

        ended = download_ended(str(cfg.base_model), Path(constants.HF_HUB_CACHE), getattr(self, "loading_since", time.time()))
        if ended is not None:
            write_record("downloaded", at=ended)

    def add_callbacks_pre_trainer(self, cfg, model):
        return [ProgressCallback()]

    def post_trainer_create(self, cfg, trainer):
        """The prepared train split's lengths, for the time and cost table the worker shows as
        training begins (data/estimate.py); a preference or streamed dataset has none."""
        if cfg.get("rl") or not _is_main_process():
            return
        try:
            lengths = split_lengths(trainer.train_dataset, cfg)
            eval_lengths = split_lengths(trainer.eval_dataset, cfg)
        except Exception as exc:  # noqa: BLE001 - the table is a nicety; the training goes on without it
            print(f"\n[finetune-worker] no time and cost table: the splits' lengths could not be read ({exc})", flush=True)
            return
        if lengths is not None:
            write_record("lengths", train=lengths, eval=eval_lengths)

    def post_train_unload(self, cfg):
        write_record("saved")
