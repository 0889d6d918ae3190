"""Pure translations: job -> Axolotl config, argv and child environment."""

from pathlib import Path

import pytest

from finetune_worker.host.hardware import CPU_ONLY, Hardware
from finetune_worker.host.rundir import run_paths
from finetune_worker.plan.children import PROGRESS_FILE_ENV, build_child_env, build_train_argv
from finetune_worker.plan.config import PROGRESS_PLUGIN, build_axolotl_config

GPU = Hardware(gpu_count=1, gpu_names=("H100",), gpu_memory_bytes=(80 * 2**30,), bf16=True)
PATHS = run_paths(Path("/vol/runs"), "alice", "r1")
PREPARED = Path("/vol/cache/prepared")


def plan(args, hardware=GPU):
    return build_axolotl_config(args, PATHS, PREPARED, hardware)


def test_run_paths_live_under_the_run_directory():
    assert PATHS.run_dir == Path("/vol/runs/alice/r1")
    for path in (PATHS.config_file, PATHS.events_file, PATHS.log_file, PATHS.output_dir, PATHS.progress_file, PATHS.result_file):
        assert PATHS.run_dir in path.parents


def test_worker_owned_keys_are_set_and_a_user_value_is_replaced_with_a_warning():
    result = plan({"base_model": "m", "output_dir": "./mine", "dataset_prepared_path": str(PREPARED)})
    assert result.config["output_dir"] == "/vol/runs/alice/r1/output"
    assert result.config["dataset_prepared_path"] == str(PREPARED)
    assert result.warnings == ["args.output_dir is set by the worker: './mine' was replaced with '/vol/runs/alice/r1/output'"]


def test_progress_plugin_is_appended_after_user_plugins():
    result = plan({"plugins": ["axolotl.integrations.liger.LigerPlugin"]})
    assert result.config["plugins"] == ["axolotl.integrations.liger.LigerPlugin", PROGRESS_PLUGIN]
    assert plan({}).config["plugins"] == [PROGRESS_PLUGIN]


def test_hub_keys_are_read_by_the_worker_not_given_to_axolotl():
    result = plan({"hub_model_id": "alice/x", "hub_private_repo": False, "hub_strategy": "end"})
    assert "hub_model_id" not in result.config and "hub_strategy" not in result.config
    assert result.publish == {"hub_model_id": "alice/x", "hub_strategy": "end", "hub_private_repo": False}


def test_gpu_config_is_left_alone():
    args = {"bf16": "auto", "flash_attention": True, "optimizer": "adamw_bnb_8bit", "sample_packing": True}
    result = plan(args)
    assert {k: result.config[k] for k in args} == args
    assert result.adapted_for_cpu == []


def test_cpu_turns_off_cuda_features_and_says_what_changed():
    args = {"bf16": "auto", "flash_attention": True, "optimizer": "adamw_bnb_8bit", "sample_packing": True, "fp16": False}
    result = plan(args, CPU_ONLY)
    config = result.config
    assert config["bf16"] is False and config["fp16"] is False and config["tf32"] is False
    assert config["flash_attention"] is False and config["sample_packing"] is False
    assert config["lora_mlp_kernel"] is config["lora_qkv_kernel"] is config["lora_o_kernel"] is False
    assert config["optimizer"] == "adamw_torch"
    assert result.adapted_for_cpu == [
        "bf16: 'auto' -> false",
        "flash_attention: True -> false",
        "sample_packing: True -> false",
        "optimizer: 'adamw_bnb_8bit' -> 'adamw_torch'",
    ]
    assert result.warnings[0].startswith("no CUDA GPU on this worker")
    assert "optimizer: 'adamw_bnb_8bit' -> 'adamw_torch'" in result.warnings[0]


def test_cpu_with_nothing_user_visible_changed_gives_no_warning():
    result = plan({"base_model": "m", "optimizer": "adamw_torch"}, CPU_ONLY)
    assert result.warnings == [] and result.config["bf16"] is False


def test_plan_does_not_modify_its_input():
    args = {"bf16": True, "plugins": ["axolotl.integrations.liger.LigerPlugin"]}
    plan(args, CPU_ONLY)
    assert args == {"bf16": True, "plugins": ["axolotl.integrations.liger.LigerPlugin"]}


