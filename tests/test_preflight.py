"""Preflight: the datasets tokenized exactly as training would, reported, and no training."""

from __future__ import annotations

import re

import pytest

from conftest import collect, make_job, tiny_args
from finetune_worker.data.preflight import length_outcome, packing_efficiency, render_example

GOOD = {"instruction": "What colour is a lime?", "input": "", "output": "A lime is green."}
LONG = {"instruction": "Describe a lime. " * 120, "input": "", "output": "Green."}
EMPTY = {"instruction": "What colour is a plum?", "input": "", "output": ""}


def test_render_marks_the_trained_spans():
    text = render_example([1, 2, 3, 4, 5], [-100, -100, 3, 4, -100], lambda ids: "".join(f"<{i}>" for i in ids))
    assert text == "<1><2>[[<3><4>]]<5>"


def test_length_outcome_follows_the_excess_length_strategy():
    lengths = [1, 10, 300, 500]
    assert length_outcome(lengths, 256, 2, "drop") == {"too_long": 2, "too_short": 1, "dropped": 3, "truncated": 0}
    assert length_outcome(lengths, 256, 2, "truncate") == {"too_long": 2, "too_short": 1, "dropped": 1, "truncated": 2}


def test_packing_efficiency_uses_axolotls_packer():
    assert packing_efficiency([100, 100, 50, 50], 200) == {"bins": 2, "efficiency": 0.75}
    assert packing_efficiency([600], 200) == {"bins": 0, "efficiency": None}


def test_the_standby_warm_up_compiles_the_packer_the_real_lengths_use():
    """warm_packer (run by both standbys before "go") leaves numba nothing to compile for a real split."""
    import subprocess
    import sys

    probe = (
        "from axolotl.utils.samplers.multipack import pack_group\n"
        "from finetune_worker.data.preflight import length_summary, warm_packer\n"
        "before = len(pack_group.signatures); warm_packer(); warmed = len(pack_group.signatures)\n"
        "length_summary([42, 45, 300, 7, 1], 256, 2)\n"
        "print(before, warmed, len(pack_group.signatures))\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert done.stdout.split()[-3:] == ["0", "1", "1"], done.stdout[-2000:] + done.stderr[-2000:]


SAVE_PROBE = """
def processes_started(save) -> int:
    import multiprocess.process

    before = next(multiprocess.process._process_counter)
    save()
    return next(multiprocess.process._process_counter) - before - 1


if __name__ == "__main__":  # a spawned process runs this file again: only the probe's parent imports Axolotl
    import filecmp, sys
    from pathlib import Path
    from datasets import Dataset
    from finetune_worker.run.progress_plugin import ProgressPlugin

    out = Path(sys.argv[1])
    rows = Dataset.from_dict({"input_ids": [[1, 2, i] for i in range(40)], "labels": [[-100, 2, i] for i in range(40)]})
    pooled = processes_started(lambda: rows.save_to_disk(str(out / "pool"), num_proc=1, num_shards=2))
    ProgressPlugin().register({})
    ProgressPlugin().register({})
    here = processes_started(lambda: rows.save_to_disk(str(out / "here"), num_proc=1, num_shards=2))
    names = sorted(p.name for p in (out / "pool").iterdir())
    same = names == sorted(p.name for p in (out / "here").iterdir()) and all(
        filecmp.cmp(out / "pool" / n, out / "here" / n, shallow=False) for n in names)
    two = processes_started(lambda: rows.save_to_disk(str(out / "two"), num_proc=2))
    print(pooled, here, two, len(names), same, Dataset.load_from_disk(str(out / "here"))["input_ids"][39])
"""


def test_a_one_process_save_writes_the_same_files_without_starting_processes(tmp_path):
    """datasets 5.0.1 saves through a spawn pool and a manager even for num_proc=1 (Axolotl's
    smallest); the worker's plugin has such a save run in its own process: the same files, no
    process started. num_proc=2 keeps its pool."""
    import subprocess
    import sys

    script = tmp_path / "probe.py"
    script.write_text(SAVE_PROBE)
    done = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=300)
    pooled, here, two, files, same, last = done.stdout.split(maxsplit=5)
    assert int(pooled) >= 2 and here == "0" and int(two) >= 2, done.stdout[-2000:] + done.stderr[-2000:]
    assert files == "4" and same == "True" and last.strip() == "[1, 2, 39]"  # 2 shards, state and info, byte for byte


