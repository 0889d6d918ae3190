"""The utilisation figures of the time estimate against the published runs they come from
(sizing/throughput_sources.py).

Pure: no model is loaded. Each source's published figure is recomputed from its setup:
a time for a number of tokens gives tokens per second; an MFU or model TFLOPs is recomputed
with the source's own FLOPs accounting; every source gives an HFU by the worker's accounting,
and each default in UTILISATION must be the median of the sources it names, rounded down to
0.05. docs/operating.md's table of the sources is rendered from the same data:
`PYTHONPATH=src .venv/bin/python tests/test_throughput_calibration.py --write` updates it.
"""

from __future__ import annotations

import math
import statistics
import sys
from pathlib import Path

import pytest

from finetune_worker.sizing.gpus import GPUS
from finetune_worker.sizing.memory import params_from_config
from finetune_worker.sizing.throughput import (
    flops_per_token,
    model_shape,
    source_tokens_per_second,
    source_utilisation,
    source_work,
)
from finetune_worker.sizing.throughput_sources import BY_ID, MODELS, SOURCES, UTILISATION

ROOT = Path(__file__).resolve().parent.parent
TABLE_DOC = ROOT / "docs" / "operating.md"
BEGIN, END = "<!-- throughput-sources-table: begin -->", "<!-- throughput-sources-table: end -->"
HELD = [source for source in SOURCES if source.outside_bounds is None]
LOW, HIGH = 0.15, 0.75  # a held source's HFU must be a plausible share of the peak


def torchtitan_flops_per_token(source) -> float:
    """torchtitan's accounting: 6 x all parameters + 12 x L x heads x head_dim x sequence length (non-causal)."""
    config = MODELS[source.model]
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    return 6 * params_from_config(config) + 12 * config["num_hidden_layers"] * config["num_attention_heads"] * head_dim * source.sequence_len


def test_torchtitan_s_published_mfu_is_recomputed_with_its_own_accounting():
    source = BY_ID["tt-a100"]
    mfu = source_tokens_per_second(source) * torchtitan_flops_per_token(source) / (source.peak_tflops * 1e12)
    assert source.check.unit == "MFU %"
    assert mfu * 100 == pytest.approx(source.check.value, abs=0.1)


def test_nemo_s_published_model_tflops_are_within_five_percent_of_the_worker_s_count():
    source = BY_ID["nemo-lora70"]
    tflops = source_tokens_per_second(source) * source_work(source).model / 1e12
    assert source.check.unit == "model TFLOPs/GPU"
    assert tflops == pytest.approx(source.check.value, rel=0.05)


@pytest.mark.parametrize("source", [s for s in SOURCES if s.rate.unit == "s"], ids=lambda s: s.id)
def test_a_published_time_gives_the_tokens_per_second_of_its_setup(source):
    rate = source_tokens_per_second(source)
    assert rate * source.rate.value * source.count == pytest.approx(source.samples * source.sequence_len)
    assert source.samples > 0


def test_the_attention_term_makes_the_long_and_the_short_sequence_runs_agree():
    """AnswerDotAI's Mistral 7B ran at 2,200 tokens/s at 2,048 and 1,615 at 24,576: without the
    attention term the long run would look 27% less efficient; with it both reach about the same."""
    short, long_ = BY_ID["aai-mistral-2k"], BY_ID["aai-mistral-24k"]
    shape = model_shape(MODELS[short.model])
    without = [source_tokens_per_second(s) * (4 * shape.active_params) for s in (short, long_)]
    assert without[1] / without[0] < 0.75
    with_attention = [source_utilisation(s)[0] for s in (short, long_)]
    assert 0.9 < with_attention[1] / with_attention[0] < 1.25


@pytest.mark.parametrize("source", HELD, ids=lambda s: s.id)
def test_a_held_source_reaches_a_plausible_share_of_its_peak(source):
    mfu, hfu = source_utilisation(source)
    assert LOW <= hfu <= HIGH and mfu <= hfu


