"""Preference training (rl: dpo, ipo, orpo, kto, simpo): rows checked before any download,
a preflight of prompt/chosen/rejected tokens, and the trainer's reward metrics in events."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from finetune_worker.checks.rows import row_problem, row_shape
from finetune_worker.contract import errors
from finetune_worker.contract.errors import JobError
from finetune_worker.data.files import check_datasets

MSG = [{"role": "user", "content": "Name a green fruit."}, {"role": "assistant", "content": "A lime."}]
MSG_BAD = [{"role": "user", "content": "Name a green fruit."}, {"role": "assistant", "content": "A plum."}]


def write_lines(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


# (rl, dataset entry, a good row, a broken row, what the broken row is told)
CASES = [
    ("dpo", {"type": "chatml.intel"}, {"question": "q", "chosen": "a", "rejected": "b"},
     {"question": "q", "chosen": "a"}, "missing field 'rejected' (this dataset type needs question, chosen, rejected)"),
    ("dpo", {"type": "chatml.intel"}, {"system": "s", "question": "q", "chosen": "a", "rejected": "b"},
     {"prompt": "q", "chosen": "a", "rejected": "b"}, "missing field 'question'"),
    ("ipo", {"type": "chatml"}, {"instruction": "q", "chosen_response": "a", "rejected_response": "b"},
     {"input": "q", "chosen": ["a"], "rejected": "b"}, "field 'chosen' must be a string, not list"),
    ("simpo", {"type": "llama3.default"}, {"prompt": "q", "chosen": "a", "rejected": "b"},
     {"chosen": "a", "rejected": "b"}, "missing field 'prompt' (or 'input') (or 'question') (or 'instruction')"),
    ("dpo", {"type": "chatml.icr"}, {"input": "q", "chosen": "a", "rejected": "b"},
     {"input": "q", "chosen": "a", "rejected": None}, "missing field 'rejected'"),
    ("dpo", {"type": "chatml.prompt_pairs"}, {"prompt": "q", "chosen": "a", "rejected": "b"},
     {"prompt": 7, "chosen": "a", "rejected": "b"}, "field 'prompt' must be a string, not int"),
    ("dpo", {"type": "llama3.argilla_chat"}, {"chosen": MSG, "rejected": MSG_BAD},
     {"chosen": MSG, "rejected": MSG_BAD[:1]}, "field 'rejected' has 1 messages; this dataset type needs at least 2"),
    ("dpo", {"type": "chatml.ultra"}, {"prompt": "q", "chosen": MSG, "rejected": MSG_BAD},
     {"prompt": "q", "chosen": MSG, "rejected": [MSG[0], {"text": "x"}]}, "rejected[1] is missing 'content'"),
    ("dpo", {"type": "chat_template.default"}, {"messages": MSG[:1], "chosen": MSG[1], "rejected": MSG_BAD[1]},
     {"messages": [{"role": "human", "content": "q"}], "chosen": "a", "rejected": "b"},
     "messages[0] has role 'human', not one of user, assistant, system, tool"),
    ("dpo", {"type": "chat_template.default"}, {"messages": "q", "chosen": "a", "rejected": [MSG_BAD[1]]},
     {"messages": "q", "chosen": "a", "rejected": 3}, "field 'rejected' must be a string, a message or a list of messages, not a number"),
    ("dpo", {"type": "chat_template.default", "field_messages": "conversation", "field_chosen": "good", "field_rejected": "bad",
             "message_property_mappings": {"role": "from", "content": "value"}, "roles": {"user": ["human"], "assistant": ["gpt"]}},
     {"conversation": [{"from": "human", "value": "q"}], "good": {"from": "gpt", "value": "a"}, "bad": "b"},
     {"conversation": [{"from": "human", "value": "q"}], "good": {"from": "gpt", "content": "a"}, "bad": "b"}, "good is missing 'value'"),
    ("dpo", {"type": "chat_template.argilla_chat"}, {"chosen": MSG, "rejected": MSG_BAD},
     {"chosen": MSG[1:], "rejected": MSG_BAD}, "field 'chosen' has 1 messages; this dataset type needs at least 2"),
    ("dpo", {"type": "passthrough"}, {"prompt": "q", "chosen": "a", "rejected": "b"},
     {"prompt": "q", "chosen": "a", "reject": "b"}, "missing field 'rejected'"),
    ("dpo", {}, {"prompt": "q", "chosen": "a", "rejected": "b"}, {"question": "q", "chosen": "a", "rejected": "b"}, "missing field 'prompt'"),
    ("dpo", {"type": "passthrough"}, {"prompt": "q", "chosen": "a", "rejected": "b"}, {"prompt": "q", "chosen": "", "rejected": "b"},
     "field 'chosen' is empty (Axolotl stops the run on a row without chosen)"),
    ("dpo", {"type": {"field_prompt": "q", "field_chosen": "yes", "field_rejected": "no"}}, {"q": "q", "yes": "a", "no": "b"},
     {"q": "q", "yes": "a"}, "missing field 'no'"),
    ("dpo", {"type": "zephyr.nectar"}, {"prompt": "q", "answers": [{"answer": "a", "rank": 1}, {"answer": "b", "rank": 2}]},
     {"prompt": "q"}, "missing field 'answers'"),
    ("orpo", {"type": "chat_template.argilla"}, {"chosen": MSG, "rejected": MSG_BAD},
     {"chosen": MSG + MSG[:1], "rejected": MSG_BAD}, "field 'chosen' has 3 messages; this dataset type needs user/assistant pairs"),
    ("kto", {"type": "chatml.argilla"}, {"instruction": "q", "completion": "a", "label": True},
     {"instruction": "q", "completion": "a", "label": "yes"}, "field 'label' must be true or false (is the completion desirable), not a string"),
    ("kto", {"type": "llama3.intel"}, {"question": "q", "completion": "a", "label": False},
     {"question": "q", "completion": "a"}, "missing field 'label'"),
    ("kto", {"type": "chatml.prompt_pairs"}, {"prompt": "q", "completion": "a", "label": True},
     {"prompt": "q", "chosen": "a", "label": True}, "missing field 'completion'"),
    ("kto", {"type": "llama3.ultra"}, {"prompt": "q", "completion": "a", "label": True},
     {"prompt": ["q"], "completion": "a", "label": True}, "field 'prompt' must be a string, not list"),
    ("kto", {"type": "chatml.argilla_chat"}, {"completion": MSG, "label": True},
     {"completion": "a", "label": True}, "field 'completion' must be a list of messages, not str"),
    ("kto", {"type": {"field_prompt": "q", "field_completion": "c", "field_label": "ok"}}, {"q": "q", "c": "a", "ok": True},
     {"q": "q", "c": "a", "label": True}, "missing field 'ok'"),
    ("kto", {}, {"prompt": "q", "completion": "a", "label": True}, {"prompt": "q", "completion": "a", "label": 0}, "field 'label' must be true or false"),
]


@pytest.mark.parametrize(("rl", "entry", "good", "bad", "problem"), CASES, ids=[f"{c[0]}-{c[1].get('type', 'none')}-{i}" for i, c in enumerate(CASES)])
def test_a_broken_preference_row_is_named_by_file_line_and_field(tmp_path, rl, entry, good, bad, problem):
    assert row_problem(good, row_shape(entry, "datasets", rl)) == (None, False)
    path = write_lines(tmp_path / "prefs.jsonl", [good, good, bad, good])
    config = {"rl": rl, "datasets": [{"path": str(path), **entry}]}
    with pytest.raises(JobError) as caught:
        check_datasets(config, {})
    assert caught.value.code == errors.DATASET_ERROR
    assert caught.value.message.startswith(f"args.datasets[0] (prefs.jsonl): line 3: {problem}"), caught.value.message


def test_good_preference_rows_pass_and_are_counted(tmp_path):
    path = write_lines(tmp_path / "prefs.jsonl", [{"question": "q", "chosen": "a", "rejected": "b"}] * 5)
    checks = check_datasets({"rl": "dpo", "datasets": [{"path": str(path), "type": "chatml.intel"}]}, {})
    assert checks[0].summary() == {"rows": 5, "empty_rows": 0, "files": 1}


def test_sft_types_are_not_read_as_preference_ones_and_unknown_rl_is_left_to_axolotl():
    # chat_template for SFT needs a list of messages; for DPO a string prompt is fine
    assert row_problem({"messages": "q"}, row_shape({"type": "chat_template"}, "datasets"))[0]
    assert row_problem({"messages": "q", "chosen": "a", "rejected": "b"}, row_shape({"type": "chat_template"}, "datasets", "dpo")) == (None, False)
    assert row_shape({"type": "chatml.intel"}, "datasets", "grpo") is None


def test_the_preference_trainers_metrics_reach_progress_events_and_the_result():
    from finetune_worker.run.progress import ProgressTracker

    tracker = ProgressTracker()
    tracker.feed({"kind": "train_begin", "step": 0, "max_steps": 2, "time": 0.0})
    logs = {"loss": 0.69, "learning_rate": 1e-4, "rewards/chosen": 0.01, "rewards/rejected": -0.02, "rewards/margins": 0.03,
            "rewards/accuracies": 0.5, "logps/chosen": -40.5, "logps/rejected": -41.0, "logits/chosen": -1.5, "grad_norm": 2.0}
    tracker.feed({"kind": "log", "step": 1, "logs": logs, "time": 1.0})
    event = tracker.progress_due()
    assert event["preference"] == {k: v for k, v in logs.items() if "/" in k and k != "learning_rate"}
    assert tracker.metrics["final_rewards/margins"] == 0.03 and tracker.metrics["final_rewards/accuracies"] == 0.5
    plain = ProgressTracker()
    plain.feed({"kind": "train_begin", "step": 0, "max_steps": 2, "time": 0.0})
    plain.feed({"kind": "log", "step": 1, "logs": {"loss": 1.0}, "time": 1.0})
    assert "preference" not in plain.progress_due()  # supervised training: no such field


# -- preflight and a real DPO training on the tiny model -------------------------------


def preference_rows(count: int = 16) -> list[dict]:
    """chatml.intel rows: the fact as the chosen answer, another row's answer of the same kind rejected."""
    from finetune_worker.entry.tiny import facts

    pairs = facts()[:count]
    return [
        {"question": q, "chosen": a, "rejected": pairs[(i + 1) % len(pairs)][1] if (i + 1) % 12 else pairs[i - 1][1]}
        for i, (q, a) in enumerate(pairs)
    ]


