"""`continue_from`: a run that starts from an earlier run's adapter or weights (real CPU trainings)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import yaml

from conftest import SECRET_ENV, collect, make_job, tiny_args
from finetune_worker.publish.card import render_model_card

USER = "cf-user"
STEPS_A = 12


def _env(volume: Path) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if k not in SECRET_ENV}
    return {**base, "BASE_VOLUME": str(volume), "HF_HUB_OFFLINE": "1", "AXOLOTL_DO_NOT_TRACK": "1"}


def _result(events: list[dict]) -> dict:
    assert events[-1]["type"] == "result", events[-1]
    return events[-1]


def _error(events: list[dict]) -> dict:
    assert events[-1]["type"] == "error", events[-1]
    return events[-1]


def _run_dir(volume: Path, run_id: str, user: str = USER) -> Path:
    return volume / "runs" / user / run_id


@pytest.fixture(scope="module")
def run_a(tiny, volume) -> dict:
    """Run A: a short LoRA SFT run with a checkpoint every 4 steps, learning fast enough that
    every batch's loss ends well below where it started (batches differ a lot at first)."""
    job = make_job(tiny_args(tiny, max_steps=STEPS_A, save_steps=4, learning_rate=0.005), user_id=USER, run_id="run-a")
    return _result(collect(job, _env(volume)))


def _losses(volume: Path, run_id: str) -> list[float]:
    """The training loss of each step, from the run's progress records."""
    records = [json.loads(line) for line in (_run_dir(volume, run_id) / "progress.jsonl").read_text().splitlines()]
    return [r["logs"]["loss"] for r in records if r.get("kind") == "log" and "loss" in (r.get("logs") or {})]


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _continue(tiny, volume, run_id: str, continue_from: dict, user: str = USER, **overrides) -> list[dict]:
    job = make_job(tiny_args(tiny, **overrides), user_id=user, run_id=run_id, continue_from=continue_from)
    return collect(job, _env(volume))


@pytest.mark.training
def test_a_run_continues_from_an_earlier_runs_adapter(tiny, volume, run_a):
    events = _continue(tiny, volume, "run-b", {"run_id": "run-a"}, max_steps=3)
    # B starts where A ended, not where A started. One batch's loss differs a lot from the
    # next, and 12 steps at a high learning rate wander (A's last steps are no fair yardstick),
    # so compare like with like only: B's first two steps see A's first two batches (the same
    # seed) before any update of B (warmup starts at 0), i.e. A's final model on them, against
    # A's base model on the same batches.
    a_losses, b_losses = _losses(volume, "run-a"), _losses(volume, "run-b")
    assert _mean(b_losses[:2]) < _mean(a_losses[:2]), (a_losses, b_losses)
    config = yaml.safe_load((_run_dir(volume, "run-b") / "config.yaml").read_text())
    assert config["lora_model_dir"] == str(_run_dir(volume, "run-a") / "output")
    assert config["base_model"] == str(tiny / "tiny-llama")
    said = [e for e in events if e.get("continue_from")]
    assert said and said[0]["continue_from"] == {"run_id": "run-a", "checkpoint": "final", "as": "adapter"}

    # Lineage: base model -> A -> B, in the result, job.json and the model card.
    result = _result(events)
    lineage = result["lineage"]
    assert result["continue_from"] == {"run_id": "run-a", "checkpoint": "final"}
    assert lineage["base_model"] == str(tiny / "tiny-llama")
    assert [r["run_id"] for r in lineage["runs"]] == ["run-a", "run-b"]
    assert lineage["runs"][0]["method"] == lineage["runs"][1]["method"] == "SFT, LoRA"
    assert lineage["runs"][0]["datasets"] == ["tiny_alpaca.jsonl"]
    assert lineage["runs"][1]["continue_from"] == {"run_id": "run-a", "checkpoint": "final"}
    record = json.loads((_run_dir(volume, "run-b") / "job.json").read_text())
    assert record["lineage"] == lineage and record["continue_from"] == {"run_id": "run-a", "checkpoint": "final"}
    card = render_model_card(repo_id="me/tiny-b", config=config, metrics=result["metrics"], versions={}, has_loss_curve=False, lineage=lineage)
    assert "## How it was made" in card
    assert "1. Base model: a local model (`tiny-llama`)" in card
    # the method is text from the job, so its punctuation is escaped (it renders as "SFT, LoRA")
    assert "2. Run `run-a`: SFT\\, LoRA on `tiny_alpaca.jsonl`" in card
    assert "3. Run `run-b` (this model): SFT\\, LoRA on `tiny_alpaca.jsonl`, from run `run-a` (its final output)" in card

    # A chain: C continues B, and its lineage names A, B and C; resubmitting C returns its stored result.
    c = _result(_continue(tiny, volume, "run-c", {"run_id": "run-b"}, max_steps=2))
    assert [r["run_id"] for r in c["lineage"]["runs"]] == ["run-a", "run-b", "run-c"]
    again = _result(_continue(tiny, volume, "run-c", {"run_id": "run-b"}, max_steps=2))
    assert again["reused"] is True and again["lineage"] == c["lineage"]


