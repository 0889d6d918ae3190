"""The time and cost estimate against arithmetic done by hand (sizing/throughput.py, sizing/estimate.py).

Pure: no model, no data, no child. The model is Llama-3-8B's config.json shape:

    linear per layer = q 4096x4096 + k 4096x1024 + v 4096x1024 + o 4096x4096 + 3 x 4096x14336 = 218,103,808
    N_mm   = 32 x 218,103,808 + LM head 128,256 x 4,096                                   = 7,504,658,432
    N_lora (r16, all linear) = 16 x 32 x [2 (4096+4096) + 2 (4096+1024) + 2 (4096+14336) + (14336+4096)] = 41,943,040
    A      (every sample 500 tokens, so l_tok = 500) = 6 x 32 x 4096 x 500                = 393,216,000
    F_lora = 4 N_mm + 6 N_lora + A                                                        = 30,663,507,968
    R (GC) = 2 N_mm + A / 3                                                               = 15,140,388,864

Data: 10,000 rows of 500 tokens (5,000,000), packed by Axolotl into 2,500 bins of 2,048.
Config: LoRA r16, micro batch 2, accumulation 4, 2 epochs, packing.

    steps on 1 GPU   = ceil(2 x ceil(2500 / 8)) = 626; processed = 626 x 8 x 2048 = 10,256,384 tokens
    1 x H100 SXM     = 10,256,384 x F_lora / (989e12 x 0.30) = 1,059.98 s
    with GC          = 10,256,384 x (F_lora + R) / (989e12 x 0.30) = 1,583.36 s

Evaluation: an eval split of 500 rows of 500 tokens, packed into 125 bins, eval_steps 100.

    passes           = 1 (step 0) + 626 // 100 = 7; each ceil(125 / 2) x 2 x 2048 = 258,048 tokens
    forward          = 2 N_mm + A / 3 = 15,140,388,864 per token
    during training  = 7 x 258,048 x 15,140,388,864 / (989e12 x 0.30) = 92.18 s
    job's evaluation = load 16e9 / 300e6 + 15 = 68.33 s, then 2 models x ceil(20 / 8) x 64 steps
                       of 2 N_mm / (0.5 x 3,350e9) + 32 x 0.6 ms = 0.02816 s: 68.33 + 10.81 = 79.15 s
"""

from __future__ import annotations

import pytest

from finetune_worker.sizing.estimate import Request, estimate_table
from finetune_worker.sizing.gpus import BY_NAME, GPUS, gpu_for, prices
from finetune_worker.sizing.memory import params_from_config
from finetune_worker.sizing.throughput import (
    Evaluation,
    Fixed,
    Lengths,
    Rates,
    dequantisation_seconds,
    evaluations,
    fixed_phases,
    flops_per_token,
    model_shape,
    padded_length,
    schedule,
)
from finetune_worker.sizing.throughput_sources import MODELS

LLAMA_8B = {**MODELS["Llama-3-8B"], "model_type": "llama"}
LLAMA_70B = {**MODELS["Llama-3-70B"], "model_type": "llama"}
MIXTRAL = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
               vocab_size=32000, num_local_experts=8, num_experts_per_tok=2, model_type="mixtral")
LENGTHS = Lengths(rows=10_000, tokens=5_000_000, sum_squares=10_000 * 500**2, histogram=(0,) * 7 + (10_000,), packed_bins=2_500)
LORA = {"adapter": "lora", "lora_r": 16, "lora_target_linear": True, "micro_batch_size": 2, "gradient_accumulation_steps": 4,
        "num_epochs": 2, "sequence_len": 2048, "sample_packing": True, "bf16": True, "attn_implementation": "flash_attention_2"}
H100, A100_PCIE, A100_SXM = BY_NAME["NVIDIA H100 80GB HBM3"], BY_NAME["NVIDIA A100 80GB PCIe"], BY_NAME["NVIDIA A100-SXM4-80GB"]


def table(config: dict, model_config: dict = LLAMA_8B, gpus=(H100,), counts=(1,), lengths: Lengths = LENGTHS, **kwargs) -> dict:
    overrides = kwargs.pop("overrides", None) or {}
    return estimate_table(Request(config, model_config, lengths, gpus=tuple(gpus), prices=prices(overrides),
                                  price_overrides=overrides, counts=counts, **kwargs))


