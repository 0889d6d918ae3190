"""Evaluation: the fine-tune against its base model, the publish gate, samples in the card."""

from __future__ import annotations

import json
import time

import pytest

from conftest import collect, make_job, tiny_args
from fake_hub import FakeHub, user
from finetune_worker.publish.card import evaluation_sections
from finetune_worker.publish.evaluation import gate, generation_metrics

TOKEN = "hf_CANARYevalWriteToken0000001"


# ------------------------------------------------------------------------ unit
def test_generation_metrics_use_rouge_and_bleu_libraries():
    same = generation_metrics(["A lime is green."], ["A lime is green."])
    assert same == {"exact_match": 1.0, "jaccard": 1.0, "rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0, "bleu": 1.0}
    off = generation_metrics(["A lime is purple.", "a BANANA is yellow. "], ["A lime is green.", "A banana is yellow."])
    assert off["exact_match"] == 0.5  # case and spacing do not count
    assert off["jaccard"] == pytest.approx((3 / 5 + 1) / 2, abs=1e-4)  # {a, lime, is} of {a, lime, is, purple., green.}
    assert off["rouge1"] == pytest.approx((0.75 + 1) / 2, abs=1e-4)
    assert 0 < off["bleu"] < 1


def test_the_gate_knows_which_way_is_better():
    evaluation = {"base": {"rougeL": 0.5, "loss": 1.0}, "finetuned": {"rougeL": 0.7, "loss": 1.2}}
    assert gate(evaluation, "rougeL", 0.0)[0] is True
    assert gate(evaluation, "rougeL", 0.3)[0] is False
    passed, verdict = gate(evaluation, "loss", 0.0)
    assert passed is False and "lower is better" in verdict and "does not beat" in verdict


def test_card_sections_show_the_table_and_fenced_samples():
    evaluation = {
        "examples": 2, "base": {"rougeL": 0.5}, "finetuned": {"rougeL": 0.75}, "delta": {"rougeL": 0.25},
        "samples": [{"prompt": "say ```hi```", "reference": "hi", "base": "ho", "finetuned": "hi"}],
    }
    text = "\n".join(evaluation_sections(evaluation))
    assert "| rougeL | 0.5 | 0.75 | +0.25 |" in text
    assert "````text\nsay ```hi```\n````" in text and "*fine-tuned model:*" in text


@pytest.mark.parametrize(
    ("evaluation", "path", "fragment"),
    [
        ({"dataset": {"path": "a", "rows": [{"prompt": "p", "completion": "c"}]}}, "evaluation.dataset", "exactly one of path"),
        ({"dataset": {"rows": [{"prompt": "p"}]}, "num_examples": 0}, "evaluation.num_examples", "greater than or equal to 1"),
        ({"dataset": {"rows": [{"prompt": "p", "completion": "c"}]}, "publish_if_better": "rogue"}, "evaluation.publish_if_better", "Input should be"),
        ({"dataset": {"rows": [{"q": "p"}]}, "temprature": 0}, "evaluation.temprature", "did you mean 'temperature'"),
        ({"dataset": {"path": "/etc/passwd"}}, "evaluation.dataset.path", "inside the allowed roots"),
        ({"dataset": {"rows": [{"instruction": "q", "output": "a"}, {"instruction": "q"}], "format": "alpaca"}},
         "evaluation.dataset.rows[1]", "missing field 'output'"),
    ],
)
def test_invalid_evaluation_sections_fail_before_training(tiny, env, evaluation, path, fragment):
    started = time.monotonic()
    events = collect(make_job(tiny_args(tiny), evaluation=evaluation), env)
    final = events[-1]
    assert final["type"] == "error" and final["code"] in ("invalid_input", "invalid_config"), final
    assert any(d.startswith(path + ":") and fragment in d for d in final["details"]), final["details"]
    assert not any(e.get("stage") == "training" for e in events) and time.monotonic() - started < 10


# ------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def hub():
    fake = FakeHub().start()
    fake.tokens[TOKEN] = user("alice")
    yield fake
    fake.close()


@pytest.fixture
def hub_env(env, hub):
    return {**env, "HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0"}


@pytest.mark.training
def test_memorised_facts_beat_the_base_model_and_the_card_shows_it(tiny, hub, hub_env):
    repo = f"alice/eval-{time.time_ns()}"
    evaluation = {"dataset": {"path": str(tiny / "tiny_alpaca.jsonl")}, "num_examples": 12, "max_new_tokens": 16,
                  "samples": 2, "publish_if_better": "rougeL"}
    job = make_job(tiny_args(tiny, num_epochs=20, hub_model_id=repo), evaluation=evaluation, credentials={"hf_token": TOKEN})
    events = collect(job, hub_env)
    result = events[-1]
    assert result["type"] == "result", result
    report = result["evaluation"]
    assert report["examples"] == 12
    assert report["finetuned"]["exact_match"] > report["base"]["exact_match"]
    assert report["finetuned"]["rougeL"] > report["base"]["rougeL"] and report["delta"]["loss"] < 0
    assert len(report["samples"]) == 2 and {"prompt", "reference", "base", "finetuned"} <= set(report["samples"][0])
    final_eval = [e for e in events if e["type"] == "eval" and e.get("stage") == "final"]
    assert final_eval and final_eval[0]["delta"] == report["delta"]
    assert result["published"] is True and result["hub"]["repo_id"] == repo
    card = hub.files(repo)["README.md"].decode()
    assert "## Evaluation" in card and "| rougeL |" in card and "### Samples" in card
    assert report["samples"][0]["reference"] in card and TOKEN not in card


@pytest.mark.training
def test_a_fine_tune_that_is_not_better_is_not_pushed(tiny, hub, hub_env, volume):
    repo = f"alice/gated-{time.time_ns()}"
    evaluation = {"dataset": {"rows": [{"prompt": "Q: What colour is a lime? A:", "completion": " A lime is green."}]},
                  "max_new_tokens": 8, "publish_if_better": "exact_match"}
    args = tiny_args(tiny, max_steps=4, learning_rate=1e-9, hub_model_id=repo, val_set_size=0.25, eval_steps=2)
    job = make_job(args, evaluation=evaluation, credentials={"hf_token": TOKEN})
    events = collect(job, hub_env)
    result = events[-1]
    assert result["type"] == "result" and result["status"] == "completed", result
    assert result["published"] is False and result["hub"] is None
    assert "not published" in result["not_published_reason"] and "does not beat" in result["not_published_reason"]
    assert any(e["type"] == "warning" and "not published" in e["message"] for e in events)
    assert repo not in hub.repos  # nothing was created or pushed
    assert (volume / "runs" / job["user_id"] / job["run_id"] / "output" / "adapter_model.safetensors").is_file()
    during = [e for e in events if e["type"] == "eval" and "base" not in e]
    assert during and all(isinstance(e["step"], int) and "loss" in e for e in during)  # Axolotl's own eval split
    # the table shown as training began counts both evaluations: the eval split's lengths came with the train split's
    run_dir = volume / "runs" / job["user_id"] / job["run_id"]
    sent = next(json.loads(line) for line in (run_dir / "progress.jsonl").read_text().splitlines() if '"lengths"' in line)
    assert sent["eval"]["rows"] == 9 and sent["train"]["rows"] == 27  # val_set_size 0.25 of 36
    table = next(e["estimate"] for e in events if e["type"] == "status" and "estimate" in e)
    row = next(r for r in table["rows"] if r["gpu"] == "NVIDIA H100 80GB HBM3" and r["count"] == 1)
    assert row["phases_seconds"]["evaluate"] >= 15  # the comparison loads the base model (15 s of overhead), then answers