def dpo_args(tiny: Path, dataset: dict, **overrides) -> dict:
    from conftest import tiny_args

    return tiny_args(
        tiny, rl="dpo", datasets=[{"type": "chatml.intel", **dataset}],
        num_epochs=1, micro_batch_size=4, learning_rate=0.0005, warmup_steps=0, **overrides,
    )


@pytest.mark.training
def test_preflight_reports_prompt_chosen_rejected_tokens_and_too_long_pairs(tiny, env):
    from conftest import collect, make_job

    rows = preference_rows() + [{"question": "Describe a lime. " * 60, "chosen": "Green.", "rejected": "Blue."}]
    events = collect(make_job(dpo_args(tiny, {"rows": rows}), mode="preflight"), env)
    final = events[-1]
    assert final["type"] == "result" and final["mode"] == "preflight", final
    report = final["preflight"]
    assert report["rl"] == "dpo" and report["sequence_len"] == 256
    dataset = report["datasets"][0]
    assert dataset["rows_read"] == 17 and dataset["too_long"] == 1 and dataset["dropped"] == 1 and dataset["rows_kept"] == 16
    assert set(dataset["tokens"]) == {"prompt", "chosen", "rejected"}
    assert dataset["tokens"]["prompt"]["max"] > 256 and 0 < dataset["tokens"]["chosen"]["min"] <= dataset["tokens"]["chosen"]["max"] < 20
    assert report["prepared"]["train_rows"] == 16  # what Axolotl's own loader kept
    described = [e["message"] for e in events if e["type"] == "status" and "dataset" in e]
    assert described and "1 pairs longer than sequence_len 256: dropped" in described[0] and "chosen" in described[0]
    example = next(e["example"] for e in events if e["type"] == "status" and "example" in e)
    assert example["prompt"].startswith("<|im_start|>user\n") and example["chosen"].endswith("<|im_end|>")
    assert not [e for e in events if e["type"] == "progress"]