def test_the_model_shape_and_flops_per_token_match_the_hand_count():
    shape = model_shape(LLAMA_8B)
    assert shape.matmul_params == 7_504_658_432 and shape.active_params == shape.matmul_params
    work = flops_per_token(shape, "lora", 41_943_040, 500.0, checkpointing=False)
    assert work.model == work.hardware == 30_663_507_968
    with_gc = flops_per_token(shape, "lora", 41_943_040, 500.0, checkpointing=True)
    assert with_gc.model == 30_663_507_968 and with_gc.hardware == 30_663_507_968 + 15_140_388_864
    full = flops_per_token(shape, "full", 0, 500.0, checkpointing=False)
    assert full.model == 6 * 7_504_658_432 + 393_216_000
    dpo = flops_per_token(shape, "lora", 41_943_040, 500.0, checkpointing=False, reference_forward=True)
    assert dpo.model == 30_663_507_968 + 2 * 7_504_658_432


def test_a_lora_run_on_one_h100_takes_the_hand_computed_time_and_cost():
    row = table({**LORA, "gradient_checkpointing": False})["rows"][0]
    assert row["fits"] and row["steps"] == 626 and row["processed_tokens"] == 10_256_384
    assert row["train_seconds"] == pytest.approx(1059.98, abs=0.05)
    assert row["gradient_checkpointing"] is False
    # fixed phases with nothing to download, save or push: loading 0 bytes (15 s)
    assert row["total_seconds"] == pytest.approx(1059.98 + 15, abs=0.1)
    assert row["cost_usd"] == pytest.approx(round((1059.98 + 15) * 4.176 / 3600, 2), abs=0.01)


def test_gradient_checkpointing_adds_one_forward_of_work():
    row = table({**LORA, "gradient_checkpointing": True})["rows"][0]
    assert row["train_seconds"] == pytest.approx(1583.36, abs=0.05)


def test_more_gpus_scale_by_the_link_nvlink_better_than_pcie_and_fsdp_over_pcie_worse():
    """Full fine-tune of the 8B with FSDP on 8 x A100: same work, same peak, same HFU (ampere full 0.40);
    only the scaling differs: SXM (NVLink) 0.95, PCIe 0.85 x 0.9 for sharded weights."""
    config = {**LORA, "adapter": None, "fsdp_config": {"fsdp_version": 2, "offload_params": False}, "gradient_checkpointing": True}
    rows = {row["gpu"]: row for row in table(config, LLAMA_8B, gpus=(A100_PCIE, A100_SXM), counts=(8,))["rows"]}
    sxm, pcie = rows[A100_SXM.name], rows[A100_PCIE.name]
    assert sxm["fits"] and pcie["fits"] and sxm["steps"] == pcie["steps"]
    assert pcie["train_seconds"] / sxm["train_seconds"] == pytest.approx(0.95 / (0.85 * 0.9), rel=1e-3)
    ddp = table({**config, "fsdp_config": None}, LLAMA_8B, gpus=(A100_PCIE,), counts=(8,))["rows"][0]
    assert pcie["train_seconds"] / ddp["train_seconds"] == pytest.approx(1 / 0.9, rel=1e-3)  # unsharded: PCIe 0.85 only


def test_qlora_adds_the_dequantisation_time_bound_by_memory_bandwidth():
    """100 micro-batches x 3 passes (GC) x 2.56 bytes x 6,979,321,856 linear weights / (0.7 x 1008 GB/s) = 7.597 s."""
    shape = model_shape(LLAMA_8B)
    assert dequantisation_seconds(shape, BY_NAME["NVIDIA GeForce RTX 4090"], 100, checkpointing=True) == pytest.approx(
        100 * 3 * 2.56 * 6_979_321_856 / (0.7 * 1008e9), rel=1e-9)
    assert 100 * 3 * 2.56 * 6_979_321_856 / (0.7 * 1008e9) == pytest.approx(7.597, abs=0.001)
    lora = table({**LORA, "gradient_checkpointing": True})["rows"][0]
    qlora = table({**LORA, "adapter": "qlora", "load_in_4bit": True, "gradient_checkpointing": True})["rows"][0]
    dequant = dequantisation_seconds(shape, H100, 626 * 4, checkpointing=True)
    assert qlora["train_seconds"] == pytest.approx(lora["train_seconds"] + dequant, abs=0.1)
    assert qlora["memory_gib"] < lora["memory_gib"]


