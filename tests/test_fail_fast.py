"""A request's own problems are answered before Axolotl (or torch) is imported."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import make_job, tiny_args
from finetune_worker.host.hardware import no_gpu_driver

PROBE = """
import asyncio, json, sys
from finetune_worker.pipeline import run_job
job = json.loads(sys.argv[1])
async def main():
    return [event async for event in run_job(job)]
events = asyncio.run(main())
print(json.dumps({"events": events, "axolotl": "axolotl" in sys.modules, "torch": "torch" in sys.modules}))
"""


def refuse_in_a_fresh_process(job: dict, env: dict) -> dict:
    done = subprocess.run([sys.executable, "-c", PROBE, json.dumps(job)], env=env, capture_output=True, text=True, timeout=120)
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_requests_own_problems_end_the_job_before_axolotl_is_imported(tiny, env, volume):
    args = tiny_args(tiny, datasets=[{"path": str(tiny / "tiny_alpaca.jsonl"), "type": "alpacca"}])
    args.pop("base_model")
    job = make_job(args, run_id="../x")
    seen = refuse_in_a_fresh_process(job, env)
    final = seen["events"][-1]
    assert final["code"] == "invalid_input" and "found before Axolotl's check of args" in final["message"], final
    assert [d.split(":")[0] for d in final["details"]] == ["run_id", "args.base_model"]  # the misspelt type needs Axolotl: not yet
    assert not seen["axolotl"]
    assert not seen["torch"] or not no_gpu_driver()  # a GPU worker imports torch to read its GPUs
    assert [e["type"] for e in seen["events"]] == ["status", "error"]


def test_with_nothing_found_early_axolotls_check_reports_its_problems(tiny, env):
    job = make_job(tiny_args(tiny, datasets=[{"path": str(tiny / "tiny_alpaca.jsonl"), "type": "alpacca"}]))
    seen = refuse_in_a_fresh_process(job, env)
    final = seen["events"][-1]
    assert final["code"] == "invalid_config" and "before Axolotl" not in final["message"], final
    assert any(d.startswith("args.datasets[0].type") for d in final["details"]), final["details"]


def test_a_runs_query_answers_without_torch_or_axolotl(env):
    seen = refuse_in_a_fresh_process({"user_id": "nobody-yet", "mode": "runs"}, env)
    assert seen["events"][-1]["type"] == "result", seen["events"][-1]
    assert not seen["axolotl"] and (not seen["torch"] or not no_gpu_driver())


def test_a_missing_or_forbidden_dataset_path_ends_the_job_before_axolotl_is_imported(tiny, env, volume):
    """A dataset file that is not there, and another user's file (answered like a missing one),
    are known from the paths alone: refused before Axolotl's schema is imported."""
    # a user of its own: test_generate checks that "someone-else" never gets a folder on this volume
    other = volume / "runs" / "fail-fast-neighbour" / "r" / "data.jsonl"
    other.parent.mkdir(parents=True, exist_ok=True)
    other.write_text('{"instruction": "q", "output": "a"}\n')
    datasets = [{"path": str(volume / "nowhere.jsonl"), "type": "alpaca", "ds_type": "json"},
                {"path": str(other), "type": "alpaca", "ds_type": "json"}]
    seen = refuse_in_a_fresh_process(make_job(tiny_args(tiny, datasets=datasets)), env)
    final = seen["events"][-1]
    assert final["code"] == "invalid_config" and "found before Axolotl's check of args" in final["message"], final
    assert final["details"] == [f"args.datasets[0].path: no such file or directory: {volume / 'nowhere.jsonl'}",
                                f"args.datasets[1].path: no such file or directory: {other}"]
    assert not seen["axolotl"]


def test_the_operators_limits_end_the_job_before_axolotl_is_imported(tiny, env):
    """Numbers are read as Axolotl's schema reads them ("5000" is 5000, 64.0 is 64) without importing it."""
    args = tiny_args(tiny, max_steps="5000", sequence_len=2048, adapter="lora", lora_r=64.0, save_total_limit=0)
    limits = {"FINETUNE_MAX_STEPS": "100", "FINETUNE_MAX_SEQUENCE_LEN": "1024", "FINETUNE_MAX_LORA_R": "16", "FINETUNE_MAX_DATASET_BYTES": "10"}
    seen = refuse_in_a_fresh_process(make_job(args), {**env, **limits})
    final = seen["events"][-1]
    assert final["code"] == "invalid_config" and "found before Axolotl's check of args" in final["message"], final
    assert [d.split(":")[0] for d in final["details"]] == \
        ["args.max_steps", "args.sequence_len", "args.lora_r", "args.datasets", "args.save_total_limit"], final["details"]
    assert "5000 is over this worker's limit of 100 (FINETUNE_MAX_STEPS)" in final["details"][0]
    assert "64 is over" in final["details"][2]
    assert not seen["axolotl"]


def test_the_early_reading_of_numbers_uses_axolotls_own_types():
    from finetune_worker.checks import axolotl_schema
    from finetune_worker.checks.validation import EARLY_NUMBER_TYPES, as_axolotl_reads, early_reads

    fields = axolotl_schema.input_config_model().model_fields
    for key, annotation in EARLY_NUMBER_TYPES.items():
        assert fields[key].annotation == annotation, key
        for value in ("5000", " 7 ", 64.0, 1e7, 1.5, "1e3", "many", None, True, float("nan"), [1]):
            assert early_reads(key, value) == as_axolotl_reads(key, value) or value != value, (key, value)
