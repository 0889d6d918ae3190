"""Configs written for earlier Axolotl releases on the installed one (0.21): FSDP1 carried
over to FSDP2, options of earlier releases dropped with a note (typos still refused),
plugins registered as `axolotl train` registers them, with nothing left over between jobs."""

from __future__ import annotations

import copy

import pytest

from conftest import collect, collect_until, make_job, tiny_args
from finetune_worker.checks import axolotl_schema
from finetune_worker.checks.args import ArgsContext, check_args
from finetune_worker.checks.fsdp import translate_fsdp1
from finetune_worker.checks.native import native_model_types, remote_code_decision
from finetune_worker.checks.option_history import earlier_release, installed_axolotl
from finetune_worker.checks.paths import make_roots
from finetune_worker.contract.settings import REPO_ROOT
from finetune_worker.host.hardware import CPU_ONLY, Hardware

TWO_H100 = Hardware(gpu_count=2, gpu_names=("NVIDIA H100 80GB HBM3",) * 2, gpu_memory_bytes=(80 * 1024**3,) * 2,
                    bf16=True, compute_capability=(9, 0), cpu_count=32)

# The FSDP+QLoRA config of Axolotl's examples up to 0.19 (llama-3/qlora-fsdp-70b.yaml, which
# dstack's FSDP+QLoRA recipe reuses): FSDP1's list and prefixed keys.
FSDP1_QLORA = {
    "base_model": "NousResearch/Meta-Llama-3-8B", "load_in_4bit": True, "adapter": "qlora", "lora_r": 8, "lora_alpha": 16,
    "lora_dropout": 0.05, "lora_target_linear": True, "sequence_len": 512, "micro_batch_size": 1, "gradient_accumulation_steps": 4,
    "num_epochs": 1, "optimizer": "adamw_torch_fused", "learning_rate": 1e-5, "bf16": "auto", "gradient_checkpointing": True,
    "datasets": [{"path": "tatsu-lab/alpaca", "type": "alpaca"}],
    "fsdp": ["full_shard", "auto_wrap"],
    "fsdp_config": {
        "fsdp_limit_all_gathers": True, "fsdp_sync_module_states": True, "fsdp_offload_params": True, "fsdp_use_orig_params": False,
        "fsdp_cpu_ram_efficient_loading": True, "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "fsdp_transformer_layer_cls_to_wrap": "LlamaDecoderLayer", "fsdp_state_dict_type": "FULL_STATE_DICT",
        "fsdp_sharding_strategy": "FULL_SHARD",
    },
    "special_tokens": {"pad_token": "<|end_of_text|>"},
}
FSDP2_EQUIVALENT = {
    "fsdp_version": 2, "offload_params": True, "cpu_ram_efficient_loading": True, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
    "transformer_layer_cls_to_wrap": "LlamaDecoderLayer", "state_dict_type": "FULL_STATE_DICT", "reshard_after_forward": True,
}


def translated(args: dict) -> tuple[dict, list[str], list[str]]:
    args, notes = copy.deepcopy(args), []
    problems = translate_fsdp1(args, notes)
    return args, notes, [str(p) for p in problems]


def axolotl_accepts(args: dict) -> list[str]:
    return [str(p) for p in axolotl_schema.schema_problems(args, (), TWO_H100, 2)]


def test_axolotl_itself_refuses_fsdp1_so_the_translation_is_needed():
    assert any("top-level `fsdp` list is no longer supported" in p for p in axolotl_accepts(copy.deepcopy(FSDP1_QLORA)))