@pytest.mark.parametrize("source", [s for s in SOURCES if s.outside_bounds], ids=lambda s: s.id)
def test_a_source_kept_outside_the_bounds_is_really_outside_them(source):
    _, hfu = source_utilisation(source)
    assert not LOW <= hfu <= HIGH


@pytest.mark.parametrize("key", sorted(UTILISATION), ids=lambda k: "/".join(k))
def test_each_default_is_the_median_of_its_sources_rounded_down(key):
    entry = UTILISATION[key]
    if not entry.sources:
        assert entry.assumed, f"{key}: a default without sources says why it is assumed"
        return
    for source_id in entry.sources:
        source = BY_ID[source_id]
        assert source.outside_bounds is None and source.gpu_class == key[0]
        assert (source.method == "full") == (key[1] == "full")
    median = statistics.median(source_utilisation(BY_ID[i])[1] for i in entry.sources)
    assert entry.value == pytest.approx(math.floor(median * 20) / 20)


def test_every_gpu_type_has_a_utilisation_for_each_method_and_every_source_a_link():
    for gpu in GPUS:
        assert (gpu.gpu_class, "full") in UTILISATION and (gpu.gpu_class, "lora") in UTILISATION
    for source in SOURCES:
        assert source.url.startswith("https://") and source.model in MODELS
    assert len({source.id for source in SOURCES}) == len(SOURCES)


def test_gradient_checkpointing_is_counted_as_one_more_forward():
    shape = model_shape(MODELS["Llama-3-8B"])
    off = flops_per_token(shape, "full", 0, 2048.0, checkpointing=False)
    on = flops_per_token(shape, "full", 0, 2048.0, checkpointing=True)
    assert on.model == off.model and on.hardware - off.hardware == pytest.approx(2 * shape.active_params + 6 * 32 * 4096 * 2048 / 3)


def render_table() -> str:
    rows = ["| Source | Model | Setup | GPUs | Published | Tokens/s per GPU | MFU | HFU | Link |", "|---|---|---|---|---|---|---|---|---|"]
    for s in SOURCES:
        mfu, hfu = source_utilisation(s)
        published = f"{s.rate.value:g} {s.rate.unit}" + (f"; {s.check.value:g} {s.check.unit}" if s.check else "")
        setup = f"{s.method}{f' r{s.lora_r}' if s.lora_r else ''}, seq {s.sequence_len}" + (", GC" if s.gc else "")
        mark = " *" if s.outside_bounds else ""
        rows.append(f"| {s.id} | {s.model} | {setup} | {s.count} x {s.gpu} | {published} | {source_tokens_per_second(s):.0f} | "
                    f"{mfu * 100:.1f}% | {hfu * 100:.1f}%{mark} | [link]({s.url}) |")
    rows += ["", "| GPU class | full | LoRA / QLoRA |", "|---|---|---|"]
    for gpu_class in dict.fromkeys(gpu.gpu_class for gpu in GPUS):
        cells = []
        for kind in ("full", "lora"):
            entry = UTILISATION[(gpu_class, kind)]
            cells.append(f"{entry.value:.2f} ({'median of ' + ', '.join(entry.sources) if entry.sources else 'assumed: ' + entry.assumed})")
        rows.append(f"| {gpu_class} | {' | '.join(cells)} |")
    rows += ["", "\\* kept but not used for a default, for the reason in `sizing/throughput_sources.py` (`outside_bounds`)."]
    return "\n".join(rows)


def doc_section(text: str) -> str:
    return text[text.index(BEGIN) + len(BEGIN):text.index(END)].strip()


def test_the_docs_table_matches_the_sources():
    assert doc_section(TABLE_DOC.read_text(encoding="utf-8")) == render_table(), (
        "run: PYTHONPATH=src .venv/bin/python tests/test_throughput_calibration.py --write")


if __name__ == "__main__":
    table = render_table()
    if "--write" in sys.argv:
        text = TABLE_DOC.read_text(encoding="utf-8")
        start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
        TABLE_DOC.write_text(text[:start] + "\n" + table + "\n" + text[end:], encoding="utf-8")
    print(table)