def test_argv_is_a_list_without_a_shell_and_without_secrets():
    argv = build_train_argv("/usr/bin/python3", PATHS.config_file)
    assert argv == ["/usr/bin/python3", "-m", "axolotl.cli.train", "/vol/runs/alice/r1/config.yaml"]
    multi = build_train_argv("/usr/bin/python3", PATHS.config_file, num_processes=2)
    assert multi[:6] == ["/usr/bin/python3", "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    assert multi[-3:] == ["-m", "axolotl.cli.train", "/vol/runs/alice/r1/config.yaml"] and "--main_process_port" in multi


def env_for(base, **secrets):
    return build_child_env(
        base,
        paths=PATHS,
        cache_dir=Path("/vol/cache"),
        package_root=Path("/app/src"),
        hf_token=secrets.get("hf"),
        wandb_api_key=secrets.get("wandb"),
    )


def test_child_env_carries_job_secrets_and_drops_the_workers_own():
    base = {
        "PATH": "/bin",
        "HF_TOKEN": "hf_worker_token_value",
        "RUNPOD_AI_API_KEY": "rpa_secret",
        "RUNPOD_WEBHOOK_GET_JOB": "https://api/job-take/x?token=abc",
        "FINETUNE_USER_TOKEN_SECRET": "the-operator-signs-user-tokens-with-this",
        "PYTHONPATH": "/other",
    }
    env = env_for(base, hf="hf_job_token_value", wandb="wandb-key-value")
    assert "FINETUNE_USER_TOKEN_SECRET" not in env
    assert env["HF_TOKEN"] == "hf_job_token_value"
    assert env["WANDB_API_KEY"] == "wandb-key-value"
    assert "RUNPOD_AI_API_KEY" not in env and "RUNPOD_WEBHOOK_GET_JOB" not in env
    assert env["PATH"] == "/bin"
    assert env["PYTHONPATH"] == "/app/src:/other"
    assert env[PROGRESS_FILE_ENV] == "/vol/runs/alice/r1/progress.jsonl"
    assert env["AXOLOTL_DO_NOT_TRACK"] == "1"
    assert env["HF_HOME"] == "/vol/cache/huggingface"
    assert "WANDB_MODE" not in env


def test_child_env_without_keys_turns_wandb_off_and_keeps_an_operator_hf_home():
    env = env_for({"HF_HOME": "/models"})
    assert "HF_TOKEN" not in env and "WANDB_API_KEY" not in env
    assert env["WANDB_MODE"] == "disabled"
    assert env["HF_HOME"] == "/models"


def test_fast_defaults_on_a_gpu_fill_only_what_the_job_left_unset():
    from finetune_worker.plan.fast_defaults import LIGER_PLUGIN, FastDefaults, Speedups, apply_fast_defaults

    gpu = Hardware(gpu_count=1, gpu_names=("NVIDIA H100",), gpu_memory_bytes=(80 * 2**30,), bf16=True)
    config = {"datasets": [{"path": "x", "type": "alpaca"}], "plugins": ["finetune_worker.run.progress_plugin.ProgressPlugin"]}
    chosen = apply_fast_defaults(config, gpu, Speedups(flash_attn=True, liger=True, model_type="llama")).chosen
    assert config["sample_packing"] is True and config["bf16"] is True and config["attn_implementation"] == "flash_attention_2"
    assert config["plugins"][0] == LIGER_PLUGIN and config["liger_fused_linear_cross_entropy"] is True
    assert config["save_total_limit"] == 2 and "gradient_checkpointing" not in config
    assert "sample_packing: True" in chosen and "attn_implementation: flash_attention_2" in chosen
    mine = {"sample_packing": False, "bf16": False, "fp16": True, "sdp_attention": True, "save_total_limit": 5}
    chosen = apply_fast_defaults(mine, gpu, Speedups(flash_attn=True, fits_without_checkpointing=False)).chosen
    assert mine["sample_packing"] is False and mine["fp16"] is True and "attn_implementation" not in mine
    assert mine["save_total_limit"] == 5 and mine["gradient_checkpointing"] is True
    assert chosen == ["gradient_checkpointing: True"]
    assert apply_fast_defaults({}, CPU_ONLY, Speedups(flash_attn=True)) == FastDefaults()
    assert apply_fast_defaults(sdpa := {"datasets": []}, gpu, Speedups()).chosen and sdpa["attn_implementation"] == "sdpa"
    assert "sample_packing" not in sdpa  # packed samples would attend to each other without flash attention
    assert apply_fast_defaults(dpo := {"rl": "dpo"}, gpu, Speedups(flash_attn=True)).chosen and "sample_packing" not in dpo


def test_fast_defaults_pass_axolotls_schema():
    from finetune_worker.checks import axolotl_schema
    from finetune_worker.plan.fast_defaults import Speedups, apply_fast_defaults

    gpu = Hardware(gpu_count=1, gpu_names=("NVIDIA H100",), gpu_memory_bytes=(80 * 2**30,), bf16=True)
    for speedups in (Speedups(flash_attn=True, liger=True, model_type="llama"), Speedups()):
        config = {"base_model": "org/m", "learning_rate": 1e-4, "datasets": [{"path": "org/d", "type": "alpaca"}]}
        apply_fast_defaults(config, gpu, speedups)
        assert axolotl_schema.schema_problems(config, tuple(config.get("plugins") or ())) == []


def test_plugins_null_is_an_empty_list():
    """Found by the fuzz test: `plugins: null` is valid for Axolotl and must not crash the plan."""
    args = {"base_model": "x", "plugins": None}
    assert plan(args, CPU_ONLY).config["plugins"] == ["finetune_worker.run.progress_plugin.ProgressPlugin"]


# --- fast defaults that must not clash with the config (planned as the pipeline plans) ---

H100 = Hardware(gpu_count=1, gpu_names=("NVIDIA H100",), gpu_memory_bytes=(80 * 2**30,), bf16=True, compute_capability=(9, 0))
BASE = {"base_model": "org/m", "learning_rate": 1e-4, "datasets": [{"path": "org/d", "type": "alpaca"}]}
CCE = "axolotl.integrations.cut_cross_entropy.CutCrossEntropyPlugin"
LIGER = "axolotl.integrations.liger.LigerPlugin"


def fast_speedups(**overrides):
    from finetune_worker.plan.fast_defaults import Speedups

    return Speedups(**{"flash_attn": True, "liger": True, "model_type": "llama", **overrides})


def planned(args, speedups, hardware=H100):
    """The config as the pipeline plans it: plan, fast defaults (refused ones left out),
    then Axolotl's check with the config's plugins registered. Returns all three."""
    from finetune_worker.checks.axolotl_schema import planned_config_problems
    from finetune_worker.plan.fast_defaults import apply_fast_defaults

    config = plan({**BASE, **args}, hardware).config
    fast = apply_fast_defaults(config, hardware, speedups, validate=planned_config_problems)
    return config, fast, planned_config_problems(config)


@pytest.mark.parametrize("extra", [{"plugins": [CCE]}, {"plugins": [CCE], "cut_cross_entropy": True}])
def test_fast_defaults_add_no_second_fused_cross_entropy_to_cut_cross_entropy(extra):
    config, fast, problems = planned(extra, fast_speedups())
    assert problems == [] and fast.dropped == []
    assert config["plugins"] == [LIGER, CCE, PROGRESS_PLUGIN]
    assert "liger_fused_linear_cross_entropy" not in config  # CCE's plugin patches the loss, its option on or unset
    assert config["liger_rms_norm"] is True and config["liger_glu_activation"] is True


def test_fast_defaults_respect_tensor_parallelism_and_tiled_mlp():
    config, fast, problems = planned({"tensor_parallel_size": 2}, fast_speedups())
    assert problems == [] and fast.dropped == []
    assert "liger_rms_norm" not in config and "liger_fused_linear_cross_entropy" not in config
    assert config["liger_rope"] is True
    config, fast, problems = planned({"tiled_mlp": True}, fast_speedups())
    assert problems == [] and fast.dropped == []
    assert "liger_glu_activation" not in config and config["liger_rms_norm"] is True


@pytest.mark.parametrize(
    ("extra", "model_type"),
    [
        ({}, "mamba"),  # no attention layers: transformers refuses an attn_implementation
        ({}, "falcon_mamba"),
        ({"base_model": "state-spaces/mamba-130m"}, None),  # no config.json model_type: Axolotl's Mamba fallback
        ({"model_type": "MambaLMHeadModel"}, None),
        ({}, "gemma3n"),  # Axolotl's examples leave its attention unset
        ({"flex_attention": True}, "llama"),  # builds its own masks
        ({"attn_implementation": "flex_attention"}, "llama"),
        ({"gemma4_hybrid_attn_impl": True}, "gemma4"),  # Axolotl picks flash attention itself
    ],
)
def test_fast_defaults_leave_attention_to_models_and_configs_that_choose_it(extra, model_type):
    config, fast, problems = planned(extra, fast_speedups(model_type=model_type))
    assert problems == [] and fast.dropped == []
    assert config.get("attn_implementation") == extra.get("attn_implementation")
    assert "sample_packing" not in config and "attn_implementation: flash_attention_2" not in fast.chosen


def test_a_fast_default_axolotl_refuses_is_left_out_with_a_note():
    config, fast, problems = planned({"eval_table_size": 5}, fast_speedups(liger=False))
    assert problems == []
    assert "sample_packing" not in config and "pad_to_sequence_len" not in config
    assert config["attn_implementation"] == "flash_attention_2" and config["save_total_limit"] == 2
    assert fast.dropped == [
        "fast default sample_packing: True left out: Axolotl refuses it with this config (args: eval_table_size and "
        "eval_sample_packing are not supported together with sample_packing. Please set 'eval_sample_packing' to false.)"
        "; so are pad_to_sequence_len: True"
    ]


def test_left_out_defaults_take_what_needs_them_along_and_old_problems_are_not_theirs():
    from finetune_worker.plan.fast_defaults import apply_fast_defaults

    def refuse_liger(config):
        return ["args: no Liger here"] if LIGER in config["plugins"] else []

    config = {"plugins": [PROGRESS_PLUGIN]}
    fast = apply_fast_defaults(config, H100, fast_speedups(), validate=refuse_liger)
    assert config["plugins"] == [PROGRESS_PLUGIN] and not any(key.startswith("liger_") for key in config)
    assert fast.dropped == [
        f"fast default plugins: + {LIGER} left out: Axolotl refuses it with this config (args: no Liger here); so are "
        "liger_rope: True, liger_rms_norm: True, liger_glu_activation: True, liger_fused_linear_cross_entropy: True"
    ]
    assert "sample_packing: True" in fast.chosen and "save_total_limit: 2" in fast.chosen
    everything = apply_fast_defaults(mine := {"plugins": [PROGRESS_PLUGIN]}, H100, fast_speedups(), validate=lambda c: ["args: yours"])
    assert everything.dropped == [] and mine["plugins"][0] == LIGER


# --- CPU workers: nothing that needs CUDA is left on ---


def test_cpu_swaps_gpu_only_attention_for_sdpa():
    from finetune_worker.checks import axolotl_schema

    for attention in ("flash_attention_2", "flash_attention_3", "xformers", "sage", "fp8", "kernels-community/flash-attn3"):
        result = plan({**BASE, "attn_implementation": attention}, CPU_ONLY)
        assert result.config["attn_implementation"] == "sdpa"
        assert f"attn_implementation: {attention!r} -> 'sdpa'" in result.adapted_for_cpu
        assert f"attn_implementation: {attention!r} -> 'sdpa'" in result.warnings[0]
    assert axolotl_schema.schema_problems(result.config, ()) == []
    for attention in ("sdpa", "eager", "flex_attention"):
        result = plan({**BASE, "attn_implementation": attention}, CPU_ONLY)
        assert result.config["attn_implementation"] == attention and result.adapted_for_cpu == []


def test_cpu_drops_cuda_only_plugins_with_their_options():
    from finetune_worker.checks import axolotl_schema

    args = {**BASE, "plugins": [LIGER, CCE], "liger_rms_norm": True, "liger_glu_activation": True, "cut_cross_entropy": True, "bf16": True}
    result = plan(args, CPU_ONLY)
    config = result.config
    assert config["plugins"] == [PROGRESS_PLUGIN]
    assert not any(key.startswith("liger_") for key in config) and "cut_cross_entropy" not in config
    assert result.adapted_for_cpu == [
        "bf16: True -> false",
        f"plugins: {LIGER} removed (needs CUDA), with its options liger_glu_activation, liger_rms_norm",
        f"plugins: {CCE} removed (needs CUDA), with its options cut_cross_entropy",
    ]
    assert axolotl_schema.schema_problems(config, tuple(config["plugins"][:-1])) == []
    # Axolotl refuses the user's config as it stood on CPU (CCE without half precision)
    assert axolotl_schema.schema_problems({**args, "bf16": False}, (LIGER, CCE)) != []


def test_cpu_turns_off_fp8_and_triton_kernels():
    from finetune_worker.checks import axolotl_schema

    args = {**BASE, "adapter": "lora", "lora_r": 8, "lora_target_linear": True, "fp8": True, "lora_embedding_kernel": True,
            "fused_attn_kernel": True, "large_head_attention": "triton_flash"}
    result = plan(args, CPU_ONLY)
    config = result.config
    assert config["fp8"] is config["lora_embedding_kernel"] is config["fused_attn_kernel"] is False
    assert config["large_head_attention"] == "sdpa"
    assert result.adapted_for_cpu == [
        "fp8: True -> false",
        "lora_embedding_kernel: True -> false",
        "fused_attn_kernel: True -> false",
        "large_head_attention: 'triton_flash' -> 'sdpa'",
    ]
    assert axolotl_schema.schema_problems(config, ()) == []
    assert "fp8" not in plan(BASE, CPU_ONLY).config  # unset stays unset


def test_cuda_only_plugin_options_are_axolotls():
    """plan.py lists the options of the plugins it drops on CPU; they must be exactly Axolotl's."""
    from finetune_worker.checks import axolotl_schema
    from finetune_worker.plan.config import CUDA_ONLY_PLUGIN_OPTIONS

    classes = {"cut_cross_entropy": "CutCrossEntropyPlugin", "liger": "LigerPlugin", "kernels": "KernelsPlugin", "expert_parallel": "ExpertParallelPlugin"}
    assert set(CUDA_ONLY_PLUGIN_OPTIONS) == set(classes)
    from axolotl.integrations.base import get_builtin_plugins

    for name, options in CUDA_ONLY_PLUGIN_OPTIONS.items():
        plugin = f"axolotl.integrations.{name}.{classes[name]}"
        if plugin in get_builtin_plugins():  # always registered: its options are always known
            model = axolotl_schema.load_plugin_class(axolotl_schema.load_plugin_class(plugin)().get_input_args())
            assert set(options) == set(model.model_fields), name
        else:
            assert set(options) == axolotl_schema.known_keys((plugin,)) - axolotl_schema.known_keys(), name


def test_the_pipeline_warns_about_each_left_out_default(env, volume, monkeypatch):
    """Through run_job: a refused default becomes a warning event, the rest a status event
    (the job then stops at the memory check: an 8B full fine-tune on one 24 GiB GPU)."""
    import json

    from conftest import collect, make_job
    from finetune_worker.plan.fast_defaults import Speedups
    from finetune_worker.sizing import capacity

    model = volume / "models" / "llama-8b-shape-fast-defaults"
    model.mkdir(parents=True, exist_ok=True)
    shape = {"hidden_size": 4096, "num_hidden_layers": 32, "vocab_size": 128256, "intermediate_size": 14336,
             "num_attention_heads": 32, "num_key_value_heads": 8, "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
    (model / "config.json").write_text(json.dumps(shape))
    monkeypatch.setattr(capacity, "speedups", lambda *_: Speedups(flash_attn=True))  # as if flash-attn were installed
    l4 = Hardware(gpu_count=1, gpu_names=("NVIDIA L4",), gpu_memory_bytes=(24 * 2**30,), bf16=True, compute_capability=(8, 9))
    args = {**BASE, "base_model": str(model), "eval_table_size": 5}
    events = collect(make_job(args), env, hardware=l4)
    assert events[-1]["type"] == "error" and events[-1]["code"] == "out_of_memory", events[-1]
    warnings = [e["message"] for e in events if e["type"] == "warning"]
    assert [w for w in warnings if w.startswith("fast default sample_packing: True left out: Axolotl refuses it")]
    defaults = next(e["defaults"] for e in events if e["type"] == "status" and "defaults" in e)
    assert "attn_implementation: flash_attention_2" in defaults and "sample_packing: True" not in defaults