def test_the_fsdp1_qlora_example_becomes_its_fsdp2_equivalent_with_one_note_per_change():
    args, notes, problems = translated(FSDP1_QLORA)
    assert problems == [] and "fsdp" not in args
    assert args["fsdp_config"] == FSDP2_EQUIVALENT
    assert notes == [
        "args.fsdp: FSDP1's list ['full_shard', 'auto_wrap'], which Axolotl 0.20 removed, becomes FSDP2's fsdp_config",
        "args.fsdp_config.fsdp_sharding_strategy FULL_SHARD is FSDP1's; it becomes fsdp_config.reshard_after_forward: true",
        "args.fsdp_config.fsdp_sync_module_states is an FSDP1 option with no FSDP2 equivalent; it is dropped "
        "(FSDP2 broadcasts rank 0's weights itself when cpu_ram_efficient_loading is on)",
        "args.fsdp_config.fsdp_use_orig_params is an FSDP1 option with no FSDP2 equivalent; it is dropped (FSDP2 always keeps the original parameters)",
        "args.fsdp_config.fsdp_limit_all_gathers is an FSDP1 option with no FSDP2 equivalent; it is dropped (FSDP2 has no rate limiter to turn on)",
        "args.fsdp_config.fsdp_offload_params is FSDP1's name; it becomes fsdp_config.offload_params",
        "args.fsdp_config.fsdp_cpu_ram_efficient_loading is FSDP1's name; it becomes fsdp_config.cpu_ram_efficient_loading",
        "args.fsdp_config.fsdp_auto_wrap_policy is FSDP1's name; it becomes fsdp_config.auto_wrap_policy",
        "args.fsdp_config.fsdp_transformer_layer_cls_to_wrap is FSDP1's name; it becomes fsdp_config.transformer_layer_cls_to_wrap",
        "args.fsdp_config.fsdp_state_dict_type is FSDP1's name; it becomes fsdp_config.state_dict_type",
    ]
    assert axolotl_accepts(args) == []