def test_a_mixture_of_experts_is_costed_on_its_active_parameters_and_sized_on_all_of_them():
    """Mixtral 8x7B: attention 4096 x (4096 + 1024 + 1024 + 4096) = 41,943,040, router 4096 x 8, an expert 3 x 4096 x 14336
    = 176,160,768, per layer; 32 layers; LM head 32000 x 4096 = 131,072,000.
    all    = 32 x (41,943,040 + 32,768 + 8 x 176,160,768) + 131,072,000 = 46,571,454,464 (published: 46.7 B with embeddings)
    active = 32 x (41,943,040 + 32,768 + 2 x 176,160,768) + 131,072,000 = 12,748,587,008 (published: 12.9 B)"""
    shape = model_shape(MIXTRAL)
    assert shape.moe and shape.matmul_params == 46_571_454_464 and shape.active_params == 12_748_587_008
    assert params_from_config(MIXTRAL) == 46_571_454_464 + 32_000 * 4096 + 32 * 2 * 4096 + 4096  # + embeddings and norms
    dense_8b_like = flops_per_token(shape, "full", 0, 500.0, checkpointing=False)
    assert dense_8b_like.model == 6 * 12_748_587_008 + 393_216_000


def test_max_steps_on_more_gpus_processes_more_tokens_in_the_same_time():
    config = {**LORA, "max_steps": 100, "gradient_checkpointing": False}
    one, four = table(config, counts=(1, 4))["rows"]
    assert one["steps"] == four["steps"] == 100
    assert four["processed_tokens"] == 4 * one["processed_tokens"] == 4 * 100 * 8 * 2048
    assert four["train_seconds"] == pytest.approx(one["train_seconds"] / 0.95, rel=1e-3)  # NVLink scaling, no speed-up


def test_unpacked_batches_are_padded_to_their_longest_row_rounded_to_64():
    """Four rows: two in (0, 64], one in (64, 128], one in (128, 192]. Batches of 2 rows, shuffled:
    F = 1/2, 3/4, 1; F^2 = 1/4, 9/16, 1; E = 64 x 1/4 + 128 x (9/16 - 1/4) + 192 x (1 - 9/16) = 140."""
    assert padded_length((2, 1, 1), micro_batch=2, cap=2048) == pytest.approx(140.0)
    assert padded_length((2, 1, 1), micro_batch=1, cap=2048) == pytest.approx(64 * 0.5 + 128 * 0.25 + 192 * 0.25)
    assert padded_length((2, 1, 1), micro_batch=2, cap=128) == pytest.approx(64 * 0.25 + 128 * 0.75)
    plan = schedule(Lengths(rows=4, tokens=300, sum_squares=30_000, histogram=(2, 1, 1)),
                    {"micro_batch_size": 2, "num_epochs": 3, "sequence_len": 2048}, 1)
    assert plan.steps == 6 and plan.processed_tokens == 6 * 2 * 140 and plan.train_tokens == 900


def test_a_config_that_fits_no_gpu_is_still_answered_with_every_row_refused():
    config = {**LORA, "adapter": None, "micro_batch_size": 1}
    found = table(config, LLAMA_70B, gpus=GPUS, counts=(1,))
    assert found["rows"] and all(row["fits"] is False for row in found["rows"])
    assert all(row["train_seconds"] is None and row["cost_usd"] is None and "GiB" in row["reason"] for row in found["rows"])
    assert found["cheapest"] is None and found["fastest"] is None and "no GPU" in found["reason"]


def test_a_type_without_a_price_has_no_cost_and_never_wins_cheapest():
    rtx5090, rtx4090 = BY_NAME["NVIDIA GeForce RTX 5090"], BY_NAME["NVIDIA GeForce RTX 4090"]
    found = table({**LORA, "lora_r": 8}, gpus=(rtx5090, rtx4090))
    by_gpu = {row["gpu"]: row for row in found["rows"]}
    assert by_gpu[rtx5090.name]["cost_usd"] is None and by_gpu[rtx5090.name]["train_seconds"] is not None
    assert found["cheapest"]["gpu"] == rtx4090.name and found["fastest"]["gpu"] == rtx5090.name
    priced = table({**LORA, "lora_r": 8}, gpus=(rtx5090, rtx4090), overrides={rtx5090.name: 0.5})
    assert priced["cheapest"]["gpu"] == rtx5090.name
    assert any("FINETUNE_GPU_PRICES for NVIDIA GeForce RTX 5090" in source for source in priced["sources"])