def _by_dataset(events: list[dict]) -> dict:
    return {e["dataset"]["where"]: e["dataset"] for e in events if e["type"] == "status" and "dataset" in e}


def _examples(events: list[dict], where: str) -> list[str]:
    return [e["example"]["text"] for e in events if e["type"] == "status" and e.get("example", {}).get("dataset") == where]


@pytest.fixture(scope="module")
def preflight_events(tiny, volume):
    import os

    env = {**os.environ, "BASE_VOLUME": str(volume), "HF_HUB_OFFLINE": "1"}
    datasets = [
        {"path": str(tiny / "tiny_alpaca.jsonl"), "type": "alpaca", "ds_type": "json"},
        {"path": str(tiny / "tiny_chat.jsonl"), "type": "chat_template", "chat_template": "chatml", "ds_type": "json"},
        {"path": str(tiny / "tiny_completion.jsonl"), "type": "completion", "ds_type": "json", "weight": 0.5},
        {"rows": [GOOD, LONG, EMPTY, GOOD], "type": "alpaca"},
    ]
    job = make_job(tiny_args(tiny, datasets=datasets, chat_template="chatml"), mode="preflight")
    return collect(job, env), job


def test_preflight_reports_every_dataset_and_stops_before_training(preflight_events, volume):
    events, job = preflight_events
    final = events[-1]
    assert final["type"] == "result" and final["mode"] == "preflight", final
    stages = [e.get("stage") for e in events if e["type"] == "status"]
    assert "training" not in stages and "downloading" not in stages
    run_dir = volume / "runs" / job["user_id"] / job["run_id"]
    assert not list(run_dir.glob("output/**/*.safetensors")) and not (run_dir / "result.json").exists()
    assert (run_dir / "preflight.json").is_file()
    # the preflight child started at job receipt and imported Axolotl while the worker validated
    log = (run_dir / "preflight.log").read_text()
    assert log.startswith("===== preflight process ") and "(on standby, importing Axolotl, since the job arrived)" in log.splitlines()[0]
    assert re.search(r"standby: ready after [0-9.]+ s of imports; waiting for go\n", log), log[:3000]
    assert re.search(r"standby: go after [0-9.]+ s of waiting\n", log), log[:3000]
    report = final["preflight"]
    assert [d["where"] for d in report["datasets"]] == [f"args.datasets[{i}]" for i in range(4)]
    for dataset in report["datasets"]:
        tokens = dataset["tokens"]
        assert dataset["rows_read"] > 0 and 0 < tokens["trained"] < tokens["total"] or dataset["type"] == "completion"
        assert tokens["min"] <= tokens["median"] <= tokens["max"]
    assert report["prepared"]["train_rows"] == report["total"]["rows_kept"] and report["prepared"]["total_num_steps"] > 0


def test_too_long_and_empty_rows_are_counted(preflight_events):
    events, _ = preflight_events
    inline = _by_dataset(events)["args.datasets[3]"]
    assert inline["rows_read"] == 4 and inline["too_long"] == 1 and inline["dropped"] == 1 and inline["rows_kept"] == 3
    assert inline["empty_rows"] == 1 and inline["tokens"]["max"] > 256
    assert events[-1]["preflight"]["total"]["empty_rows"] == 1


def test_a_weighted_dataset_is_reported_with_the_rows_axolotl_samples(preflight_events):
    events, _ = preflight_events
    completion = _by_dataset(events)["args.datasets[2]"]
    assert completion["weight"] == 0.5 and completion["rows_before_weight"] == 36 and completion["rows_read"] == 18
    assert "args.datasets[2]: 18 rows (weight 0.5: 18 sampled of 36)" in [
        e["message"].split(",")[0] for e in events if e["type"] == "status" and e.get("dataset", {}).get("where") == "args.datasets[2]"
    ]
    unweighted = _by_dataset(events)["args.datasets[0]"]
    assert "weight" not in unweighted and unweighted["rows_read"] == 36


