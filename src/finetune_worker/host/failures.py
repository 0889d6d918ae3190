"""Name a failed training: an error code and a one-line explanation with the likely fix."""

from __future__ import annotations

import re
import signal
from dataclasses import dataclass

from finetune_worker.contract import errors


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
        # transformers' dynamic_module_utils: a model or tokenizer with its own code, loaded without trust_remote_code
        re.compile(r"contains custom code which must be executed|references custom code contained in|Please pass the argument `trust_remote_code=True`"),
        Diagnosis(
            errors.MODEL_LOAD_ERROR,
            "{model_or_the_base_model} (or its tokenizer) needs its own code to load (trust_remote_code); this worker refuses remote code "
            "unless the operator sets FINETUNE_ALLOW_TRUST_REMOTE_CODE=1 and the job sets trust_remote_code: true; or use a model that "
            "transformers supports natively",
        ),
    ),
    (
        # datasets' load.py, before the Hub patterns below: a Hub *dataset* that could not be reached
        re.compile(r"Couldn't reach '.*' on the Hub|Couldn't reach the Hugging Face Hub for dataset"),
        Diagnosis(errors.DATASET_ERROR, "a dataset on the Hugging Face Hub could not be reached (offline, or not cached); check its path, or put it on the volume"),
    ),
    (
        re.compile(r"unhandled prompt tokenization strategy|Failed to load prompt strategy|DatasetNotFoundError|DatasetGenerationError|Couldn't find (a dataset|any data file)|No valid dataset|dataset .* not found", re.I),
        Diagnosis(errors.DATASET_ERROR, "a dataset could not be loaded or tokenized; check its path, type and field names"),
    ),
    (
        re.compile(r"is not a local folder and is not a valid model identifier|does not appear to have a file named|Unrecognized model|Error(s)? in loading state_dict|size mismatch for"),
        Diagnosis(errors.MODEL_LOAD_ERROR, "{model_or_the_base_model} could not be loaded; check base_model (a Hub id or a model directory on the volume)"),
    ),
    (
        # huggingface_hub (OfflineModeIsEnabled, LocalEntryNotFoundError), transformers' hub.py, requests/httpx
        re.compile(
            r"OfflineModeIsEnabled|LocalEntryNotFoundError|offline mode is enabled|outgoing traffic has been disabled|"
            r"We couldn't connect to '.*' to load the files|There was a specific connection error when trying to load|"
            r"RepositoryNotFoundError|Repository Not Found for url|"
            # a network failure counts only when it names the Hub (W&B and others retry noisily too)
            r"(Max retries exceeded|Failed to resolve|ConnectTimeout|ConnectError|Temporary failure in name resolution).*huggingface\.co|"
            r"huggingface\.co.*(Max retries exceeded|Failed to resolve|timed out)"
        ),
        Diagnosis(
            errors.MODEL_LOAD_ERROR,
            "{model_or_the_base_model} is not in the worker's cache and could not be downloaded from the Hugging Face Hub (offline, "
            "unreachable, or no such repo); check the model id and the network, bake the model into the image, or put it on the volume",
        ),
    ),
    (
        # torch elastic (accelerate launch): a rank killed by SIGKILL, as the kernel's OOM killer does
        re.compile(r"Signal 9 \(SIGKILL\) received by PID|exitcode\s*:\s*-9 "),
        Diagnosis(errors.OUT_OF_MEMORY, "a training process was killed by SIGKILL, most likely because the machine ran out of RAM (host memory); "
                  "lower micro_batch_size, sequence_len or dataloader_num_workers, or use a worker with more memory"),
    ),
    (
        # torch's DataLoader: a worker process killed by SIGKILL (strsignal: "Killed"), as the kernel's OOM killer does
        re.compile(r"DataLoader worker \(pid \d+\) is killed by signal: Killed"),
        Diagnosis(errors.OUT_OF_MEMORY, "a DataLoader worker process was killed by SIGKILL, most likely because the machine ran out of RAM "
                  "(host memory); lower dataloader_num_workers (or set it to 0), micro_batch_size or sequence_len, or use a worker with more memory"),
    ),
]

HOST_OOM = Diagnosis(
    errors.OUT_OF_MEMORY,
    "the training process was killed by SIGKILL, most likely by the kernel because the machine ran out of RAM (host memory); "
    "lower micro_batch_size, sequence_len or dataloader_num_workers, use a smaller model, or use a worker with more memory",
)

STAGE_DEFAULTS = {
    "preprocessing": Diagnosis(errors.DATASET_ERROR, "training stopped while loading the datasets; see log_tail"),
    "downloading": Diagnosis(errors.MODEL_LOAD_ERROR, "training stopped while loading the base model; see log_tail"),
    "evaluating": Diagnosis(errors.TRAINING_FAILED, "the evaluation process failed; see log_tail"),
}


def diagnose(returncode: int | None, log_tail: list[str], stage: str | None, nan_step: int | None, model: str | None = None) -> Diagnosis:
    """`model`: the job's base_model, named in a model_load_error."""
    if nan_step is not None:
        return Diagnosis(
            errors.NAN_LOSS,
            f"the loss became NaN or infinite at step {nan_step}; lower learning_rate, add warmup_steps or set max_grad_norm",
        )
    text = "\n".join(log_tail)
    named = f"the base model '{model}'" if model else "the base model"
    for pattern, diagnosis in LOG_PATTERNS:
        if pattern.search(text):
            return Diagnosis(diagnosis.code, diagnosis.message.replace("{model_or_the_base_model}", named))
    if returncode == -signal.SIGKILL:
        return HOST_OOM
    if returncode is not None and returncode < 0:
        name = signal.Signals(-returncode).name if -returncode in signal.valid_signals() else str(-returncode)
        return Diagnosis(errors.TRAINING_FAILED, f"the training process was killed by {name}")
    if stage in STAGE_DEFAULTS:
        return STAGE_DEFAULTS[stage]
    return Diagnosis(errors.TRAINING_FAILED, f"training exited with code {returncode}; see log_tail")
