"""What every Axolotl option can touch: the one table a security reviewer reads.

Each option of Axolotl's config schema (top level and every nested model: dataset
entries of every kind, DeepSpeed/FSDP, TRL, vLLM, dynamic checkpointing, and the
input arguments of every bundled plugin) has a `Kind`. Options whose type holds
only numbers, booleans, literals or enums are plain values by construction;
every option that can hold a string or a free-form mapping is listed below by
hand. `tests/test_security.py::test_every_axolotl_option_is_classified` walks
Axolotl's schema and fails when an option is not classified, so a new Axolotl
release cannot slip a file-reading option through; at run time an unclassified
option is refused (fail closed).

Dataset entries share one namespace (`datasets.<field>`) for `datasets`,
`test_datasets` and `pretraining_dataset`.
"""

from __future__ import annotations

import enum
import typing
from functools import lru_cache
from types import UnionType
from typing import Any


class Kind(enum.Enum):
    VALUE = "a plain value"
    MAPPING = "a free-form mapping passed to a library (scanned for the keys below)"
    MODEL = "a Hub model id or a local model directory (confined)"
    DATA = "a dataset location: Hub id, local file (confined), https URL or bucket"
    READ = "a local path read by Axolotl (confined)"
    TEMPLATE = "inline Jinja text, or a file path Axolotl reads (confined)"
    HUB = "a Hugging Face Hub repo id"
    FILE_NAME = "a plain file name, written or deleted inside the run's own directory"
    WORKER = "set or read by the worker itself"
    CODE = "names Python code to import (only Axolotl's own strategies and plugins)"
    REMOTE_CODE = "runs code from a model or dataset repository (operator's switch)"
    CREDENTIAL = "a credential (moved to the child's environment, never stored)"
    NETWORK = "makes the training contact a service at an address the config gives"
    UNSUPPORTED_CODE = "imports code from a path or module the config names"
    UNCLASSIFIED = "not classified by the worker's security table (a newer Axolotl option)"


# The options that hold lists of datasets, and those whose entries may carry inline
# rows or an https URL (the worker writes them into the run directory).
DATASET_LIST_KEYS = ("datasets", "test_datasets", "pretraining_dataset")
INLINE_DATASET_KEYS = ("datasets", "test_datasets")
AXOLOTL_KEPT_CHECKPOINTS = 4  # Axolotl's save_total_limit when a config leaves it unset (or 0)

_VALUE = """
evaluation_strategy eval_strategy save_strategy type_of_model revision_of_model tokenizer_type processor_type
cls_model_config role_boundaries.role role_boundaries.start role_boundaries.end
ray_run_name gradio_title gradio_server_name lisa_layers_attribute
trackio_project_name trackio_run_name comet_workspace comet_project_name comet_experiment_key comet_mode
mlflow_experiment_name mlflow_run_name
wandb_name wandb_run_id wandb_mode wandb_project wandb_entity wandb_watch wandb_log_model
learning_rate optimizer optim_target_modules lr_scheduler lr_groups.name lr_groups.modules qgalore_proj_type
adapter lora_target_modules lora_target_parameters lora_modules_to_save peft_layers_pattern peft_init_lora_weights
trl.vllm_guided_decoding_regex trl.loss_type vllm.device vllm.dtype vllm.reasoning_parser dpo_loss_type
eval_causal_lm_metrics bench_split metric_for_best_model
selective_checkpointing.save selective_checkpointing.recompute_layer_types unfrozen_parameters
sample_packing_mp_start_method attn_implementation large_head_attention experts_implementation
fsdp_config.transformer_layer_cls_to_wrap fsdp_config.mixed_precision_policy fp32_norm_classes
special_tokens.bos_token special_tokens.eos_token special_tokens.pad_token special_tokens.unk_token
special_tokens.additional_special_tokens tokens torch_compile_backend gpu_memory_limit
chat_template eot_tokens default_system_message
diffusion.mask_token_str diffusion_lm.mask_token_str selective_checkpointing.save_modules expert_backend nonexpert_quantization moe_grouped_backend
dsv4_fp8_nonexpert_mode dsv4_fp4_grouped_mode lm_eval_tasks spectrum_model_name
swanlab_project swanlab_experiment_name swanlab_description swanlab_mode swanlab_workspace
datasets.split datasets.name datasets.ds_type datasets.revision datasets.conversation datasets.chat_template
datasets.input_format datasets.field datasets.field_human datasets.field_model datasets.field_messages
datasets.field_tools datasets.field_thinking datasets.template_thinking_key datasets.message_field_role
datasets.message_field_content datasets.message_field_training datasets.message_field_training_detail
datasets.logprobs_field datasets.roles_to_train datasets.step_separator datasets.text_column
datasets.field_chosen datasets.field_rejected
datasets.type.system_prompt datasets.type.system_format datasets.type.field_system datasets.type.field_instruction
datasets.type.field_input datasets.type.field_output datasets.type.format datasets.type.no_input_format
datasets.type.field_prompt datasets.type.field_chosen datasets.type.field_rejected datasets.type.prompt_format
datasets.type.chosen_format datasets.type.rejected_format datasets.type.field_completion datasets.type.field_label
datasets.type.completion_format
"""