def test_the_fixed_phases_come_from_the_sizes():
    """16 GB of weights to download at 150 MB/s, load at 300 MB/s + 15 s, 3 saves of 0.5 GB, a 0.2 GB push at 50 MB/s."""
    fixed = Fixed(weight_bytes=16_000_000_000, needs_download=True, checkpoint_bytes=500_000_000, saves=3, push_bytes=200_000_000,
                  merge=True, tokenize_seconds=12.0, params=8_000_000_000)
    phases = fixed_phases(fixed, "qlora", Rates())
    assert phases == {"download": pytest.approx(106.7), "load": pytest.approx(53.3 + 15 + 4.0, abs=0.1), "tokenize": 12.0,
                      "save": 5.0, "merge": pytest.approx(106.7 + 10, abs=0.1), "push": 4.0}


@pytest.mark.parametrize(("settings", "passes"), [
    ({}, 0),  # no eval_steps, evals_per_epoch or eval_strategy: the Trainer never evaluates
    ({"eval_steps": 50}, 13),  # step 0, then 626 // 50
    ({"eval_steps": 50, "eval_on_start": False}, 12),
    ({"eval_steps": 0.25}, 4),  # every ceil(0.25 x 626) = 157 steps
    ({"evals_per_epoch": 4}, 8),  # Axolotl: eval_steps = 1 / (4 x 2 epochs); every ceil(626 / 8) = 79 steps
    ({"eval_strategy": "epoch"}, 3),
    ({"eval_strategy": "steps", "logging_steps": 100}, 7),  # Transformers falls back on logging_steps
    ({"eval_strategy": "no", "eval_steps": 50}, 0),
])
def test_the_evaluations_during_training_follow_axolotls_settings(settings, passes):
    assert evaluations({**LORA, **settings}, 626, 2.0) == passes


EVAL_LENGTHS = Lengths(rows=500, tokens=250_000, sum_squares=500 * 500**2, histogram=(0,) * 7 + (500,), packed_bins=125)


def test_the_evaluate_phase_counts_the_eval_passes_and_the_comparison_by_hand():
    fixed = Fixed(weight_bytes=16_000_000_000)
    during = Evaluation(lengths=EVAL_LENGTHS)
    both = Evaluation(lengths=EVAL_LENGTHS, examples=20, new_tokens=64)
    config = {**LORA, "eval_steps": 100}
    rows = [table(config, fixed=fixed, evaluation=evaluation)["rows"][0] for evaluation in (Evaluation(), during, both)]
    assert [row["phases_seconds"]["evaluate"] for row in rows] == [0.0, pytest.approx(92.2, abs=0.05), pytest.approx(171.3, abs=0.05)]
    assert rows[2]["total_seconds"] == pytest.approx(rows[0]["total_seconds"] + 171.3, abs=0.1)
    assert rows[2]["train_seconds"] == rows[0]["train_seconds"]  # the training's own pace is unchanged
    full = table({**config, "adapter": None}, fixed=fixed, evaluation=Evaluation(examples=20, new_tokens=64, full_model=True))
    assert full["rows"][0]["phases_seconds"]["evaluate"] == pytest.approx(2 * 68.33 + 10.81, abs=0.05)  # its own weights load too


def test_the_table_marks_rows_by_type_and_count_and_names_its_sources():
    found = table(LORA, gpus=GPUS, counts=(1, 2, 4, 8))
    assert len(found["rows"]) == len(GPUS) * 4
    assert found["train_tokens"] == 10_000_000 and found["epochs"] == 2.0
    assert found["cheapest"]["cost_usd"] == min(row["cost_usd"] for row in found["rows"] if row["cost_usd"] is not None)
    assert found["fastest"]["total_seconds"] == min(row["total_seconds"] for row in found["rows"] if row["total_seconds"] is not None)
    assert any(source.startswith("prices: RunPod serverless") and "read 2026-12-02" in source for source in found["sources"])
    assert any("median of nemo-lora70, aai-70b-h100" in source for source in found["sources"])
    not_offered = [row for row in found["rows"] if row["gpu"] == "NVIDIA A100-SXM4-40GB"]
    assert not_offered and all(row["note"] == "not offered by RunPod" for row in not_offered)


