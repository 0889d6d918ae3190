"""The worker operator's settings, read once from the environment."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, Field, SecretStr, ValidationError, field_validator

from finetune_worker.contract.envconfig import args_from_env
from finetune_worker.contract.job import S3_ENDPOINT_URL, S3_REGION, S3_URI

RUNPOD_VOLUME = Path("/runpod-volume")
REPO_ROOT = Path(__file__).resolve().parents[3]
MAX_REQUEST_BYTES = 10 * 1024 * 1024  # RunPod's /run payload limit
MAX_DOWNLOAD_BYTES = 5 * 1024**3  # a dataset given by https URL
DOWNLOAD_DEADLINE_S = 1800.0  # the whole download of one such dataset
# Where make install puts llama.cpp's GGUF converter (builder/install_llama_cpp.py); the image sets FINETUNE_LLAMA_CPP_DIR.
VENV_LLAMA_CPP_DIR = Path(sys.prefix) / "share" / "llama.cpp"


# The operator limits: field -> environment variable.
LIMIT_SETTINGS = {
    "max_steps": "FINETUNE_MAX_STEPS",
    "max_hours": "FINETUNE_MAX_HOURS",
    "max_sequence_len": "FINETUNE_MAX_SEQUENCE_LEN",
    "max_lora_r": "FINETUNE_MAX_LORA_R",
    "max_dataset_bytes": "FINETUNE_MAX_DATASET_BYTES",
    "max_generate_prompts": "FINETUNE_MAX_GENERATE_PROMPTS",  # mode generate: prompts or conversations per job
    "max_new_tokens": "FINETUNE_MAX_NEW_TOKENS",  # mode generate: tokens per answer
    "max_prompt_tokens": "FINETUNE_MAX_PROMPT_TOKENS",  # mode generate: tokens per prompt (else the run's sequence_len)
    "max_checkpoints": "FINETUNE_MAX_CHECKPOINTS",  # checkpoints a run keeps (save_total_limit)
    "max_run_bytes": "FINETUNE_MAX_RUN_BYTES",  # one run directory's size, checked at each checkpoint
    "max_cost": "FINETUNE_MAX_COST",  # US dollars a job may cost (sizing/budget.py), before and during training
}
# How the time and cost estimate is made (sizing/estimate.py): field -> environment variable.
ESTIMATE_SETTINGS = {
    "gpu_prices": "FINETUNE_GPU_PRICES", "gpu_types": "FINETUNE_GPU_TYPES", "download_mbps": "FINETUNE_DOWNLOAD_MBPS",
    "volume_mbps": "FINETUNE_VOLUME_MBPS", "upload_mbps": "FINETUNE_UPLOAD_MBPS",
}
# How long each helper child may run, in seconds: field -> (environment variable, default).
# Every child also ends by the job's own deadline (FINETUNE_MAX_HOURS, from the job's start).
DEADLINE_SETTINGS = {
    "preflight_deadline_s": ("FINETUNE_PREFLIGHT_DEADLINE_S", 1800.0),
    "evaluation_deadline_s": ("FINETUNE_EVALUATION_DEADLINE_S", 3600.0),
    "generate_deadline_s": ("FINETUNE_GENERATE_DEADLINE_S", 1800.0),
    "merge_deadline_s": ("FINETUNE_MERGE_DEADLINE_S", 3600.0),
    "export_deadline_s": ("FINETUNE_EXPORT_DEADLINE_S", 3600.0),
    "push_deadline_s": ("FINETUNE_PUSH_DEADLINE_S", 7200.0),
    "hub_check_deadline_s": ("FINETUNE_HUB_CHECK_DEADLINE_S", 120.0),
}
# Each helper child (by the name of its log) -> its deadline's field; training has none of its own.
CHILD_DEADLINES = {
    "preflight": "preflight_deadline_s", "evaluation": "evaluation_deadline_s", "generate": "generate_deadline_s",
    "merge": "merge_deadline_s", "export": "export_deadline_s", "hub-push": "push_deadline_s", "hub-check": "hub_check_deadline_s",
    "hub-model-config": "hub_check_deadline_s", "storage": "push_deadline_s",
}
USER_TOKEN_SETTINGS = {
    "user_token_secret": "FINETUNE_USER_TOKEN_SECRET", "user_token_public_key": "FINETUNE_USER_TOKEN_PUBLIC_KEY",
    "user_token_audience": "FINETUNE_USER_TOKEN_AUDIENCE", "user_token_issuer": "FINETUNE_USER_TOKEN_ISSUER",
    "user_token_max_lifetime_s": "FINETUNE_USER_TOKEN_MAX_LIFETIME_S",
}
# How a cluster's nodes meet and how long they wait for each other (finetune-worker cluster).
CLUSTER_SETTINGS = {
    "cluster_join_timeout_s": "FINETUNE_CLUSTER_JOIN_TIMEOUT", "cluster_timeout_s": "FINETUNE_CLUSTER_TIMEOUT",
    "shared_volume": "FINETUNE_SHARED_VOLUME",
}
# The operator's S3-compatible destination for every job's checkpoints and outputs (checks/storage.py).
STORAGE_SETTINGS = {
    "storage_uri": "FINETUNE_STORAGE_URI", "storage_endpoint_url": "FINETUNE_STORAGE_ENDPOINT_URL",
    "storage_region": "FINETUNE_STORAGE_REGION", "storage_access_key_id": "FINETUNE_STORAGE_ACCESS_KEY_ID",
    "storage_secret_access_key": "FINETUNE_STORAGE_SECRET_ACCESS_KEY",
}
# Every setting but BASE_VOLUME: field -> environment variable.
ENV_NAMES = {
    "examples_dir": "FINETUNE_EXAMPLES_DIR", "hf_token": "HF_TOKEN", "wandb_api_key": "WANDB_API_KEY",
    "allow_trust_remote_code": "FINETUNE_ALLOW_TRUST_REMOTE_CODE", "max_request_bytes": "FINETUNE_MAX_REQUEST_BYTES",
    "max_download_bytes": "FINETUNE_MAX_DOWNLOAD_BYTES", "download_deadline_s": "FINETUNE_DOWNLOAD_DEADLINE_S",
    "allowed_private_hosts": "FINETUNE_ALLOWED_PRIVATE_HOSTS", "hub_namespace": "FINETUNE_HUB_NAMESPACE",
    "wandb_entity": "FINETUNE_WANDB_ENTITY", "llama_cpp_dir": "FINETUNE_LLAMA_CPP_DIR", **USER_TOKEN_SETTINGS, **LIMIT_SETTINGS,
    **{field: name for field, (name, _) in DEADLINE_SETTINGS.items()}, **ESTIMATE_SETTINGS,
    **CLUSTER_SETTINGS, **STORAGE_SETTINGS,
}
# Environment variables whose values are secrets: the worker's own credentials. No
# child inherits them (a child gets the job's own: plan.build_child_env), and their
# values are masked wherever the worker writes (redact.py).
SECRET_ENV_VARS = (
    "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "WANDB_API_KEY", "COMET_API_KEY", "SWANLAB_API_KEY",
    "RUNPOD_AI_API_KEY", "RUNPOD_API_KEY", "FINETUNE_USER_TOKEN_SECRET", "FINETUNE_SERVE_API_KEY", "VLLM_API_KEY",
    "FINETUNE_STORAGE_ACCESS_KEY_ID", "FINETUNE_STORAGE_SECRET_ACCESS_KEY",
    # The machine's own AWS keys: no child reads buckets with them (a job's storage has its own keys).
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
)
# RunPod's job-queue addresses (they carry its key): the worker's, never a child's.
WORKER_ONLY_ENV_PREFIXES = ("RUNPOD_WEBHOOK_",)


def parse_allowed_hosts(value: str | Iterable[str]) -> frozenset[str]:
    """`host1,host2:8443` (or a list of them) as lower-case `host` / `host:port` entries."""
    items = value.split(",") if isinstance(value, str) else value
    return frozenset(item.strip().lower().rstrip(".") for item in items if item.strip())


def _setting_problem(error: dict) -> str:
    field = str(error["loc"][0]) if error["loc"] else ""
    if field in ENV_NAMES and ENV_NAMES[field] not in SECRET_ENV_VARS:  # never a secret's value
        return f"{ENV_NAMES[field]}={error.get('input')!r}: {error['msg']}"
    return f"{field or 'settings'}: {error['msg']}"


class SettingsInvalid(ValueError):
    """A worker setting in the environment has a value the worker cannot use."""


def default_base_volume() -> Path:
    return RUNPOD_VOLUME if RUNPOD_VOLUME.is_dir() else Path.cwd() / "volume"


class WorkerSettings(BaseModel):
    base_volume: Path
    examples_dir: Path = REPO_ROOT / "examples"
    hf_token: SecretStr | None = None
    wandb_api_key: SecretStr | None = None
    # With user tokens (several tenants), where the endpoint's own credentials may write
    # for a job (checks/tenancy.py): the Hub namespace of `<namespace>/<user_id>__<name>`
    # repos, and the W&B entity of `<user_id>__<project>` projects. Unset: nowhere.
    hub_namespace: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
    wandb_entity: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
    allow_trust_remote_code: bool = False
    max_request_bytes: int = MAX_REQUEST_BYTES
    max_download_bytes: int = MAX_DOWNLOAD_BYTES
    # Optional proof of who the user is (usertoken.py): with either key set, every
    # job must carry credentials.user_token, a JWT whose `sub` is its user_id.
    user_token_secret: SecretStr | None = None  # HS256/HS384/HS512
    user_token_public_key: str | None = None  # PEM: RS*/PS*, ES*, EdDSA
    user_token_audience: str | None = None
    user_token_issuer: str | None = None
    # Set: a token must carry `iat` and `exp`, at most this many seconds apart.
    user_token_max_lifetime_s: float | None = Field(None, gt=0, allow_inf_nan=False)
    download_deadline_s: float = Field(DOWNLOAD_DEADLINE_S, gt=0)
    # Private hosts dataset URLs may reach anyway: `host` or `host:port`, lower case.
    allowed_private_hosts: frozenset[str] = frozenset()
    # llama.cpp's converter (and llama-quantize, where built) for `export:` (GGUF).
    llama_cpp_dir: Path = VENV_LLAMA_CPP_DIR
    # Operator limits (unset: none). Checked at validation, hours and steps during training too.
    max_steps: int | None = Field(None, gt=0)
    max_hours: float | None = Field(None, gt=0, allow_inf_nan=False)
    max_sequence_len: int | None = Field(None, gt=0)
    max_lora_r: int | None = Field(None, gt=0)
    max_dataset_bytes: int | None = Field(None, gt=0)
    max_generate_prompts: int | None = Field(None, gt=0)
    max_new_tokens: int | None = Field(None, gt=0)
    max_prompt_tokens: int | None = Field(None, gt=0)
    max_checkpoints: int | None = Field(None, gt=0)
    max_run_bytes: int | None = Field(None, gt=0)
    max_cost: float | None = Field(None, gt=0, allow_inf_nan=False)
    # The estimate: US dollars per GPU-hour by RunPod GPU id (and "cpu"), replacing or adding to the
    # published defaults (sizing/gpus.py); the GPU types it estimates; transfer rates, MB/s.
    gpu_prices: dict[str, Annotated[float, Field(ge=0, allow_inf_nan=False)]] = {}
    gpu_types: tuple[str, ...] = ()
    download_mbps: float = Field(150.0, gt=0, allow_inf_nan=False)
    volume_mbps: float = Field(300.0, gt=0, allow_inf_nan=False)
    upload_mbps: float = Field(50.0, gt=0, allow_inf_nan=False)
    # Wall-clock limits of the helper children (DEADLINE_SETTINGS), seconds.
    preflight_deadline_s: float = Field(DEADLINE_SETTINGS["preflight_deadline_s"][1], gt=0, allow_inf_nan=False)
    evaluation_deadline_s: float = Field(DEADLINE_SETTINGS["evaluation_deadline_s"][1], gt=0, allow_inf_nan=False)
    generate_deadline_s: float = Field(DEADLINE_SETTINGS["generate_deadline_s"][1], gt=0, allow_inf_nan=False)
    merge_deadline_s: float = Field(DEADLINE_SETTINGS["merge_deadline_s"][1], gt=0, allow_inf_nan=False)
    export_deadline_s: float = Field(DEADLINE_SETTINGS["export_deadline_s"][1], gt=0, allow_inf_nan=False)
    push_deadline_s: float = Field(DEADLINE_SETTINGS["push_deadline_s"][1], gt=0, allow_inf_nan=False)
    hub_check_deadline_s: float = Field(DEADLINE_SETTINGS["hub_check_deadline_s"][1], gt=0, allow_inf_nan=False)
    # Clusters: how long node 0 waits for every node to join (seconds), how long any node waits
    # on a silent peer during the run (the process group's timeout), and whether every node
    # sees the same BASE_VOLUME (one run directory) or keeps its own.
    cluster_join_timeout_s: int = Field(600, gt=0)
    cluster_timeout_s: int = Field(900, gt=0)
    shared_volume: bool = False
    # The operator's bucket (s3://bucket/prefix) for every job that names none of its own; keys are secrets.
    storage_uri: str | None = Field(None, pattern=S3_URI)
    storage_endpoint_url: str | None = Field(None, pattern=S3_ENDPOINT_URL)
    storage_region: str | None = Field(None, pattern=S3_REGION)
    storage_access_key_id: SecretStr | None = None
    storage_secret_access_key: SecretStr | None = None
    # AXOLOTL_* variables on the endpoint: defaults under every job's args.
    default_args: dict = {}
    default_arg_problems: list[str] = []

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> WorkerSettings:
        values: dict = {"base_volume": env.get("BASE_VOLUME") or default_base_volume()}
        for field, name in ENV_NAMES.items():
            if env.get(name):
                values[field] = env[name]
        default_args, _, problems = args_from_env(env)
        try:
            settings = cls(**values, default_args=default_args, default_arg_problems=[str(p) for p in problems])
        except ValidationError as exc:
            wrong = [_setting_problem(e) for e in exc.errors()]
            raise SettingsInvalid("; ".join(wrong)) from None
        settings.base_volume = settings.base_volume.absolute()
        return settings

    @field_validator("gpu_prices", mode="before")
    @classmethod
    def _price_table(cls, value: object) -> object:
        """FINETUNE_GPU_PRICES is a JSON object: {"NVIDIA H100 80GB HBM3": 2.99, "cpu": 0.1}."""
        if isinstance(value, str):
            try:
                return json.loads(value)
            except ValueError:
                raise ValueError('a JSON object of US dollars per GPU-hour, e.g. {"NVIDIA H100 80GB HBM3": 2.99}') from None
        return value

    @field_validator("gpu_types", mode="before")
    @classmethod
    def _type_list(cls, value: object) -> object:
        """FINETUNE_GPU_TYPES is comma-separated RunPod GPU ids (or names): `NVIDIA L40S,H100 SXM`."""
        return tuple(item.strip() for item in value.split(",") if item.strip()) if isinstance(value, str) else value

    @field_validator("allowed_private_hosts", mode="before")
    @classmethod
    def _host_list(cls, value: object) -> object:
        """FINETUNE_ALLOWED_PRIVATE_HOSTS is comma-separated: `files.internal,10.0.0.5:8443`."""
        return parse_allowed_hosts(value) if isinstance(value, (str, list, tuple, set, frozenset)) else value

    def limits(self) -> dict[str, float | int]:
        """The operator limits that are set, by environment variable."""
        return {name: getattr(self, field) for field, name in LIMIT_SETTINGS.items() if getattr(self, field) is not None}

    def child_deadline(self, name: str) -> tuple[float, str] | None:
        """(seconds, environment variable) of the helper child `name`'s own limit; None for training."""
        field = CHILD_DEADLINES.get(name)
        return None if field is None else (getattr(self, field), DEADLINE_SETTINGS[field][0])

    @property
    def user_tokens_required(self) -> bool:
        return self.user_token_secret is not None or self.user_token_public_key is not None

    @property
    def runs_dir(self) -> Path:
        return self.base_volume / "runs"

    @property
    def cache_dir(self) -> Path:
        return self.base_volume / "cache"