_MAPPING = """
rope_scaling overrides_of_model_config overrides_of_model_kwargs optim_args lr_scheduler_kwargs
lora_rank_pattern lora_alpha_pattern peft_trainable_token_indices bnb_config_kwargs processor_kwargs
model_quantization_config_kwargs trl.generation_kwargs trl.chat_template_kwargs accelerator_config device device_map
gradient_checkpointing_kwargs flex_attn_compile_kwargs added_tokens_overrides torch_compile_options max_memory
chat_template_kwargs comet_experiment_config datasets.message_property_mappings datasets.roles resources_per_worker
autotune_profiles diffusion_lm.self_conditioning diffusion_lm.unroll
diffusion_decision.mixture.weights diffusion_decision.mixture.loss_weight diffusion_decision.mixture.max_examples_per_source
"""

_BY_HAND: dict[Kind, str] = {
    Kind.VALUE: _VALUE,
    Kind.MAPPING: _MAPPING,
    Kind.MODEL: "base_model base_model_config tokenizer_config lm_eval_model",
    Kind.DATA: "datasets.path datasets.data_files",
    Kind.READ: "lora_model_dir resume_from_checkpoint deepspeed",
    Kind.TEMPLATE: "chat_template_jinja datasets.chat_template_jinja",
    Kind.HUB: "push_dataset_to_hub trackio_space_id",
    Kind.FILE_NAME: "dynamic_checkpoint.trigger_file_path autotune_cache_path",
    Kind.WORKER: "output_dir dataset_prepared_path hub_model_id hub_strategy hub_revision axolotl_config_path",
    Kind.CODE: "plugins datasets.type datasets.input_transform",
    Kind.REMOTE_CODE: "trust_remote_code datasets.trust_remote_code",
    Kind.CREDENTIAL: "comet_api_key swanlab_api_key swanlab_lark_secret hatchery.api_key",
    Kind.NETWORK: """
        otel_metrics_host mlflow_tracking_uri trl.vllm_server_host vllm.host kd_online_server_base_url
        hatchery.base_url hatchery.project_id swanlab_web_host swanlab_api_host swanlab_lark_webhook_url
        bench_dataset nemo_gym_dir nemo_gym_config_paths nemo_gym_datasets nemo_gym_model_name nemo_gym_auto_clone
        hatchery.loss_fn_config hatchery.save_name_prefix
        coreweave.deployment_id coreweave.bucket coreweave.path_prefix coreweave.gateway_url coreweave.model
        coreweave.api_url coreweave.api_token_env coreweave.s3_endpoint_url coreweave.s3_profile
    """,
    Kind.UNSUPPORTED_CODE: "trainer_cls torchdistx_path trl.reward_funcs trl.rollout_func vllm.serve_module vllm.worker_extension_cls hatchery.reward_funcs",
}

# GGUF export (`export:`, run by the worker after training, checks/export.py): llama.cpp is
# the worker's own (the directory's converter runs), the files go to the run's output/gguf.
_EXPORT = {"export.quantize": Kind.VALUE, "export.outfile": Kind.FILE_NAME, "export.llama_cpp_dir": Kind.UNSUPPORTED_CODE}

CLASSIFIED: dict[str, Kind] = {name: kind for kind, names in _BY_HAND.items() for name in names.split()} | _EXPORT

# Credentials a config may carry, and the environment variable the library reads instead.
CREDENTIAL_ENV = {"comet_api_key": "COMET_API_KEY", "swanlab_api_key": "SWANLAB_API_KEY"}