@pytest.mark.training
def test_a_dpo_training_on_the_tiny_model_streams_its_reward_metrics(tiny, env, volume):
    from conftest import collect, make_job

    folder = volume / "data" / uuid.uuid4().hex[:8]
    folder.mkdir(parents=True)
    path = write_lines(folder / "prefs.jsonl", preference_rows())
    events = collect(make_job(dpo_args(tiny, {"path": str(path), "ds_type": "json"})), env)
    final = events[-1]
    assert final["type"] == "result", [e for e in events if e["type"] == "error"]
    progress = [e for e in events if e["type"] == "progress"]
    assert progress and progress[-1]["step"] == progress[-1]["total_steps"] == 4
    metrics = progress[-1]["preference"]
    for key in ("rewards/margins", "rewards/accuracies", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"):
        assert isinstance(metrics[key], float), (key, metrics)
    assert "final_rewards/margins" in final["metrics"]


@pytest.mark.training
def test_the_readme_chain_sft_then_dpo_with_continue_from_runs_end_to_end(tiny, env):
    """docs/job-reference.md "SFT, then DPO": the DPO job continues the SFT run's adapter; its lineage says so."""
    from conftest import collect, make_job, tiny_args

    sft = make_job(tiny_args(tiny, max_steps=4))
    first = collect(sft, env)
    assert first[-1]["type"] == "result", first[-1]
    dpo = make_job(dpo_args(tiny, {"rows": preference_rows()}), continue_from={"run_id": sft["run_id"], "checkpoint": "final"})
    events = collect(dpo, env)
    final = events[-1]
    assert final["type"] == "result", final
    assert final["continue_from"] == {"run_id": sft["run_id"], "checkpoint": "final"}
    runs = final["lineage"]["runs"]
    assert [run["run_id"] for run in runs] == [sft["run_id"], dpo["run_id"]]
    assert "DPO" in runs[-1]["method"] and "DPO" not in runs[0]["method"]
    progress = [e for e in events if e["type"] == "progress"]
    assert progress and "rewards/margins" in progress[-1]["preference"]
    config = (Path(env["BASE_VOLUME"]) / "runs" / "tester" / dpo["run_id"] / "config.yaml").read_text()
    assert f"{sft['run_id']}/output" in config  # the SFT adapter is DPO's starting adapter (lora_model_dir)
