"""GPU acceptance tests: real trainings through the worker's pipeline on CUDA GPUs.

Run them with `make gpu-test` (`pytest -m gpu -v -s`: -s shows the figures they print)
in the image or a venv on a GPU machine. Without CUDA (this project's CI) conftest.py
skips every test marked `gpu`. Each job goes through `run_job` exactly as a RunPod job
does, with the hardware detected on this machine (not the CPU_ONLY the CPU tests use),
so the worker applies its fast defaults, checks memory and launches one process per GPU.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import collect, make_job, tiny_args
from finetune_worker.contract.settings import REPO_ROOT
from finetune_worker.plan.fast_defaults import LIGER_PLUGIN
from finetune_worker.sizing.memory import GIB, estimate_gpu_memory

pytestmark = pytest.mark.gpu

# Llama-3.2-1B's published shape (config.json of meta-llama/Llama-3.2-1B), random weights.
LLAMA_3_2_1B_SHAPE = dict(
    hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
    head_dim=64, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0, max_position_embeddings=8192,
)
# actual / estimated peak memory must fall in this band (the estimate decides whether a job may start)
MEMORY_BAND = (0.5, 2.0)


def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


@pytest.fixture(scope="module")
def hardware():
    from finetune_worker.host.hardware import detect_hardware

    detected = detect_hardware()
    assert detected.has_gpu, "conftest.py skips these tests without CUDA"
    print(f"\n[gpu] {detected.describe()}, bf16 {detected.bf16}, compute capability {detected.compute_capability}; "
          f"flash_attn {installed('flash_attn')}, liger_kernel {installed('liger_kernel')}, deepspeed {installed('deepspeed')}")
    return detected


def train(job: dict, env: dict, hardware) -> tuple[list[dict], dict, Path]:
    """Run `job` through the pipeline; return its events, its result and its run directory."""
    evs = collect(job, env, hardware=hardware)
    final = evs[-1]
    assert final["type"] == "result" and final["status"] == "completed", json.dumps(final, indent=1)[-6000:]
    return evs, final, Path(env["BASE_VOLUME"]) / "runs" / job["user_id"] / job["run_id"]


def fast_defaults(evs: list[dict]) -> list[str]:
    return next((e["defaults"] for e in evs if e["type"] == "status" and e.get("defaults")), [])


def written_config(run_dir: Path) -> dict:
    return yaml.safe_load((run_dir / "config.yaml").read_text())


def assert_loss_falls(result: dict) -> None:
    metrics = result["metrics"]
    print(f"[gpu]   loss {metrics['first_loss']} -> {metrics['final_loss']} over {metrics['total_steps']} steps; "
          f"peak reserved {metrics.get('peak_memory_reserved', 0) / GIB:.2f} GiB")
    assert metrics["final_loss"] < metrics["first_loss"], metrics


# 1. The fast defaults -------------------------------------------------------------------


def test_fast_defaults_apply_on_the_gpu_and_the_tiny_model_learns(tiny, env, hardware):
    """A plain LoRA job: the worker adds bf16 (fp16 before Ampere), flash attention with
    sample packing (SDPA without flash-attn), Liger where installed; the loss falls."""
    job = make_job(tiny_args(tiny))
    evs, result, run_dir = train(job, env, hardware)
    chosen = fast_defaults(evs)
    print(f"[gpu]   fast defaults: {chosen}")
    for warning in (e["message"] for e in evs if e["type"] == "warning"):
        print(f"[gpu]   warning: {warning}")
    assert not any("adapted to run on CPU" in e.get("message", "") for e in evs)

    flash = installed("flash_attn")
    assert f"bf16: {hardware.bf16}" in chosen
    if not hardware.bf16:
        assert "fp16: True" in chosen
    assert f"attn_implementation: {'flash_attention_2' if flash else 'sdpa'}" in chosen
    assert ("sample_packing: True" in chosen) is flash  # packing only where packed rows stay apart
    assert (f"plugins: + {LIGER_PLUGIN}" in chosen) is installed("liger_kernel")

    config = written_config(run_dir)
    assert config["bf16"] is hardware.bf16
    assert config["attn_implementation"] == ("flash_attention_2" if flash else "sdpa")
    assert config.get("sample_packing", False) is flash
    assert (LIGER_PLUGIN in config["plugins"]) is installed("liger_kernel")
    assert config["plugins"][-1] == "finetune_worker.run.progress_plugin.ProgressPlugin"

    assert_loss_falls(result)
    assert result["metrics"]["peak_memory_reserved"] > 0  # reported by the progress plugin on a GPU
    measured = result["measured"]
    assert measured["peak_memory_allocated"] > 0 and 0 < measured["utilisation"] < 1 and measured["tokens_per_second"] > 0
    assert (Path(result["output_dir"]) / "adapter_model.safetensors").stat().st_size > 0


# 2. Quantised loading ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "quantised",
    [
        pytest.param({"adapter": "qlora", "load_in_4bit": True}, id="qlora-4bit"),
        pytest.param({"adapter": "lora", "load_in_8bit": True}, id="lora-8bit"),
    ],
)
def test_quantised_base_models_train_an_adapter(tiny, env, hardware, quantised):
    """QLoRA (4-bit NF4 base) and LoRA on an 8-bit base: bitsandbytes on the GPU, loss falls."""
    job = make_job(tiny_args(tiny, **quantised))
    evs, result, run_dir = train(job, env, hardware)
    config = written_config(run_dir)
    for key, value in quantised.items():
        assert config[key] == value
    print(f"[gpu]   {quantised}: fast defaults {fast_defaults(evs)}")
    assert_loss_falls(result)
    output = Path(result["output_dir"])
    assert json.loads((output / "adapter_config.json").read_text())["peft_type"] == "LORA"
    assert (output / "adapter_model.safetensors").stat().st_size > 0


# 3. Several GPUs: DeepSpeed ZeRO-2 and FSDP2 ----------------------------------------------


@pytest.mark.parametrize("processes", [1, 2], ids=["1gpu", "2gpu"])
@pytest.mark.parametrize("adapter", ["lora", None], ids=["lora", "full"])
@pytest.mark.parametrize(("key", "preset"), [("deepspeed", "zero2"), ("fsdp_config", "full_shard")], ids=["zero2", "fsdp2"])
def test_sharded_training_on_the_gpus_present(tiny, env, hardware, key, preset, adapter, processes):
    """The worker's presets, one process per GPU (accelerate launch for two). With one GPU
    the worker starts one plain process: DeepSpeed still runs (Axolotl sets up a world of
    one), while accelerate only shards with FSDP in a distributed launch, so the 1-GPU FSDP
    case checks that such a job completes; the 2-GPU cases are the real sharding."""
    if gpu_count() < processes:
        pytest.skip(f"needs {processes} GPUs; this machine has {gpu_count()}")
    if key == "deepspeed" and not installed("deepspeed"):
        pytest.skip("DeepSpeed is not installed in this environment")
    # micro batch 1: packed into about a dozen 256-token rows, the data still gives every rank steps
    args = tiny_args(tiny, num_epochs=4, micro_batch_size=1, **{key: preset})
    if adapter is None:
        for lora_key in ("adapter", "lora_r", "lora_alpha", "lora_dropout", "lora_target_linear"):
            args.pop(lora_key)
        args["learning_rate"] = 0.001
    if processes == 1:
        # a one-GPU worker: Axolotl sets up DeepSpeed's world of one (MASTER_ADDR, ...) only
        # when it sees exactly one GPU (axolotl.utils.trainer.setup_deepspeed_env)
        env = {**env, "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]}
    job = make_job(args, num_processes=processes)
    evs, result, run_dir = train(job, env, hardware)
    config = written_config(run_dir)
    if key == "deepspeed":
        assert config["deepspeed"].endswith("presets/deepspeed/zero2.json")
        assert json.loads(Path(config["deepspeed"]).read_text())["zero_optimization"]["stage"] == 2
    else:
        assert config["fsdp_version"] == 2 and config["fsdp_config"]["auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    log = (run_dir / "train.log").read_text()
    if processes > 1:
        launch = [e for e in evs if e["type"] == "status" and e.get("num_processes") == processes]
        assert launch and "accelerate" in launch[0]["message"]
        for rank in range(processes):
            assert f"rank {rank} of {processes}: training started" in log and f"rank {rank} of {processes}: training finished" in log
    print(f"[gpu]   {preset}, {adapter or 'full'}, {processes} process(es):")
    assert_loss_falls(result)
    assert result["metrics"]["peak_memory_reserved"] > 0
    output = Path(result["output_dir"])
    weights = "adapter_model*.safetensors" if adapter else "model*.safetensors"
    assert list(output.glob(weights)), sorted(p.name for p in output.iterdir())


# 4. The memory estimate against the real peak ---------------------------------------------


@pytest.fixture(scope="module")
def llama_1b_shape(tiny, volume) -> Path:
    """A model of Llama-3.2-1B's shape with random bf16 weights (2.5 GB), built here; the
    tiny tokenizer's ids are all inside its vocabulary."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    model_dir = volume / "models" / "random-llama-3.2-1b"
    if (model_dir / "config.json").is_file():
        return model_dir
    tokenizer = AutoTokenizer.from_pretrained(tiny / "tiny-llama")
    config = LlamaConfig(
        **LLAMA_3_2_1B_SHAPE, rms_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return model_dir


MEMORY_MODES = {
    "lora": {"adapter": "lora", "lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "lora_target_linear": True, "learning_rate": 2e-4},
    "qlora": {"adapter": "qlora", "load_in_4bit": True, "lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "lora_target_linear": True,
              "learning_rate": 2e-4},
    "full": {"learning_rate": 2e-5},
}


@pytest.mark.parametrize("mode", list(MEMORY_MODES))
def test_memory_estimate_is_close_to_the_real_peak_on_a_1b_model(tiny, env, hardware, llama_1b_shape, mode):
    """The estimate the worker reports before training (and refuses jobs by) against
    torch.cuda.max_memory_reserved() in the training child (the result's
    peak_memory_reserved). Every row is padded to sequence_len, as the estimate assumes."""
    args = {
        "base_model": str(llama_1b_shape),
        "datasets": [{"path": str(tiny / "tiny_alpaca.jsonl"), "type": "alpaca", "ds_type": "json"}],
        "sequence_len": 1024, "pad_to_sequence_len": True, "micro_batch_size": 1, "num_epochs": 1, "max_steps": 6,
        "logging_steps": 1, "val_set_size": 0, "save_total_limit": 1, **MEMORY_MODES[mode],
    }
    job = make_job(args, num_processes=1)  # one GPU, whatever the machine has: the figures are per GPU
    evs, result, run_dir = train(job, env, hardware)
    reported = next(e for e in evs if e["type"] == "status" and "memory_estimate_bytes" in e)
    config = written_config(run_dir)
    model_config = json.loads((llama_1b_shape / "config.json").read_text())
    estimate = estimate_gpu_memory(config, model_config, 1)
    assert reported["memory_estimate_bytes"] == estimate.total  # what the user saw is what the function says
    actual = result["metrics"]["peak_memory_reserved"]
    ratio = actual / estimate.total
    print(f"[gpu]   {mode}: estimate {estimate.describe()}; max_memory_reserved {actual / GIB:.2f} GiB; "
          f"actual/estimate {ratio:.2f} (fast defaults: {fast_defaults(evs)})")
    assert MEMORY_BAND[0] <= ratio <= MEMORY_BAND[1], (mode, actual, estimate.parts)


# 5. The throughput benchmark ----------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        pytest.param(["--shape", "tiny", "--rows", "64", "--modes", "lora,full"], id="tiny"),
        pytest.param(["--shape", "llama-3.2-1b", "--rows", "256", "--modes", "lora", "--sequence-len", "512"], id="llama-3.2-1b-lora"),
    ],
)
def test_throughput_bench_prints_figures_with_the_fast_defaults(hardware, argv):
    """bench/throughput.py as a user runs it: the worker (fast defaults) against Axolotl's
    own defaults on the same tokens; tokens/s, MFU where the GPU's peak is known."""
    # one GPU: the worker would start a process per GPU, the plain `axolotl train` side only one
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]}
    done = subprocess.run([sys.executable, "bench/throughput.py", *argv], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=3600)
    print(done.stdout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(done.stdout[done.stdout.index("{\n"):])
    assert report["device"] != "CPU" and report["tokens_per_epoch"] > 0
    for mode, figures in report["modes"].items():
        assert f"bf16: {hardware.bf16}" in figures["worker_defaults"], (mode, figures["worker_defaults"])
        for side in ("worker", "axolotl"):
            assert figures[side]["tokens_per_s"] > 0 and 0 < figures[side]["final_loss"] < 20, (mode, side, figures[side])
            if report["peak_bf16_flops"] and report["shape"] != "tiny":  # the tiny model's MFU rounds to 0
                assert 0 < figures[side]["mfu"] < 1, (mode, side, figures[side])
        assert figures["speedup"] > 0
        assert f"  {mode}: worker " in done.stdout


# 6. GGUF export with llama-quantize ---------------------------------------------------------


def test_a_lora_run_exports_quantised_gguf_files_where_llama_quantize_is(tiny_sentencepiece, env, hardware):
    """`export:` with `quantize` on the GPU image, which builds llama-quantize (/opt/llama.cpp):
    the LoRA merged into its base model, converted to f16, then quantised to Q4_K_M."""
    from axolotl.utils.gguf import resolve_quantize_bin

    from finetune_worker.contract.settings import WorkerSettings

    try:
        resolve_quantize_bin(WorkerSettings.from_env(env).llama_cpp_dir)
    except ValueError:
        pytest.skip("no llama-quantize here: the image has it in /opt/llama.cpp (FINETUNE_LLAMA_CPP_DIR)")
    job = make_job(tiny_args(tiny_sentencepiece, max_steps=10, export={"quantize": ["Q4_K_M"]}))
    evs, result, run_dir = train(job, env, hardware)
    output = Path(result["output_dir"])
    assert result["gguf"] == [str(output / "gguf" / "tiny-f16.gguf"), str(output / "gguf" / "tiny-Q4_K_M.gguf")]
    sizes = [Path(file).stat().st_size for file in result["gguf"]]
    print(f"[gpu]   GGUF files: {dict(zip(result['gguf'], sizes, strict=True))}")
    assert 0 < sizes[1] < sizes[0]



def _cluster_node_env(rank: int, volume: Path, assets: Path, port: int, gpu: int) -> dict:
    env = {key: value for key, value in os.environ.items() if not key.startswith(("HF_TOKEN", "WANDB"))}
    env.update(BASE_VOLUME=str(volume), FINETUNE_EXAMPLES_DIR=str(assets), HF_HUB_OFFLINE="1", NNODES="2", NODE_RANK=str(rank),
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), NPROC_PER_NODE="1", CUDA_VISIBLE_DEVICES=str(gpu),
               NCCL_SOCKET_IFNAME="lo", GLOO_SOCKET_IFNAME="lo", FINETUNE_SHARED_VOLUME="1", FINETUNE_CLUSTER_TIMEOUT="60")
    return env