@pytest.mark.training
def test_a_run_continues_from_a_checkpoint_step(tiny, volume, run_a):
    events = _continue(tiny, volume, "run-from-step-4", {"run_id": "run-a", "checkpoint": 4}, max_steps=2)
    metrics = _result(events)["metrics"]
    config = yaml.safe_load((_run_dir(volume, "run-from-step-4") / "config.yaml").read_text())
    assert config["lora_model_dir"] == str(_run_dir(volume, "run-a") / "output" / "checkpoint-4")
    a = run_a["metrics"]
    assert metrics["first_loss"] < a["first_loss"] - (a["first_loss"] - a["final_loss"]) / 4, (metrics, a)
    assert _result(events)["lineage"]["runs"][-1]["continue_from"] == {"run_id": "run-a", "checkpoint": 4}


def _refusal(tiny, volume, continue_from: dict, user: str = USER, **overrides) -> dict:
    """The job's error; refused in validation: its run directory was never made, no model loaded."""
    run_id = f"refused-{os.urandom(3).hex()}"
    error = _error(_continue(tiny, volume, run_id, continue_from, user=user, **overrides))
    assert not _run_dir(volume, run_id, user).exists()
    return error


@pytest.mark.training
def test_another_users_run_answers_as_a_run_that_does_not_exist(tiny, volume, run_a):
    missing = _refusal(tiny, volume, {"run_id": "never-trained"})
    # run-a exists, but under another user: the same answer, naming the run as it was asked.
    foreign = _refusal(tiny, volume, {"run_id": "run-a"}, user="someone-else")
    assert missing["code"] == foreign["code"] == "invalid_input"
    assert missing["details"] == ["continue_from.run_id: no such run: 'never-trained' (continue_from names an earlier run of this user_id)"]
    assert foreign["details"] == [missing["details"][0].replace("never-trained", "run-a")]
    assert foreign["message"] == missing["message"]
    # and lora_model_dir pointing at another user's run stays refused
    job = make_job(tiny_args(tiny, lora_model_dir=str(_run_dir(volume, "run-a") / "output")), user_id="someone-else")
    error = _error(collect(job, _env(volume)))
    assert "no such file or directory" in json.dumps(error["details"])