def test_a_running_worker_finds_its_own_gpu_by_torch_name():
    assert gpu_for("NVIDIA H100 80GB HBM3") is H100
    assert gpu_for("nvidia h100 80gb hbm3") is H100
    assert gpu_for("NVIDIA RTX 2000 Ada") is None and gpu_for(None) is None


def test_the_cli_prints_the_table_with_the_cheapest_and_the_fastest(tmp_path):
    import io
    import json

    from finetune_worker.entry.cli import HumanPrinter, build_parser
    from finetune_worker.entry.client import estimate_job

    found = table(LORA, gpus=(H100, BY_NAME["NVIDIA GeForce RTX 4090"]), counts=(1, 8))
    found["rows"].append({"gpu": "NVIDIA A100-SXM4-40GB", "count": 1, "fits": False, "memory_gib": 93.0, "train_seconds": None,
                          "total_seconds": None, "cost_usd": None, "reason": "needs about 93.0 GiB per GPU"})
    out = io.StringIO()
    HumanPrinter(out)({"type": "result", "mode": "estimate", "run_id": "r", "output_dir": "/x", "metrics": {}, "duration_seconds": 9.0,
                       "estimate": found})
    text = out.getvalue()
    assert "estimate: 10,000,000 training tokens (2 epochs), lora on a 7.50 B model" in text
    h100 = next(line for line in text.splitlines() if line.startswith("NVIDIA H100 80GB HBM3") and line.split()[4] == "1")
    assert "yes" in h100 and "18m" in h100 and f"${found['rows'][0]['cost_usd']:.2f}" in h100
    assert "no" in next(line for line in text.splitlines() if line.startswith("NVIDIA A100-SXM4-40GB")) and "needs about 93.0 GiB" in text
    cheapest = found["cheapest"]
    assert f"cheapest: {cheapest['gpu']} x{cheapest['count']} ${cheapest['cost_usd']:.2f}" in text
    assert "fastest: NVIDIA H100 80GB HBM3 x8" in text and "prices: RunPod serverless" in text and "estimate completed in 9.0s" in text

    refused = io.StringIO()
    HumanPrinter(refused)({"type": "error", "code": "budget_exceeded", "message": "over max_cost", "details": [], "log_tail": [],
                           "estimate": found})
    assert "cheapest:" in refused.getvalue() and "error [budget_exceeded]: over max_cost" in refused.getvalue()

    config = tmp_path / "lora.yaml"
    config.write_text("base_model: x\nadapter: lora\n")
    job = estimate_job(config, user_id=None, model_id=None, run_id="r1", credentials={})
    assert job["mode"] == "estimate" and job["args"] == {"base_model": "x", "adapter": "lora"} and job["run_id"] == "r1"
    assert json.dumps(job)
    parsed = build_parser().parse_args(["estimate", str(config), "--json"])
    assert parsed.endpoint is None and parsed.func.__name__ == "cmd_estimate"


