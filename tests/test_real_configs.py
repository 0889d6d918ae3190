"""A corpus of configs shaped like the ones users bring (Axolotl's examples, blog posts,
colleagues' YAML), each written here, run through the worker's validation and its
whole plan (fast defaults included) on a simulated one-GPU H100 worker and on a CPU
worker.

For each config: Axolotl 0.21 itself accepts it (so the corpus is honest); the worker
accepts it too, unless a documented rule refuses it with a message the user can act
on; and Axolotl's own validation, plugins registered, accepts the final planned config.
"""

from __future__ import annotations

import copy
import functools

import pytest

from finetune_worker.checks import axolotl_schema
from finetune_worker.checks.axolotl_schema import planned_config_problems
from finetune_worker.checks.validation import validate_job
from finetune_worker.contract.errors import JobError
from finetune_worker.contract.settings import REPO_ROOT, WorkerSettings
from finetune_worker.host.hardware import CPU_ONLY, Hardware
from finetune_worker.host.rundir import run_paths
from finetune_worker.plan.config import Tracking, build_axolotl_config
from finetune_worker.plan.fast_defaults import Speedups, apply_fast_defaults

H100 = Hardware(gpu_count=1, gpu_names=("NVIDIA H100 80GB HBM3",), gpu_memory_bytes=(80 * 2**30,), bf16=True, compute_capability=(9, 0))

ALPACA = [{"path": "mhenrichsen/alpaca_2k_test", "type": "alpaca"}]
CHAT = [{"path": "mlabonne/FineTome-100k", "type": "chat_template", "field_messages": "conversations",
         "message_property_mappings": {"role": "from", "content": "value"}}]