@pytest.mark.training
def test_refusals_before_anything_loads(tiny, volume, run_a):
    def message(continue_from: dict, **overrides) -> str:
        error = _refusal(tiny, volume, continue_from, **overrides)
        return " ".join(error["details"])

    assert "no checkpoint at step 5" in message({"run_id": "run-a", "checkpoint": 5})
    assert "its checkpoints: 4, 8, 12" in message({"run_id": "run-a", "checkpoint": 5})
    assert "same rank" in message({"run_id": "run-a"}, lora_r=8)
    assert "same target modules" in message({"run_id": "run-a"}, lora_target_linear=None, lora_target_modules=["q_proj"])
    other_base = tiny / "other-tiny-llama"
    if not other_base.exists():
        shutil.copytree(tiny / "tiny-llama", other_base)
    assert "same base_model" in message({"run_id": "run-a"}, base_model=str(other_base))
    assert "trained a LoRA adapter" in message({"run_id": "run-a"}, adapter=None)
    assert "names this run itself" in " ".join(_error(collect(
        make_job(tiny_args(tiny), user_id=USER, run_id="self", continue_from={"run_id": "self"}), _env(volume)))["details"])

    # A run that has not finished: no final output (trained.json), and no checkpoint at the step asked.
    unfinished = _run_dir(volume, "unfinished")
    shutil.copytree(_run_dir(volume, "run-a"), unfinished, ignore=shutil.ignore_patterns("*.lock"))
    (unfinished / "trained.json").unlink()
    (unfinished / "result.json").unlink()
    assert "has not finished training" in message({"run_id": "unfinished"})
    assert "no such run" not in message({"run_id": "unfinished"})


def _fake_full_run(runs: Path, run_id: str, base: str, continue_from: dict | None = None, lineage: dict | None = None) -> Path:
    """A finished full fine-tune as it lies on the volume (files only: no training)."""
    run_dir = runs / USER / run_id
    (run_dir / "output").mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"base_model": base, "datasets": [{"path": "org/data", "type": "alpaca"}]}))
    record = {"run_id": run_id, "model_id": "m", "continue_from": continue_from, **({"lineage": lineage} if lineage else {})}
    (run_dir / "job.json").write_text(json.dumps(record))
    (run_dir / "trained.json").write_text("{}")
    (run_dir / "output" / "model.safetensors").write_bytes(b"weights")
    return run_dir


def test_a_full_fine_tune_continues_as_the_base_model(tmp_path):
    from finetune_worker.checks.continue_from import resolve_continue_from
    from finetune_worker.checks.paths import make_roots
    from finetune_worker.contract.job import JobInput
    from finetune_worker.contract.settings import REPO_ROOT
    from finetune_worker.plan.config import AxolotlPlan, with_continue_from

    runs = tmp_path / "runs"
    roots = make_roots(tmp_path, REPO_ROOT / "examples", USER)
    first = _fake_full_run(runs, "full-a", "org/base")
    args = {"base_model": "org/base", "datasets": [{"path": "org/more", "type": "alpaca"}], "learning_rate": 1e-5}
    job = JobInput(user_id=USER, model_id="m", run_id="full-b", args=args, continue_from={"run_id": "full-a"})
    origin, problems = resolve_continue_from(job, args, runs, roots)
    assert problems == [] and origin.starts_as == "base_model" and origin.path == first / "output"
    plan = with_continue_from(AxolotlPlan(config=dict(args), warnings=[], publish={}, adapted_for_cpu=[]), origin)
    # the weights are the base model; the tokenizer (not saved beside them here) is the chain's base model's
    assert plan.config["base_model"] == str(first / "output") and plan.config["tokenizer_config"] == "org/base"
    assert args["base_model"] == "org/base"  # the plan is new; the args are untouched

    # A chain of full fine-tunes: the job names the model the chain started from, not the earlier run's weights.
    from finetune_worker.checks.continue_from import lineage

    _fake_full_run(runs, "full-b", str(first / "output"), {"run_id": "full-a", "checkpoint": "final"}, lineage(job, args, origin))
    job_c = JobInput(user_id=USER, model_id="m", run_id="full-c", args=args, continue_from={"run_id": "full-b"})
    origin_c, problems = resolve_continue_from(job_c, args, runs, roots)
    assert problems == []
    chain = lineage(job_c, args, origin_c)
    assert chain["base_model"] == "org/base"
    assert [(r["run_id"], r["method"], r["datasets"]) for r in chain["runs"]] == [
        ("full-a", "SFT, full fine-tune", ["org/data"]), ("full-b", "SFT, full fine-tune", ["org/more"]),
        ("full-c", "SFT, full fine-tune", ["org/more"]),
    ]
    other = {**args, "base_model": "org/other"}
    _, problems = resolve_continue_from(job_c.model_copy(update={"args": other}), other, runs, roots)
    assert [p.path for p in problems] == ["args.base_model"]