@pytest.mark.parametrize(("fsdp1", "fsdp2", "note"), [
    ({"fsdp": ["shard_grad_op", "auto_wrap", "offload"], "fsdp_config": {"fsdp_transformer_layer_cls_to_wrap": "LlamaDecoderLayer"}},
     {"fsdp_version": 2, "reshard_after_forward": False, "offload_params": True, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
      "transformer_layer_cls_to_wrap": "LlamaDecoderLayer"},
     "args.fsdp: FSDP1's list ['shard_grad_op', 'auto_wrap', 'offload'], which Axolotl 0.20 removed, becomes FSDP2's fsdp_config "
     "(shard_grad_op -> fsdp_config.reshard_after_forward: false; offload -> fsdp_config.offload_params: true; "
     "auto_wrap -> fsdp_config.auto_wrap_policy: TRANSFORMER_BASED_WRAP)"),
    ({"fsdp": "full_shard auto_wrap"},
     {"fsdp_version": 2, "reshard_after_forward": True, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP"},
     "args.fsdp: FSDP1's list ['full_shard', 'auto_wrap'], which Axolotl 0.20 removed, becomes FSDP2's fsdp_config "
     "(full_shard -> fsdp_config.reshard_after_forward: true; auto_wrap -> fsdp_config.auto_wrap_policy: TRANSFORMER_BASED_WRAP)"),
    ({"fsdp_version": 1, "fsdp_config": {"sharding_strategy": "HYBRID_SHARD", "auto_wrap_policy": "TRANSFORMER_BASED_WRAP"}},
     {"fsdp_version": 2, "reshard_after_forward": True, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP"},
     "args.fsdp_config.sharding_strategy HYBRID_SHARD is FSDP1's; it becomes fsdp_config.reshard_after_forward: true "
     "(hybrid sharding across nodes is FSDP2's dp_replicate_size; on one machine it is the same)"),
    ({"fsdp_config": {"fsdp_version": 1, "fsdp_sharding_strategy": 2, "fsdp_forward_prefetch": True}},
     {"fsdp_version": 2, "reshard_after_forward": False},
     "args.fsdp_config.fsdp_sharding_strategy SHARD_GRAD_OP is FSDP1's; it becomes fsdp_config.reshard_after_forward: false"),
    ({"fsdp_config": {"fsdp_version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer", "LlamaMLP"], "state_dict_type": "LOCAL_STATE_DICT"}},
     {"fsdp_version": 2, "transformer_layer_cls_to_wrap": "LlamaDecoderLayer,LlamaMLP", "state_dict_type": "SHARDED_STATE_DICT"},
     "args.fsdp_config.transformer_layer_cls_to_wrap: the list ['LlamaDecoderLayer', 'LlamaMLP'] becomes "
     "fsdp_config.transformer_layer_cls_to_wrap: 'LlamaDecoderLayer,LlamaMLP', the comma-separated text FSDP2 reads"),
    ({"fsdp_config": {"fsdp_version": 1, "backward_prefetch": "BACKWARD_PRE", "fsdp_use_orig_params": True, "reshard_after_forward": True}},
     {"fsdp_version": 2, "reshard_after_forward": True},
     "args.fsdp_config.backward_prefetch is an FSDP1 option with no FSDP2 equivalent; it is dropped (FSDP2 prefetches the next all-gather in backward by itself)"),
])
def test_each_fsdp1_form_is_translated_and_axolotl_accepts_the_result(fsdp1, fsdp2, note):
    base = {key: value for key, value in FSDP1_QLORA.items() if key not in ("fsdp", "fsdp_config")}
    args, notes, problems = translated({**base, **fsdp1})
    assert problems == []
    assert args["fsdp_config"] == fsdp2 and "fsdp" not in args
    assert note in notes
    assert axolotl_accepts(args) == []


def test_an_fsdp2_config_is_left_as_it_is():
    fsdp2 = {"fsdp_config": {"reshard_after_forward": True, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP"}}
    args, notes, problems = translated(fsdp2)
    assert (args, notes, problems) == (fsdp2, [], [])
    preset, notes, problems = translated({"fsdp_version": 2, "fsdp_config": {"fsdp_version": 2, "offload_params": True}})
    assert notes == [] and problems == [] and preset["fsdp_config"] == {"fsdp_version": 2, "offload_params": True}


@pytest.mark.parametrize(("fsdp1", "where"), [
    ({"fsdp": ["no_shard"]}, "args.fsdp"),
    ({"fsdp_config": {"fsdp_sharding_strategy": "NO_SHARD"}}, "args.fsdp_config.fsdp_sharding_strategy"),
    ({"fsdp_config": {"sharding_strategy": 3}}, "args.fsdp_config.sharding_strategy"),
])
def test_no_shard_has_no_fsdp2_equivalent_and_the_refusal_says_what_to_write(fsdp1, where):
    _, _, problems = translated(fsdp1)
    assert problems == [f"{where}: NO_SHARD keeps a full copy of the model on every GPU, which is DDP and has no FSDP2 equivalent; "
                        "remove fsdp and fsdp_config to train with DDP (one process per GPU), or use reshard_after_forward: false "
                        "(FSDP2 that shards but keeps parameters gathered between forward and backward)"]


def test_an_unknown_fsdp1_strategy_is_refused_naming_the_known_ones():
    _, _, problems = translated({"fsdp": ["full_shard", "shard_everything"]})
    assert problems == ["args.fsdp: unknown FSDP1 strategy 'shard_everything' (known: full_shard, shard_grad_op, hybrid_shard, "
                        "hybrid_shard_zero2, no_shard, offload, auto_wrap); use fsdp_config (FSDP2) instead"]


def test_the_worker_carries_an_fsdp1_config_over_on_a_gpu_worker(tmp_path):
    """Through the worker's whole args check (Axolotl's validation included) on a two-GPU
    worker: no problem, the FSDP2 config, and the notes that become warning events."""
    ctx = ArgsContext(roots=make_roots(tmp_path, REPO_ROOT / "examples", "alice"), hardware=TWO_H100)
    checked, problems = check_args(copy.deepcopy(FSDP1_QLORA), ctx)
    assert [str(p) for p in problems] == []
    assert checked["fsdp_config"] == FSDP2_EQUIVALENT and "fsdp" not in checked
    assert len([n for n in ctx.notes if "FSDP1" in n]) == 10


def test_options_of_earlier_releases_are_dropped_and_typos_refused(tiny):
    ctx = ArgsContext(roots=make_roots(tiny, REPO_ROOT / "examples", "alice"), hardware=CPU_ONLY)
    version = installed_axolotl()
    dataset = {"path": str(tiny / "tiny_alpaca.jsonl"), "type": "alpaca", "ds_type": "json", "train_on_split": "train", "system_prompt": "Be brief."}
    args = tiny_args(tiny, datasets=[dataset], unsloth_lora_mlp=True, gptq_disable_exllama=True, full_finetune=True, overlap_len=64,
                     min_sample_len=2, lerning_rate=0.1)
    checked, problems = check_args(args, ctx)
    assert [str(p) for p in problems] == ["args.lerning_rate: unknown option; did you mean 'learning_rate'? (Axolotl would silently ignore it)"]
    assert checked["min_sample_len"] == 2  # still an option of the installed Axolotl
    assert not {"unsloth_lora_mlp", "gptq_disable_exllama", "full_finetune", "overlap_len"} & set(checked)
    assert set(checked["datasets"][0]) == {"path", "type", "ds_type"}
    assert f"args.unsloth_lora_mlp is an option of Axolotl 0.5.2 to 0.16.1; Axolotl {version} ignores it, so it is dropped" in ctx.notes
    assert f"args.gptq_disable_exllama is an option of Axolotl before 0.5; Axolotl {version} ignores it, so it is dropped" in ctx.notes
    assert (f"args.datasets[0].train_on_split is a dataset field of Axolotl 0.5.2 to 0.8.0; Axolotl {version} ignores it, so it is dropped"
            in ctx.notes)
    assert f"args.datasets[0].system_prompt is a dataset field of Axolotl before 0.5; Axolotl {version} ignores it, so it is dropped" in ctx.notes


def test_the_history_knows_what_each_release_had():
    assert earlier_release("datasets.train_on_split") == "Axolotl 0.5.2 to 0.8.0"
    assert earlier_release("learning_rate") is None  # an option today
    assert earlier_release("lerning_rate") is None  # never an option
    assert earlier_release("fsdp") == "Axolotl 0.5.2 to 0.19.0"


LIGER = "axolotl.integrations.liger.LigerPlugin"
CCE = "axolotl.integrations.cut_cross_entropy.CutCrossEntropyPlugin"


def test_no_plugin_state_leaks_from_one_job_to_the_next_in_one_process(tiny):
    """Axolotl 0.21 keeps one plugin registry per process and merges the options of every
    plugin ever registered into the next validation; the worker's checks must not."""
    from axolotl.integrations.base import PluginManager

    before = dict(PluginManager.get_instance().plugins)
    with_plugins = tiny_args(tiny, plugins=[LIGER, CCE], liger_rope=True, bf16=True)
    assert axolotl_schema.schema_problems(with_plugins, (LIGER, CCE), TWO_H100, 1) == []
    plain = tiny_args(tiny, liger_rope=True, cut_cross_entropy=True)
    problems = [str(p) for p in axolotl_schema.schema_problems(plain, (), TWO_H100, 1)]
    assert dict(PluginManager.get_instance().plugins) == before
    assert axolotl_schema.known_keys() == axolotl_schema.known_keys(())
    assert "liger_rope" not in axolotl_schema.known_keys() and "cut_cross_entropy" not in axolotl_schema.known_keys()
    assert "liger_rope" in axolotl_schema.known_keys((LIGER,))
    assert problems == []  # Axolotl drops options it does not know; the worker's own check refuses them (below)
    ctx = ArgsContext(roots=make_roots(tiny, REPO_ROOT / "examples", "alice"), hardware=TWO_H100)
    _, found = check_args(plain, ctx)
    assert "args.liger_rope: unknown option" in " ".join(str(p) for p in found)


def test_a_plugin_that_cannot_load_is_refused_before_anything_runs(tiny):
    ctx = ArgsContext(roots=make_roots(tiny, REPO_ROOT / "examples", "alice"), hardware=CPU_ONLY)
    _, found = check_args(tiny_args(tiny, plugins=["axolotl.integrations.liger.NoSuchPlugin", "axolotl.integrations.nonexistent.Plugin"]), ctx)
    messages = [str(p) for p in found]
    assert messages[0].startswith("args.plugins[0]: cannot load plugin class 'NoSuchPlugin'")
    assert messages[1].startswith("args.plugins[1]: no such integration 'nonexistent'")


@pytest.mark.parametrize("plugin", ["axolotl.integrations.coreweave.CoreWeavePlugin",
                                    "axolotl.integrations.diffusion_decision.DiffusionDecisionPlugin"])
def test_plugins_that_reach_past_the_worker_are_refused(tiny, plugin):
    ctx = ArgsContext(roots=make_roots(tiny, REPO_ROOT / "examples", "alice"), hardware=CPU_ONLY)
    _, found = check_args(tiny_args(tiny, plugins=[plugin]), ctx)
    assert any(str(p).startswith("args.plugins[0]: the ") and "integration is not available on this worker" in str(p) for p in found)


# -- trust_remote_code on models that transformers implements --------------------------


def test_the_flag_is_dropped_for_a_native_model_type_and_refused_for_another():
    args = {"base_model": "mistralai/Mistral-7B-v0.1", "trust_remote_code": True}
    drop, note, problem = remote_code_decision(args, {"model_type": "mistral", "auto_map": {"AutoModel": "x.Y"}}, allowed=False)
    assert drop and problem is None
    assert note == ("args.trust_remote_code: mistralai/Mistral-7B-v0.1 is a 'mistral' model, which the installed transformers implements, "
                    "so it loads with transformers' own classes and trust_remote_code is dropped (no repository code runs)")
    _, _, problem = remote_code_decision(args, {"model_type": "acme_custom"}, allowed=False)
    assert problem.path == "args.trust_remote_code" and "'acme_custom' model, which the installed transformers does not implement" in problem.message
    _, _, problem = remote_code_decision(args, None, allowed=False)
    assert "could not read mistralai/Mistral-7B-v0.1's config.json" in problem.message
    assert remote_code_decision(args, {"model_type": "acme_custom"}, allowed=True) == (False, None, None)
    assert remote_code_decision({**args, "trust_remote_code": False}, None, allowed=False) == (False, None, None)
    assert {"llama", "mistral", "mixtral", "qwen2", "phi3", "falcon", "dbrx", "jamba", "gemma3"} <= native_model_types()


def _with_model_type(tiny, volume, model_type: str):
    import json
    import shutil

    model = volume / "models" / f"tiny-{model_type}"
    if not model.exists():
        shutil.copytree(tiny / "tiny-llama", model)
        config = json.loads((model / "config.json").read_text())
        (model / "config.json").write_text(json.dumps({**config, "model_type": model_type, "auto_map": {"AutoModelForCausalLM": "modeling.M"}}))
    return model


def test_a_job_on_a_native_model_trains_without_repository_code(tiny, env, volume):
    """Before any weights load: the warning, and config.yaml without the flag (the job is
    stopped once its run directory is written; nothing trains)."""
    job = make_job(tiny_args(tiny, trust_remote_code=True), mode="preflight")
    events = collect_until(job, env, lambda event: event.get("stage") == "preprocessing")
    warnings = [e["message"] for e in events if e["type"] == "warning"]
    assert any("is a 'llama' model, which the installed transformers implements" in w for w in warnings), events
    config = (volume / "runs" / job["user_id"] / job["run_id"] / "config.yaml").read_text()
    assert "trust_remote_code" not in config


def test_a_job_on_a_model_that_needs_its_own_code_is_refused_before_anything_loads(tiny, env, volume):
    model = _with_model_type(tiny, volume, "acme_custom")
    job = make_job(tiny_args(tiny, base_model=str(model), trust_remote_code=True))
    events = collect(job, env)
    error = events[-1]
    assert error["type"] == "error" and error["code"] == "invalid_config", error
    assert any(d.startswith("args.trust_remote_code: ") and "'acme_custom' model" in d for d in error["details"])
    assert not (volume / "runs" / job["user_id"] / job["run_id"] / "config.yaml").exists()
    assert [e for e in events if e.get("stage") in ("downloading", "training")] == []


def test_a_dataset_trust_remote_code_has_no_effect_and_is_dropped(tiny):
    ctx = ArgsContext(roots=make_roots(tiny, REPO_ROOT / "examples", "alice"), hardware=CPU_ONLY)
    dataset = {"path": str(tiny / "tiny_alpaca.jsonl"), "type": "alpaca", "ds_type": "json", "trust_remote_code": True}
    checked, problems = check_args(tiny_args(tiny, datasets=[dataset]), ctx)
    assert problems == [] and "trust_remote_code" not in checked["datasets"][0]
    assert any(n.startswith("args.datasets[0].trust_remote_code has no effect") for n in ctx.notes)