def test_examples_mark_the_response_as_trained_and_the_prompt_not(preflight_events):
    events, _ = preflight_events
    alpaca = _examples(events, "args.datasets[0]")[0]
    assert re.search(r"### Instruction:\nWhat colour is a \w+\?", alpaca) and "[[" not in alpaca.split("### Response:")[0]
    assert re.search(r"### Response:\n\[\[A \w+ is \w+\.", alpaca)
    chat = _examples(events, "args.datasets[1]")[0]
    user, _, assistant = chat.partition("assistant")
    assert "What colour" in user and "[[" not in user
    assert re.search(r"\[\[A \w+ is \w+\.", assistant)
    completion = _examples(events, "args.datasets[2]")[0]
    assert completion.startswith("[[Q: ") and completion.endswith("]]")  # completion trains on everything (a sampled row: weight 0.5)


def test_train_on_inputs_marks_the_prompt_too_and_training_reuses_the_tokens(tiny, env, volume):
    args = tiny_args(tiny, train_on_inputs=True, num_epochs=1)
    job = make_job(args, mode="preflight")
    events = collect(job, env)
    assert events[-1]["type"] == "result", events[-1]
    example = _examples(events, "args.datasets[0]")[0]
    assert "[[" in example.split("### Response:")[0]  # the instruction is trained on too
    train = collect({**job, "mode": "train"}, env)
    assert train[-1]["type"] == "result", train[-1]
    log = (volume / "runs" / job["user_id"] / job["run_id"] / "train.log").read_text()
    assert "Loading prepared dataset from disk" in log and "Loading raw datasets" not in log


def test_an_unknown_mode_is_rejected(tiny, env):
    events = collect(make_job(tiny_args(tiny), mode="dry-run"), env)
    assert events[-1]["code"] == "invalid_input"
    assert any(d.startswith("mode: Input should be 'train', 'preflight', 'estimate', 'runs', 'events' or 'generate'") for d in events[-1]["details"])


def test_the_preflight_result_carries_the_time_and_cost_table(preflight_events):
    events, _ = preflight_events
    final = events[-1]
    train = final["preflight"]["train"]
    assert train["rows"] == final["preflight"]["prepared"]["train_rows"] and train["tokens"] > 0
    assert sum(train["histogram"]) == train["rows"] and train["if_packed"]["bins"] > 0
    estimate = final["estimate"]
    assert {row["gpu"] for row in estimate["rows"]} >= {"NVIDIA GeForce RTX 4090", "NVIDIA H100 80GB HBM3", "NVIDIA B200"}
    assert {row["count"] for row in estimate["rows"]} == {1, 2, 4, 8}
    assert all(row["fits"] and row["train_seconds"] > 0 for row in estimate["rows"])
    assert estimate["cheapest"]["cost_usd"] == min(r["cost_usd"] for r in estimate["rows"] if r["cost_usd"] is not None)
    assert estimate["train_tokens"] > 0 and any(s.startswith("prices: RunPod") for s in estimate["sources"])
    assert any(e["type"] == "status" and e["message"].startswith("estimate for ") for e in events)


def test_an_estimate_judges_a_qlora_fsdp_job_for_gpus_on_a_cpu_worker(tiny, volume):
    """On a CPU worker the same job in mode train is refused (QLoRA and FSDP need CUDA);
    mode estimate answers it for the GPU types, tokenizing a CPU-safe copy."""
    import os

    env = {**os.environ, "BASE_VOLUME": str(volume), "HF_HUB_OFFLINE": "1"}
    args = tiny_args(tiny, adapter="qlora", load_in_4bit=True, fsdp_config={"fsdp_version": 2, "offload_params": False,
                                                                            "reshard_after_forward": True})
    refused = collect(make_job(args, mode="preflight", num_processes=2), env)[-1]
    assert refused["type"] == "error" and "CUDA" in " ".join(refused["details"]), refused
    events = collect(make_job(args, mode="estimate", num_processes=2), env)
    final = events[-1]
    assert final["type"] == "result" and final["mode"] == "estimate", final
    assert not any(e["type"] == "status" and e["stage"] == "training" for e in events)
    rows = final["estimate"]["rows"]
    assert rows and {row["count"] for row in rows} == {2} and all(row["fits"] for row in rows)
    assert final["estimate"]["method"] == "qlora"
    assert any("tokenizes a copy without" in e["message"] for e in events if e["type"] == "warning")