LORA = {"adapter": "lora", "lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "lora_target_linear": True}
QLORA = {**LORA, "adapter": "qlora", "load_in_4bit": True}
TRAIN = {"sequence_len": 2048, "micro_batch_size": 2, "gradient_accumulation_steps": 4, "num_epochs": 1,
         "learning_rate": 0.0002, "optimizer": "adamw_torch_fused", "lr_scheduler": "cosine", "warmup_ratio": 0.05,
         "output_dir": "./outputs/out", "logging_steps": 1}


def config(base_model: str, datasets=ALPACA, **extra):
    return {"base_model": base_model, "datasets": copy.deepcopy(datasets), **TRAIN, **extra}


CORPUS = {
    "llama3-lora-alpaca": config("NousResearch/Meta-Llama-3.1-8B", **LORA, bf16="auto", tf32=False),
    "llama3-qlora-alpaca": config("NousResearch/Meta-Llama-3.1-8B", **QLORA, bf16="auto", gradient_checkpointing=True),
    "llama3-full": config("NousResearch/Llama-3.2-1B", bf16=True, learning_rate=2e-5, flash_attention=True, sample_packing=True),
    "llama3-8bit-lora": config("NousResearch/Meta-Llama-3.1-8B", **LORA, load_in_8bit=True),
    "llama3-lora-modules": config("meta-llama/Llama-3.2-3B", **{**LORA, "lora_target_linear": None},
                                  lora_target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    "mistral-lora-chat-mappings": config("mistralai/Mistral-7B-v0.3", CHAT, **LORA, chat_template="mistral_v2v3"),
    "mixtral-qlora": config("mistralai/Mixtral-8x7B-v0.1", **QLORA, bf16="auto", gradient_checkpointing=True),
    "qwen2-lora-chatml": config("Qwen/Qwen2.5-7B", CHAT, **LORA, chat_template="chatml"),
    "qwen3-lora-qwen3-template": config("Qwen/Qwen3-8B", CHAT, **LORA, chat_template="qwen3"),
    "gemma2-lora": config("google/gemma-2-9b", **LORA, bf16=True),
    "gemma3-lora-chat": config("google/gemma-3-4b-it", CHAT, **LORA, chat_template="gemma3"),
    "gemma3n-lora": config("google/gemma-3n-E2B-it", CHAT, **LORA, chat_template="gemma3n"),
    "phi3-lora": config("microsoft/Phi-3-mini-4k-instruct", **LORA, chat_template="phi_3"),
    "falcon-lora": config("tiiuae/falcon-7b", **LORA),
    "mamba-full": config("state-spaces/mamba-130m", type_of_model="MambaLMHeadModel", tokenizer_type="AutoTokenizer",
                         tokenizer_config="EleutherAI/gpt-neox-20b", learning_rate=5e-5),
    "completion": config("NousResearch/Llama-3.2-1B", [{"path": "roneneldan/TinyStories", "type": "completion", "field": "text"}], **LORA),
    "input-output": config("NousResearch/Llama-3.2-1B", [{"path": "my-org/io-data", "type": "input_output"}], **LORA),
    "alpaca-chat-qa": config("NousResearch/Llama-3.2-1B", [{"path": "my-org/qa", "type": "alpaca_chat.load_qa"}], **LORA),
    "chat-roles-to-train": config("NousResearch/Llama-3.2-1B", [{**CHAT[0], "roles_to_train": ["assistant"], "train_on_eos": "turn"}],
                                  **LORA, chat_template="llama3"),
    "chat-jinja-inline": config("NousResearch/Llama-3.2-1B", CHAT, **LORA, chat_template="jinja",
                                chat_template_jinja="{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"),
    "pretraining-streaming": {**{k: v for k, v in config("NousResearch/Llama-3.2-1B").items() if k != "datasets"}, "max_steps": 1000,
                              "streaming": True,
                              "pretraining_dataset": [{"path": "allenai/c4", "name": "en", "type": "pretrain", "text_column": "text", "skip": 0}]},
    "dpo-chatml-intel": config("NousResearch/Meta-Llama-3.1-8B", [{"path": "Intel/orca_dpo_pairs", "split": "train", "type": "chatml.intel"}],
                               **LORA, rl="dpo", chat_template="chatml"),
    "dpo-chat-template": config("NousResearch/Meta-Llama-3.1-8B",
                                [{"path": "my-org/prefs", "type": "chat_template.default", "field_messages": "conversation",
                                  "field_chosen": "chosen", "field_rejected": "rejected"}], **LORA, rl="dpo", chat_template="llama3"),
    "ipo-llama3": config("NousResearch/Meta-Llama-3.1-8B", [{"path": "argilla/ultrafeedback-binarized-preferences", "type": "llama3.argilla_chat"}],
                         **LORA, rl="ipo"),
    "orpo-chat-template": config("mistralai/Mistral-7B-v0.3", [{"path": "argilla/ultrafeedback-binarized-preferences-cleaned",
                                                               "type": "chat_template.argilla"}], **LORA, rl="orpo", chat_template="chatml"),
    "kto-llama3": config("NousResearch/Meta-Llama-3.1-8B", [{"path": "argilla/kto-mix-15k", "type": "llama3.ultra"}], **LORA, rl="kto",
                        remove_unused_columns=False),
    "reward-model": config("google/gemma-2-2b", [{"path": "argilla/distilabel-intel-orca-dpo-pairs", "type": "bradley_terry.chat_template"}],
                           reward_model=True, chat_template="gemma", type_of_model="AutoModelForSequenceClassification", num_labels=1),
    "deepspeed-docs-zero2": config("NousResearch/Meta-Llama-3.1-8B", **LORA, deepspeed="deepspeed_configs/zero2.json"),
    "deepspeed-image-zero3": config("NousResearch/Llama-3.2-1B", deepspeed="/workspace/axolotl/deepspeed_configs/zero3_bf16.json", bf16=True),
    "fsdp2-full": config("NousResearch/Llama-3.2-1B", bf16=True, fsdp_version=2,
                         fsdp_config={"offload_params": False, "state_dict_type": "FULL_STATE_DICT", "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
                                      "transformer_layer_cls_to_wrap": "LlamaDecoderLayer", "reshard_after_forward": True}),
    "liger-plugin": config("NousResearch/Meta-Llama-3.1-8B", **LORA, plugins=["axolotl.integrations.liger.LigerPlugin"],
                           liger_rope=True, liger_rms_norm=True, liger_glu_activation=True, liger_fused_linear_cross_entropy=True),
    "cce-plugin": config("NousResearch/Meta-Llama-3.1-8B", **LORA, plugins=["axolotl.integrations.cut_cross_entropy.CutCrossEntropyPlugin"],
                         cut_cross_entropy=True, bf16=True),
    "hub-data-files": config("NousResearch/Llama-3.2-1B", [{"path": "my-org/mixed-data", "data_files": ["data/train-00000.jsonl"],
                                                            "type": "alpaca"}], **LORA),
    "legacy-options": config("NousResearch/Llama-3.2-1B", **LORA, debug=None, strict=False, gptq_groupsize=None, eval_table_max_new_tokens=128,
                             safe_serialization=True, rl_adapter_ref_model=False),
    "hub-model-id-no-owner": config("NousResearch/Llama-3.2-1B", **LORA, hub_model_id="my-adapter"),
    "eval-split-and-saves": config("NousResearch/Llama-3.2-1B", **LORA, val_set_size=0.05, eval_steps=50, save_steps=100, save_total_limit=3),
    "special-tokens": config("NousResearch/Llama-3.2-1B", **LORA, special_tokens={"pad_token": "<|end_of_text|>"}, tokens=["<tool>"],
                             lora_modules_to_save=["embed_tokens", "lm_head"]),
    "wandb-fields": config("NousResearch/Llama-3.2-1B", **LORA, wandb_project="proj", wandb_entity="me", wandb_watch="gradients",
                           wandb_log_model="false"),
    "dataset-split-name": config("NousResearch/Llama-3.2-1B", [{"path": "tatsu-lab/alpaca", "name": "default", "split": "train[:10%]",
                                                                "type": "alpaca"}], **LORA),
    "gradient-checkpointing-kwargs": config("NousResearch/Llama-3.2-1B", **LORA, gradient_checkpointing=True,
                                            gradient_checkpointing_kwargs={"use_reentrant": False}),
    "flex-attention": config("NousResearch/Llama-3.2-1B", **LORA, flex_attention=True),
    "sdpa-explicit": config("NousResearch/Llama-3.2-1B", **LORA, attn_implementation="sdpa"),
    "tensor-parallel": config("NousResearch/Llama-3.2-1B", bf16=True, tensor_parallel_size=2),
    "context-parallel": config("NousResearch/Llama-3.2-1B", bf16=True, context_parallel_size=2, attn_implementation="flash_attention_2",
                               micro_batch_size=1),
    # Written for Axolotl up to 0.19 (its llama-3/qlora-fsdp-70b.yaml, reused by dstack's FSDP+QLoRA recipe): FSDP1, translated.
    "fsdp1-qlora": config("NousResearch/Meta-Llama-3-8B", load_in_4bit=True, adapter="qlora", lora_r=8, lora_alpha=16, lora_target_linear=True,
                          bf16="auto", gradient_checkpointing=True, fsdp=["full_shard", "auto_wrap"],
                          fsdp_config={"fsdp_limit_all_gathers": True, "fsdp_sync_module_states": True, "fsdp_offload_params": True,
                                       "fsdp_use_orig_params": False, "fsdp_cpu_ram_efficient_loading": True,
                                       "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP", "fsdp_transformer_layer_cls_to_wrap": "LlamaDecoderLayer",
                                       "fsdp_state_dict_type": "FULL_STATE_DICT", "fsdp_sharding_strategy": "FULL_SHARD"}),
    # New in Axolotl 0.21: the DFT loss (no Liger fused cross-entropy beside it), eval_on_start, sampled datasets.
    "dft-loss": config("NousResearch/Llama-3.2-1B", **LORA, use_dft=True),
    "weighted-datasets": config("NousResearch/Llama-3.2-1B", [{"path": "tatsu-lab/alpaca", "type": "alpaca", "weight": 0.25},
                                                              {"path": "my-org/qa", "type": "alpaca_chat.load_qa"}], **LORA,
                                val_set_size=0.05, eval_on_start=False),
}
# Configs Axolotl accepts only with an optional package installed (it refuses them
# without): skipped where the package is missing, except for the CPU worker's refusal.
NEEDS_PACKAGE = {"context-parallel": "ring_flash_attn"}
# Configs a CPU worker must refuse with its own message (not Axolotl's after CPU adaptation).
REFUSED_ON_CPU = {"context-parallel": "args.context_parallel_size: context parallelism splits each sequence across GPUs"}

# Documented refusals on a worker without a GPU (docs/job-reference.md, "How args is checked"):
# quantised loading, DeepSpeed/FSDP and context parallelism need CUDA. Each message names
# the field and a fix.
CPU_REFUSALS = ("needs a CUDA GPU", "need CUDA GPUs", "context parallelism splits each sequence across GPUs")


def _package_missing(name: str) -> bool:
    import importlib.util

    return name in NEEDS_PACKAGE and importlib.util.find_spec(NEEDS_PACKAGE[name]) is None


def _plugins(args: dict) -> tuple[str, ...]:
    return tuple(p for p in args.get("plugins") or [] if not p.startswith("finetune_worker."))


# Configs of earlier Axolotl releases that the installed one refuses and the worker carries over (checks/fsdp.py).
TRANSLATED = {"fsdp1-qlora": "The top-level `fsdp` list is no longer supported"}


def test_axolotl_refuses_what_the_worker_translates():
    for name, refusal in TRANSLATED.items():
        problems = axolotl_schema.schema_problems(copy.deepcopy(CORPUS[name]), _plugins(CORPUS[name]), H100)
        assert any(refusal in p.message for p in problems), (name, problems)


def test_the_corpus_is_large_and_axolotl_accepts_every_config():
    assert len(CORPUS) >= 40
    rejected = {name: problems for name, args in CORPUS.items() if name not in TRANSLATED and not _package_missing(name) and (problems := axolotl_schema.schema_problems(
        {k: v for k, v in args.items() if k not in ("debug", "strict", "gptq_groupsize", "eval_table_max_new_tokens",
                                                    "safe_serialization", "rl_adapter_ref_model")}, _plugins(args), H100))}
    assert rejected == {}


# The model type config.json would give (the pipeline reads it; here there is no download).
MODEL_TYPES = {"gemma-3n": "gemma3n", "gemma-3": "gemma3", "gemma-2": "gemma2", "Mixtral": "mixtral", "Mistral": "mistral",
               "Qwen3": "qwen3", "Qwen2": "qwen2", "Phi-3": "phi3", "falcon": "falcon", "mamba": "mamba", "Llama": "llama"}


def model_type(base_model: str) -> str | None:
    return next((kind for marker, kind in MODEL_TYPES.items() if marker.lower() in base_model.lower()), None)


def plan_on(args: dict, hardware: Hardware, tmp_path):
    """Validation, the plan and the fast defaults, as the pipeline runs them."""
    settings = WorkerSettings(base_volume=tmp_path, examples_dir=REPO_ROOT / "examples")
    raw = {"user_id": "corpus", "model_id": "m", "run_id": "r", "args": args}
    valid = validate_job(raw, settings, hardware)
    plan = build_axolotl_config(valid.args, run_paths(settings.runs_dir, "corpus", "r"), tmp_path / "prepared", hardware, Tracking())
    speedups = Speedups(flash_attn=True, liger=True, model_type=model_type(args["base_model"]))
    apply_fast_defaults(plan.config, hardware, speedups, validate=functools.partial(planned_config_problems, hardware=hardware))
    return valid, plan


@pytest.mark.parametrize("name", sorted(CORPUS))
@pytest.mark.parametrize("hardware", [H100, CPU_ONLY], ids=["h100", "cpu"])
def test_the_worker_accepts_what_axolotl_accepts(name, hardware, tmp_path):
    if hardware is not CPU_ONLY and _package_missing(name):
        pytest.skip(f"Axolotl refuses {name} without {NEEDS_PACKAGE[name]}, which is not installed here")
    try:
        valid, plan = plan_on(copy.deepcopy(CORPUS[name]), hardware, tmp_path)
    except JobError as exc:
        # Without the package Axolotl's own refusal comes beside the worker's.
        own = [d for d in exc.details if not (_package_missing(name) and f"{NEEDS_PACKAGE[name]} is not installed" in d)]
        if name in REFUSED_ON_CPU and hardware is CPU_ONLY:
            assert any(d.startswith(REFUSED_ON_CPU[name]) for d in own), exc.details
        if hardware is CPU_ONLY and own and all(any(r in d for r in CPU_REFUSALS) for d in own):
            return  # a documented refusal the user can act on (the message says what to use instead)
        raise AssertionError(f"{name} on {'GPU' if hardware.has_gpu else 'CPU'} refused: {exc.details}") from None
    assert not (hardware is CPU_ONLY and name in REFUSED_ON_CPU), f"{name} passes on a CPU worker"
    final = planned_config_problems(plan.config, hardware)
    assert final == [], f"Axolotl refuses the worker's final config for {name}: {final}"
