"""Several processes: DeepSpeed/FSDP presets, their checks, the memory estimate, and a real
2-process DDP training on CPU (gloo) through the same accelerate launch path as GPUs."""

from __future__ import annotations

import json

import pytest

from conftest import collect, make_job, tiny_args
from finetune_worker.checks import axolotl_schema
from finetune_worker.checks.args import ArgsContext, check_args
from finetune_worker.checks.distributed import deepspeed_preset_path, process_count
from finetune_worker.checks.paths import make_roots
from finetune_worker.contract.settings import REPO_ROOT
from finetune_worker.host.hardware import Hardware
from finetune_worker.sizing.memory import GIB, estimate_gpu_memory, params_from_config

H100 = Hardware(gpu_count=2, gpu_names=("NVIDIA H100",) * 2, gpu_memory_bytes=(80 * GIB,) * 2, bf16=True, compute_capability=(9, 0))
LLAMA_3_8B = {"hidden_size": 4096, "num_hidden_layers": 32, "vocab_size": 128256, "intermediate_size": 14336,
              "num_attention_heads": 32, "num_key_value_heads": 8, "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
LLAMA_3_2_1B = {"hidden_size": 2048, "num_hidden_layers": 16, "vocab_size": 128256, "intermediate_size": 8192,
                "num_attention_heads": 32, "num_key_value_heads": 8, "tie_word_embeddings": True, "torch_dtype": "bfloat16"}


@pytest.fixture
def gpu_ctx(volume):
    return ArgsContext(roots=make_roots(volume, REPO_ROOT / "examples"), hardware=H100)


def hub_args(**extra):
    return {"base_model": "NousResearch/Meta-Llama-3-8B", "datasets": [{"path": "mhenrichsen/alpaca_2k_test", "type": "alpaca"}],
            "learning_rate": 2e-5, "micro_batch_size": 1, "sequence_len": 2048, **extra}


@pytest.mark.parametrize("name", ["zero1", "zero2", "zero3", "zero3_offload"])
def test_deepspeed_presets_resolve_to_shipped_json_that_axolotl_accepts(gpu_ctx, name):
    checked, problems = check_args(hub_args(deepspeed=name), gpu_ctx)
    assert problems == []
    assert checked["deepspeed"] == str(deepspeed_preset_path(name))
    config = json.loads(deepspeed_preset_path(name).read_text())
    assert config["zero_optimization"]["stage"] == int(name[4])
    assert config["train_micro_batch_size_per_gpu"] == "auto" and config["bf16"]["enabled"] == "auto"
    assert ("offload_optimizer" in config["zero_optimization"]) == name.endswith("offload")
    assert axolotl_schema.schema_problems(checked, ()) == []


@pytest.mark.parametrize("name", ["full_shard", "full_shard_offload", "qlora"])
def test_fsdp_presets_become_fsdp2_configs_that_axolotl_accepts(gpu_ctx, name):
    extra = {"adapter": "qlora", "load_in_4bit": True, "lora_r": 8, "lora_target_linear": True} if name == "qlora" else {}
    checked, problems = check_args(hub_args(fsdp_config=name, **extra), gpu_ctx)
    assert problems == [], problems
    assert checked["fsdp_version"] == 2 and checked["fsdp_config"]["auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert checked["fsdp_config"]["offload_params"] is (name == "full_shard_offload")
    assert axolotl_schema.schema_problems(checked, ()) == []


@pytest.mark.parametrize(
    ("extra", "path", "fragment"),
    [
        ({"deepspeed": "zero3", "fsdp_config": "full_shard"}, "args.deepspeed", "cannot be used together"),
        ({"deepspeed": "zero3", "load_in_8bit": True, "adapter": "lora"}, "args.load_in_8bit", "ZeRO-3 cannot shard 8-bit"),
        ({"deepspeed": "zero4"}, "args.deepspeed", "unknown preset 'zero4'"),
        ({"fsdp_config": "qlora"}, "args.fsdp_config", "needs adapter: qlora"),
        ({"deepspeed": "/etc/ds.json"}, "args.deepspeed", "inside the allowed roots"),
    ],
)
def test_incompatible_combinations_fail_validation(gpu_ctx, extra, path, fragment):
    _, problems = check_args(hub_args(**extra), gpu_ctx)
    assert any(p.path == path and fragment in p.message for p in problems), problems


def test_a_custom_deepspeed_json_on_the_volume_is_accepted(gpu_ctx, volume):
    custom = volume / "my_ds.json"
    custom.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    checked, problems = check_args(hub_args(deepspeed=str(custom)), gpu_ctx)
    assert problems == [] and checked["deepspeed"] == str(custom)


def test_one_process_per_gpu_unless_asked():
    assert (process_count(None, 0), process_count(None, 1), process_count(None, 4), process_count(2, 8)) == (1, 1, 4, 2)


def test_parameter_count_from_config_matches_the_published_sizes():
    assert params_from_config(LLAMA_3_8B) == pytest.approx(8.03e9, rel=0.01)
    assert params_from_config(LLAMA_3_2_1B) == pytest.approx(1.236e9, rel=0.01)


def test_memory_estimate_follows_lora_quantisation_and_sharding():
    full = estimate_gpu_memory({"bf16": True, "micro_batch_size": 1, "sequence_len": 2048}, LLAMA_3_8B)
    lora = estimate_gpu_memory({"bf16": True, "adapter": "lora", "lora_r": 16, "lora_target_linear": True,
                                "micro_batch_size": 1, "sequence_len": 2048, "gradient_checkpointing": True}, LLAMA_3_8B)
    qlora = estimate_gpu_memory({"bf16": True, "adapter": "qlora", "load_in_4bit": True, "lora_r": 16, "lora_target_linear": True,
                                 "micro_batch_size": 1, "sequence_len": 2048, "gradient_checkpointing": True}, LLAMA_3_8B)
    zero3 = estimate_gpu_memory({"bf16": True, "micro_batch_size": 1, "sequence_len": 2048, "deepspeed": str(deepspeed_preset_path("zero3"))},
                                LLAMA_3_8B, num_gpus=8)
    assert full.parts["weights"] == pytest.approx(16.06e9, rel=0.01)  # 2 bytes per parameter
    assert full.parts["optimizer"] == 2 * full.parts["weights"]  # two bf16 Adam states
    assert full.total > 60 * GIB > lora.total > qlora.total
    # QLoRA keeps embeddings and LM head in 16 bits, and unfused logits cost 14 bytes per entry (was: < 12 GiB)
    assert 16 * GIB < lora.total < 24 * GIB and 5 * GIB < qlora.total < 14 * GIB
    # DeepSpeed keeps fp32 master weights and fp32 Adam states (12 bytes), sharded (was: < full / 3)
    assert zero3.parts["weights"] == full.parts["weights"] // 8 and zero3.total < full.total / 2
    assert zero3.parts["optimizer"] == pytest.approx(params_from_config(LLAMA_3_8B) * 12 / 8, rel=1e-6)


def test_a_config_that_cannot_fit_fails_before_any_download(env, volume):
    model = volume / "models" / "llama-3-8b-shape"
    model.mkdir(parents=True, exist_ok=True)
    (model / "config.json").write_text(json.dumps(LLAMA_3_8B))
    small = Hardware(gpu_count=1, gpu_names=("NVIDIA L4",), gpu_memory_bytes=(24 * GIB,), bf16=True, compute_capability=(8, 9))
    args = hub_args(base_model=str(model), bf16=True)
    events = collect(make_job(args), env, hardware=small)
    final = events[-1]
    assert final["type"] == "error" and final["code"] == "out_of_memory", final
    assert "24.0 GiB" in final["message"] and "adapter: lora" in final["message"]
    # the fast defaults already turned on gradient checkpointing, since memory needs it
    defaults = [e for e in events if e["type"] == "status" and "defaults" in e]
    assert defaults and "gradient_checkpointing: True" in defaults[0]["defaults"]
    assert not any(e.get("stage") in ("downloading", "training") for e in events)


@pytest.mark.training
def test_two_processes_train_on_cpu_through_accelerate(tiny, env, volume):
    job = make_job(tiny_args(tiny, num_epochs=2), num_processes=2)
    events = collect(job, env)
    result = events[-1]
    assert result["type"] == "result", result
    launch = [e for e in events if e["type"] == "status" and e.get("num_processes") == 2]
    assert launch and "accelerate" in launch[0]["message"]
    # 36 rows x 2 epochs, micro batch 4 on each of two ranks: 9 steps (one process alone takes 18)
    assert result["metrics"]["total_steps"] == 9
    log = (volume / "runs" / job["user_id"] / job["run_id"] / "train.log").read_text()
    for rank in (0, 1):
        assert f"rank {rank} of 2: training started" in log and f"rank {rank} of 2: training finished" in log
    records = (volume / "runs" / job["user_id"] / job["run_id"] / "progress.jsonl").read_text().splitlines()
    steps = [json.loads(line)["step"] for line in records if '"kind": "step"' in line]
    assert steps == list(range(1, 10))  # one writer (rank 0): every step once
    progress = [e for e in events if e["type"] == "progress"]
    assert progress and progress[-1]["step"] == 9
    assert (volume / "runs" / job["user_id"] / job["run_id"] / "output" / "adapter_model.safetensors").is_file()


@pytest.mark.training
def test_a_failing_rank_fails_the_job_with_its_log(tiny, env):
    # every rank fails while attaching LoRA to modules the model does not have
    args = tiny_args(tiny, num_epochs=1, lora_target_modules=["no_such_module"], lora_target_linear=False)
    events = collect(make_job(args, num_processes=2), env)
    final = events[-1]
    assert final["type"] == "error" and final["code"] != "internal_error", final
    assert any("no_such_module" in line or "ChildFailedError" in line or "rank" in line for line in final["log_tail"])


@pytest.mark.parametrize(("path", "preset"), [
    ("deepspeed_configs/zero1.json", "zero1"),
    ("deepspeed_configs/zero2.json", "zero2"),
    ("deepspeed_configs/zero3.json", "zero3"),
    ("deepspeed_configs/zero3_bf16.json", "zero3"),
    ("deepspeed_configs/zero3_bf16_cpuoffload_all.json", "zero3_offload"),
    ("/workspace/axolotl/deepspeed_configs/zero2.json", "zero2"),
])
def test_axolotls_deepspeed_files_get_the_matching_preset_with_a_warning(gpu_ctx, path, preset):
    gpu_ctx.notes.clear()
    checked, problems = check_args(hub_args(deepspeed=path), gpu_ctx)
    assert problems == [] and checked["deepspeed"] == str(deepspeed_preset_path(preset))
    assert gpu_ctx.notes == [f"args.deepspeed: {path} is a file of Axolotl's repository; the worker's {preset} preset stands in for it"]


def test_a_missing_deepspeed_file_names_the_presets(gpu_ctx):
    _, problems = check_args(hub_args(deepspeed="configs/my_zero2.json"), gpu_ctx)
    assert [p.path for p in problems] == ["args.deepspeed"]
    assert problems[0].message.endswith("; or use a preset shipped with the worker: zero1, zero2, zero3, zero3_offload "
                                        "(also Axolotl's deepspeed_configs/zero*.json names)")


def test_the_users_own_file_at_an_axolotl_deepspeed_path_is_used_not_the_preset(tmp_path):
    own = tmp_path / "deepspeed_configs" / "zero2.json"
    own.parent.mkdir()
    own.write_text(json.dumps({"zero_optimization": {"stage": 2, "overlap_comm": False}}))
    ctx = ArgsContext(roots=make_roots(tmp_path, REPO_ROOT / "examples"), hardware=H100)
    checked, problems = check_args(hub_args(deepspeed="deepspeed_configs/zero2.json"), ctx)
    assert problems == [] and checked["deepspeed"] == str(own.resolve()) and ctx.notes == []


def test_deepspeed_and_fsdp_on_cpu_say_what_to_do(volume):
    from finetune_worker.host.hardware import CPU_ONLY

    ctx = ArgsContext(roots=make_roots(volume, REPO_ROOT / "examples"), hardware=CPU_ONLY)
    for extra, path in (({"deepspeed": "zero2"}, "args.deepspeed"), ({"fsdp_config": "full_shard"}, "args.fsdp_config")):
        _, problems = check_args(hub_args(**extra), ctx)
        assert [str(p) for p in problems if p.path == path] == [
            f"{path}: DeepSpeed and FSDP need CUDA GPUs and this worker has none; remove deepspeed / fsdp_config, or run on a GPU worker"]
