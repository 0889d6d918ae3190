"""The memory estimate against published peak-memory measurements (tests/memory_calibration.json).

Pure: no model is loaded. The README's table of these runs is rendered from the same data;
`PYTHONPATH=src .venv/bin/python tests/test_memory_calibration.py` prints it (`--write`
puts it into the README), and a test fails when the README's copy has drifted.
"""

from __future__ import annotations

import importlib.util
import json
import statistics
import sys
from pathlib import Path

import pytest

from finetune_worker.sizing.memory import CLEARLY_OVER, GIB, estimate_gpu_memory

ROOT = Path(__file__).resolve().parent.parent
TABLE_DOC = ROOT / "docs" / "operating.md"  # the doc that holds the rendered table
DATA = json.loads((Path(__file__).resolve().parent / "memory_calibration.json").read_text(encoding="utf-8"))
UNITS = {"GB": 1e9, "GiB": 2**30, "MiB": 2**20}
LOW, HIGH = 0.75, 1.33
BEGIN, END = "<!-- memory-calibration-table: begin -->", "<!-- memory-calibration-table: end -->"


def estimate(run: dict) -> int:
    return estimate_gpu_memory(run["config"], DATA["models"][run["model"]], run["num_gpus"]).total


def published_bytes(run: dict) -> float:
    return run["published"] * UNITS[run["unit"]]


def ratio(run: dict) -> float:
    return estimate(run) / published_bytes(run)


HELD = [run for run in DATA["runs"] if "outside_bounds" not in run]


def _setup(run: dict) -> str:
    c = run["config"]
    method = run["method"] if run["method"] == "full" else f"{run['method']} r{c['lora_r']} " + (
        "all-linear" if c.get("lora_target_linear") else "+".join(name.removesuffix("_proj") for name in c["lora_target_modules"]))
    bits = [method, f"mb {c['micro_batch_size']} x {c['sequence_len']}"]
    if c.get("gradient_checkpointing"):
        bits.append("GC")
    if c.get("liger_fused_linear_cross_entropy"):
        bits.append("Liger FLCE")
    if c.get("deepspeed"):
        bits.append(f"ZeRO-{c['deepspeed']['zero_optimization']['stage']}")
    if c.get("fsdp_config"):
        bits.append("FSDP" + (" + CPU offload" if c["fsdp_config"].get("offload_params") else ""))
    return ", ".join(bits)


def render_table() -> str:
    rows = ["| Run | Model | Setup | GPUs | Published peak | Estimate | Ratio | Source |", "|---|---|---|---|---|---|---|---|"]
    for run in DATA["runs"]:
        mark = " *" if "outside_bounds" in run else ""
        rows.append(
            f"| {run['id']} | {run['model']} | {_setup(run)} | {run['gpu']} | {run['published']:g} {run['unit']} "
            f"({published_bytes(run) / GIB:.1f} GiB) | {estimate(run) / GIB:.1f} GiB | {ratio(run):.2f}{mark} | [link]({run['source']}) |")
    held = [ratio(run) for run in HELD]
    every = [ratio(run) for run in DATA["runs"]]
    rows.append("")
    rows.append(f"{len(DATA['runs'])} runs; ratio (estimate / published) over the {len(held)} held to the bounds: "
                f"min {min(held):.2f}, median {statistics.median(held):.2f}, max {max(held):.2f}; "
                f"over all: min {min(every):.2f}, median {statistics.median(every):.2f}, max {max(every):.2f}. "
                "\\* kept but outside the bounds, for the reason given in `tests/memory_calibration.json` (`outside_bounds`).")
    return "\n".join(rows)


def readme_section(text: str) -> str:
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    return text[start:end].strip()


@pytest.mark.parametrize("run", HELD, ids=[run["id"] for run in HELD])
def test_estimate_is_within_its_published_peak(run):
    assert LOW <= ratio(run) <= HIGH, f"{run['id']}: estimate {estimate(run) / GIB:.1f} GiB, published {published_bytes(run) / GIB:.1f} GiB"


def test_the_median_ratio_is_close_to_one():
    assert 0.9 <= statistics.median(ratio(run) for run in HELD) <= 1.1


@pytest.mark.parametrize("run", DATA["runs"], ids=[run["id"] for run in DATA["runs"]])
def test_no_published_run_is_refused_as_clearly_over(run):
    if run["gpu_memory_gib"] is None:  # the GPU's size is not stated; it held the published peak
        capacity = published_bytes(run)
    else:
        capacity = run["gpu_memory_gib"] * GIB
    assert estimate(run) <= capacity * CLEARLY_OVER


def test_every_run_names_its_source_and_model():
    for run in DATA["runs"]:
        assert run["source"].startswith("https://") and run["model"] in DATA["models"] and run["unit"] in UNITS
    assert len(DATA["runs"]) >= 20 and len({run["id"] for run in DATA["runs"]}) == len(DATA["runs"])


def test_the_readme_table_matches_the_data():
    readme = TABLE_DOC.read_text(encoding="utf-8")
    assert readme_section(readme) == render_table(), "run: PYTHONPATH=src .venv/bin/python tests/test_memory_calibration.py --write"


if __name__ == "__main__":
    table = render_table()
    if "--write" in sys.argv:
        path = TABLE_DOC
        text = path.read_text(encoding="utf-8")
        start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
        path.write_text(text[:start] + "\n" + table + "\n" + text[end:], encoding="utf-8")
    print(table)


@pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is None, reason="liger-kernel is not installed")
def test_gradient_checkpointing_is_decided_with_the_fused_cross_entropy_the_fast_defaults_add():
    """The fast defaults turn Liger's fused cross-entropy on before the memory check, so
    the headroom that decides gradient checkpointing must count it (logits nearly zero)."""
    from finetune_worker.host.hardware import Hardware
    from finetune_worker.sizing.capacity import FITS_FRACTION, speedups

    llama8b = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
               "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": False}
    config = {"base_model": "x", "adapter": "lora", "lora_r": 16, "lora_target_linear": True, "bf16": True,
              "micro_batch_size": 2, "sequence_len": 2048, "plugins": []}
    plain = estimate_gpu_memory({**config, "gradient_checkpointing": False}, llama8b).total
    fused = estimate_gpu_memory({**config, "gradient_checkpointing": False, "liger_fused_linear_cross_entropy": True,
                                 "plugins": ["axolotl.integrations.liger.LigerPlugin"]}, llama8b).total
    assert fused < plain
    between = int((plain + fused) / 2 / FITS_FRACTION)
    gpu = Hardware(gpu_count=1, gpu_names=("GPU",), gpu_memory_bytes=(between,), bf16=True, compute_capability=(9, 0))
    assert speedups(config, llama8b, gpu, 1).fits_without_checkpointing
    assert not speedups({**config, "liger_fused_linear_cross_entropy": False}, llama8b, gpu, 1).fits_without_checkpointing
