"""Name a failed training: an error code and a one-line explanation with the likely fix."""

from __future__ import annotations

import re
import signal
from dataclasses import dataclass

from . import errors


@dataclass(frozen=True)
class Diagnosis:
    code: str
    message: str


# Checked in order against the log tail; the first match names the failure.
LOG_PATTERNS: list[tuple[re.Pattern, Diagnosis]] = [
    (
        re.compile(r"No space left on device|Errno 28|ENOSPC"),
        Diagnosis(errors.DISK_FULL, "the volume ran out of disk space; free space, raise the volume size or lower save_total_limit"),
    ),
    (
        re.compile(r"CUDA out of memory|OutOfMemoryError|CUBLAS_STATUS_ALLOC_FAILED|DefaultCPUAllocator: can't allocate memory"),
        Diagnosis(errors.OUT_OF_MEMORY, "training ran out of memory; lower micro_batch_size or sequence_len, enable gradient_checkpointing, or use LoRA/QLoRA"),
    ),
    (
        re.compile(r"GatedRepoError|401 Client Error|403 Client Error|Invalid user token|Access to model .* is restricted|You are trying to access a gated repo"),
        Diagnosis(errors.AUTH_ERROR, "the Hugging Face Hub refused access; check that hf_token is valid and has accepted the model's or dataset's terms"),
    ),
    (
        re.compile(r"wandb\.errors\.(\w+\.)?(AuthenticationError|UsageError)|wandb: ERROR .*(API key|api_key)|Invalid W&B API key", re.I),
        Diagnosis(errors.AUTH_ERROR, "W&B refused the wandb_api_key; check the key, or leave it out to train without W&B"),
    ),
    (
        re.compile(r"unhandled prompt tokenization strategy|Failed to load prompt strategy|DatasetNotFoundError|DatasetGenerationError|Couldn't find (a dataset|any data file)|No valid dataset|dataset .* not found", re.I),
        Diagnosis(errors.DATASET_ERROR, "a dataset could not be loaded or tokenized; check its path, type and field names"),
    ),
    (
        re.compile(r"is not a local folder and is not a valid model identifier|does not appear to have a file named|Unrecognized model|Error(s)? in loading state_dict|size mismatch for"),
        Diagnosis(errors.MODEL_LOAD_ERROR, "the base model could not be loaded; check base_model (a Hub id or a model directory on the volume)"),
    ),
]

STAGE_DEFAULTS = {
    "preprocessing": Diagnosis(errors.DATASET_ERROR, "training stopped while loading the datasets; see log_tail"),
    "downloading": Diagnosis(errors.MODEL_LOAD_ERROR, "training stopped while loading the base model; see log_tail"),
    "evaluating": Diagnosis(errors.TRAINING_FAILED, "the evaluation process failed; see log_tail"),
}


def diagnose(returncode: int | None, log_tail: list[str], stage: str | None, nan_step: int | None) -> Diagnosis:
    if nan_step is not None:
        return Diagnosis(
            errors.NAN_LOSS,
            f"the loss became NaN or infinite at step {nan_step}; lower learning_rate, add warmup_steps or set max_grad_norm",
        )
    text = "\n".join(log_tail)
    for pattern, diagnosis in LOG_PATTERNS:
        if pattern.search(text):
            return diagnosis
    if returncode is not None and returncode < 0:
        name = signal.Signals(-returncode).name if -returncode in signal.valid_signals() else str(-returncode)
        hint = " (often the machine ran out of RAM)" if -returncode == signal.SIGKILL else ""
        return Diagnosis(errors.TRAINING_FAILED, f"the training process was killed by {name}{hint}")
    if stage in STAGE_DEFAULTS:
        return STAGE_DEFAULTS[stage]
    return Diagnosis(errors.TRAINING_FAILED, f"training exited with code {returncode}; see log_tail")