@pytest.mark.parametrize("sharding", [
    pytest.param({}, id="ddp-nccl"),
    pytest.param({"fsdp_config": "full_shard"}, id="fsdp2-full-state-dict"),
    pytest.param({"deepspeed": "zero2"}, id="deepspeed-zero2"),
])
def test_two_nodes_on_one_machine_train_over_nccl(tiny, tmp_path, hardware, sharding):
    """Two nodes as two torchruns, one GPU each, NCCL over loopback, one shared volume: the
    cluster path (rendezvous, agreement, DDP / FSDP2 / ZeRO-2 across nodes) on GPUs. On a real
    cluster run the same job with `finetune-worker cluster job.json --json` on every node
    (RunPod Instant Clusters, dstack, SkyPilot: docs/operating.md, Clusters)."""
    if gpu_count() < 2:
        pytest.skip("needs 2 GPUs (one per simulated node)")
    if "deepspeed" in sharding and not installed("deepspeed"):
        pytest.skip("deepspeed is not installed")
    from finetune_worker.host.tools import free_port

    volume, port = tmp_path / "shared", free_port()
    job = make_job(tiny_args(tiny, num_epochs=2, save_steps=2, **sharding))
    job_file = tmp_path / "job.json"
    job_file.write_text(json.dumps(job))
    nodes = [subprocess.Popen([sys.executable, "-m", "finetune_worker.entry.cli", "cluster", str(job_file), "--json"],
                              env=_cluster_node_env(rank, volume, tiny, port, rank), stdout=subprocess.PIPE, text=True)
             for rank in (0, 1)]
    outputs = [node.communicate(timeout=1200)[0] for node in nodes]
    finals = [json.loads([line for line in out.splitlines() if line.startswith("{")][-1]) for out in outputs]
    print(f"\n[gpu] two nodes, {sharding or 'ddp'}: {finals[0].get('metrics')}")
    assert finals[0]["type"] == "result" and finals[0]["cluster"]["world_size"] == 2, finals[0]
    assert finals[1]["type"] == "result" and finals[1]["node_rank"] == 1, finals[1]