# Keys refused anywhere inside a free-form mapping (model kwargs, config overrides,
# DeepSpeed objects, ...): they run repository code, carry credentials, or name
# places on disk that the library would read or write.
# `allow_all_kernels` lifts the kernels library's trusted-publisher check, and a
# `kernel_config` maps layers to Hub kernel repos of the config's choosing.
REMOTE_CODE_KEYS = frozenset({"trust_remote_code", "auto_map", "code_revision", "allow_all_kernels", "kernel_config"})
# Keys (top level or in a mapping) whose value transformers loads as a Hub kernel
# when it names a repo (`org/repo`, `org/repo@rev`, `org/repo:function`, `paged|org/repo`).
ATTENTION_KEYS = frozenset({"attn_implementation", "_attn_implementation"})
# The organisation whose kernels transformers itself loads (its flash-attention fallback
# and its layer mapping under use_kernels). Its repos at their default version are the
# library's own choice; a revision (`@...`) may name any commit, a pull request's too.
TRUSTED_KERNEL_ORG = "kernels-community"
HUB_KERNEL_MESSAGE = (
    "names a kernel repository on the Hugging Face Hub: its code would run in the training. "
    f"Use a built-in attention (sdpa, flash_attention_2, ...) or a {TRUSTED_KERNEL_ORG}/ kernel without @revision; "
    "or ask the operator to set FINETUNE_ALLOW_TRUST_REMOTE_CODE=1"
)
CREDENTIAL_KEYS = frozenset({"token", "use_auth_token", "api_key", "hf_token", "secret", "password"})
PATH_KEY_SUFFIXES = ("_dir", "_path", "_file", "_folder", "_paths", "_files")
PATH_KEYS = frozenset({"cache_dir", "offload_folder", "nvme_path", "pretrained_model_name_or_path", "output_path", "output_file"})


def names_hub_kernel(value: Any) -> bool:
    """Whether an attention implementation (a string, or a mapping of sub-configs to
    strings) names a Hub kernel repo other than a trusted one at its default version.

    transformers (integrations/hub_kernels.py) takes what follows a `|` (`paged|...`),
    then `repo[@rev][:function]`; Axolotl passes any value with a `/` through."""
    if isinstance(value, dict):
        return any(names_hub_kernel(item) for item in value.values())
    if isinstance(value, (list, tuple)):
        return any(names_hub_kernel(item) for item in value)
    if not isinstance(value, str):
        return False
    for part in value.split("|"):
        if "/" not in part:
            continue
        org, _, rest = part.split(":")[0].strip().partition("/")
        if not (org == TRUSTED_KERNEL_ORG and rest and "/" not in rest and "@" not in rest):
            return True
    return False


def mapping_key_problem(key: str, value: Any = None) -> tuple[Kind, str] | None:
    """What a key inside a free-form mapping touches (REMOTE_CODE, CREDENTIAL or READ
    for a place on disk) and why it is refused, or None."""
    lowered = str(key).lower()
    if lowered in REMOTE_CODE_KEYS:
        return Kind.REMOTE_CODE, "runs code from a model or kernel repository; refused inside any mapping"
    if lowered in ATTENTION_KEYS and names_hub_kernel(value):
        return Kind.REMOTE_CODE, HUB_KERNEL_MESSAGE
    if lowered in CREDENTIAL_KEYS or lowered.endswith("_token") or lowered.endswith("api_key"):
        return Kind.CREDENTIAL, "looks like a credential; send credentials in `credentials`, never in args"
    if lowered in PATH_KEYS or lowered.endswith(PATH_KEY_SUFFIXES):
        return Kind.READ, "names a place on disk for the library to read or write; the worker owns where files go"
    return None


# -- the schema walk --------------------------------------------------------------

_PLAIN_TYPES = (int, float, bool, type(None))


def _leaves(annotation: Any) -> list[Any]:
    """The leaf types of an annotation: models, and atoms (str, int, dict, Any, ...)."""
    from pydantic import BaseModel

    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, UnionType) or origin in (list, tuple, set, frozenset):
        return [leaf for arg in args if arg is not Ellipsis for leaf in _leaves(arg)]
    if origin is typing.Annotated:
        return _leaves(args[0])
    if origin is dict:
        return [dict, *(_leaves(args[1]) if len(args) == 2 else [])]
    if origin is typing.Literal:
        return [typing.Literal]
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [annotation]


def _is_plain(leaf: Any) -> bool:
    return leaf in _PLAIN_TYPES or leaf is typing.Literal or (isinstance(leaf, type) and issubclass(leaf, enum.Enum))