def test_the_endpoints_own_measurements_replace_the_tables_utilisation_and_say_so(tmp_path):
    """Three earlier LoRA runs of a Llama on one H100 reached 0.15 of its peak (hardware FLOPs):
    the next estimate for that family, method and type uses it and halves the table's pace (0.30)."""
    from finetune_worker.host.hardware import Hardware
    from finetune_worker.sizing.measured import learned, record, training_measured, utilisation

    before = table({**LORA, "gradient_checkpointing": False})["rows"][0]
    store = tmp_path / "measurements.jsonl"
    one_h100 = Hardware(gpu_count=1, gpu_names=(H100.name,), gpu_memory_bytes=(80 * 2**30,), bf16=True, compute_capability=(9, 0))
    config = {**LORA, "gradient_checkpointing": False}
    speed = 0.15 * 1e6 / utilisation(1e6, config, LLAMA_8B, H100, 1)[1]  # tokens per second for an HFU of 0.15
    for _ in range(3):
        measured = training_measured({"train_tokens_per_second": speed, "train_runtime": 100.0}, {"train": 100.0}, config, LLAMA_8B, one_h100, 1)
        assert measured["hardware_utilisation"] == pytest.approx(0.15, abs=1e-4)
        assert record(store, measured, config, LLAMA_8B)
    store.write_text(store.read_text() + '{"torn', encoding="utf-8")  # a worker died while writing: skipped
    found = learned(store, "llama", "lora")
    assert list(found) == [H100.name] and found[H100.name].hardware_utilisation == pytest.approx(0.15, abs=1e-4)
    assert found[H100.name].runs == 3 and found[H100.name].memory_ratio is None  # no peak memory in these records
    assert learned(store, "mistral", "lora") == {} and learned(store, "llama", "full") == {}
    after = table(config, learned=found)
    row = after["rows"][0]
    assert row["from"] == "3 earlier runs on H100 SXM" and row["utilisation"] == pytest.approx(0.15, abs=1e-4)
    assert row["train_seconds"] == pytest.approx(before["train_seconds"] * 0.30 / 0.15, rel=0.01)
    assert row["memory_gib"] == before["memory_gib"] and "memory_from" not in row
    assert any("measured by this endpoint on 3 earlier run(s)" in source for source in after["sources"])


def test_the_endpoints_measured_peak_memory_scales_the_next_memory_estimate(tmp_path):
    """Two earlier LoRA runs of a Llama on one H100 peaked at 1.5x and 1.7x the memory estimate
    for the configs they ran (the median: 1.6): the next estimate's memory is 1.6x the formula's,
    so a config that fitted on paper no longer does; a nonsense ratio (a record of 50x) is ignored."""
    from finetune_worker.host.hardware import Hardware
    from finetune_worker.sizing.measured import learned, memory_ratio, record, training_measured
    from finetune_worker.sizing.memory import estimate_gpu_memory

    config = {**LORA, "gradient_checkpointing": False}
    one_h100 = Hardware(gpu_count=1, gpu_names=(H100.name,), gpu_memory_bytes=(80 * 2**30,), bf16=True, compute_capability=(9, 0))
    estimated = estimate_gpu_memory(config, LLAMA_8B, 1).total
    store = tmp_path / "measurements.jsonl"
    for ratio in (1.5, 1.7, 50.0):
        metrics = {"train_tokens_per_second": 2000.0, "train_runtime": 100.0, "peak_memory_reserved": int(estimated * ratio)}
        measured = training_measured(metrics, {"train": 100.0}, config, LLAMA_8B, one_h100, 1)
        assert memory_ratio(measured, config, LLAMA_8B) == pytest.approx(ratio, abs=1e-3)
        assert record(store, measured, config, LLAMA_8B)
    found = learned(store, "llama", "lora")[H100.name]
    assert (found.memory_ratio, found.memory_runs, found.runs) == (pytest.approx(1.6, abs=1e-3), 2, 3)
    before = table(config)["rows"][0]
    after = table(config, learned={H100.name: found})
    row = after["rows"][0]
    assert row["memory_gib"] == pytest.approx(before["memory_gib"] * 1.6, abs=0.1) and row["memory_from"] == "2 earlier runs on H100 SXM"
    assert any("memory on H100 SXM: the estimate x 1.600" in source for source in after["sources"])
    tight = {**config, "micro_batch_size": 4}  # 56 GiB by the formula fits an H100; at 1.6x (89 GiB) it does not
    assert table(tight)["rows"][0]["fits"] and not table(tight, learned={H100.name: found})["rows"][0]["fits"]


def test_a_cpu_run_measures_no_gpu_figures_and_records_nothing(tmp_path):
    from finetune_worker.host.hardware import CPU_ONLY
    from finetune_worker.sizing.measured import record, training_measured

    measured = training_measured({"train_tokens_per_second": 900.0, "num_input_tokens_seen": 9000, "train_runtime": 10.0},
                                 {"tokenize": 1.0, "train": 10.0}, LORA, LLAMA_8B, CPU_ONLY, 1)
    assert measured == {"tokens_per_second": 900.0, "tokens": 9000, "train_seconds": 10.0, "phases_seconds": {"tokenize": 1.0, "train": 10.0}}
    assert not record(tmp_path / "m.jsonl", measured, LORA, LLAMA_8B) and not (tmp_path / "m.jsonl").exists()