def _names(info: Any, name: str) -> set[str]:
    names = {name}
    if info.alias:
        names.add(info.alias)
    if isinstance(info.validation_alias, str):
        names.add(info.validation_alias)
    names.update(c for c in getattr(info.validation_alias, "choices", None) or () if isinstance(c, str))
    return names


@lru_cache(maxsize=1)
def schema_options() -> dict[str, tuple[str, bool, tuple]]:
    """Every option path of Axolotl's schema and its plugins' arguments:
    path -> (the field's canonical path, whether its type is plain, its nested models)."""
    from pydantic import BaseModel

    from finetune_worker.checks import axolotl_schema

    found: dict[str, tuple[str, bool, tuple]] = {}

    def walk(model: type[BaseModel], prefix: str, seen: frozenset) -> None:
        for name, info in model.model_fields.items():
            leaves = _leaves(info.annotation)
            models = tuple(leaf for leaf in leaves if isinstance(leaf, type) and issubclass(leaf, BaseModel))
            plain = all(_is_plain(leaf) for leaf in leaves if leaf not in models)
            canonical = _canonical(prefix + name)
            for alias in _names(info, name):
                found[_canonical(prefix + alias)] = (canonical, plain, models)
            for nested in models:
                if nested not in seen:
                    walk(nested, canonical + ".", seen | {nested})

    axolotl_schema.import_axolotl()
    from axolotl.utils.schemas.config import AxolotlInputConfig

    for model in (AxolotlInputConfig, *plugin_arg_models()):
        walk(model, "", frozenset())
    return found


def plugin_arg_models() -> list[type]:
    """The input-argument models of every bundled Axolotl plugin that imports here."""
    import importlib
    import inspect
    import pkgutil

    import axolotl.integrations as integrations
    from axolotl.integrations.base import BasePlugin

    from finetune_worker.checks import axolotl_schema

    models, seen = [], set()
    for info in pkgutil.iter_modules(integrations.__path__):
        package = f"{integrations.__name__}.{info.name}"
        # a package may export its plugin lazily (a module __getattr__): look in its plugin module too
        for module_name in (package, f"{package}.plugin"):
            try:
                module = importlib.import_module(module_name)
            except ImportError:  # no such module, or an optional dependency of the plugin is not installed
                continue
            for _, cls in inspect.getmembers(module, inspect.isclass):
                if issubclass(cls, BasePlugin) and cls is not BasePlugin and cls.__module__.startswith(package) and cls not in seen:
                    seen.add(cls)
                    args_path = cls().get_input_args()
                    if args_path:
                        models.append(axolotl_schema.load_plugin_class(args_path))
    return models


def _canonical(path: str) -> str:
    head, _, rest = path.partition(".")
    return f"datasets.{rest}" if head in DATASET_LIST_KEYS and rest else ("datasets" if head in DATASET_LIST_KEYS else path)


def unclassified() -> list[str]:
    """Options whose type can hold a string or a mapping and that have no Kind
    (a field that only nests a model is not one: its own fields are classified)."""
    return sorted(
        path
        for path, (canonical, plain, _) in schema_options().items()
        if not plain and canonical not in CLASSIFIED and path not in CLASSIFIED
    )


def stale() -> list[str]:
    """Names in the table that Axolotl's schema no longer has."""
    known = set(schema_options()) | {canonical for canonical, _, _ in schema_options().values()}
    return sorted(name for name in CLASSIFIED if name not in known)


def kind_of(path: str) -> Kind | None:
    """The Kind of an option path (`lora_model_dir`, `datasets.path`, `trl.reward_funcs`);
    None for a nesting field or an unknown name (the schema check reports unknown names)."""
    canonical_path = _canonical(path)
    if canonical_path in CLASSIFIED:
        return CLASSIFIED[canonical_path]
    entry = schema_options().get(canonical_path)
    if entry is None:
        return None
    canonical, plain, models = entry
    if canonical in CLASSIFIED:
        return CLASSIFIED[canonical]
    if plain:
        return None if models else Kind.VALUE
    return Kind.UNCLASSIFIED


def is_nested(path: str) -> bool:
    entry = schema_options().get(_canonical(path))
    return bool(entry and entry[2])


@lru_cache(maxsize=1)
def dataset_fields() -> frozenset[str]:
    """Every field a dataset entry of any kind may have (SFT, preference, KTO,
    stepwise, pretraining), with aliases."""
    return frozenset(path.split(".", 1)[1] for path in schema_options() if path.startswith("datasets.") and path.count(".") == 1)
