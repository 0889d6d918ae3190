"""The endpoint client's pure parts: building a job, reading a final state."""

import json

import yaml

from finetune_worker.entry.client import final_event, job_from_config


def test_yaml_config_becomes_the_args_of_a_new_job(tmp_path):
    config = tmp_path / "llama-fr.yaml"
    config.write_text(yaml.safe_dump({"base_model": "NousResearch/Llama-3.2-1B", "learning_rate": 2e-4}))
    job = job_from_config(config, user_id=None, model_id=None, run_id="r1", credentials={"hf_token": "hf_x"})
    assert job["args"] == {"base_model": "NousResearch/Llama-3.2-1B", "learning_rate": 2e-4}
    assert job["model_id"] == "llama-fr" and job["run_id"] == "r1" and job["user_id"] == "me"
    assert job["credentials"] == {"hf_token": "hf_x"}


def test_job_json_is_used_as_is_with_command_line_ids_winning(tmp_path):
    path = tmp_path / "job.json"
    path.write_text(json.dumps({"input": {"user_id": "a", "model_id": "m", "run_id": "r", "args": {"x": 1}}}))
    job = job_from_config(path, user_id="b", model_id=None, run_id=None, credentials={})
    assert job == {"user_id": "b", "model_id": "m", "run_id": "r", "args": {"x": 1}}


def test_final_event_from_each_terminal_state():
    result = {"type": "result", "status": "completed"}
    assert final_event({"status": "COMPLETED", "output": [{"type": "status"}, result]}) == result
    error = {"code": "invalid_config", "message": "m", "details": ["d"], "log_tail": []}
    assert final_event({"status": "FAILED", "error": json.dumps(error)}) == {"type": "error", **error}
    assert final_event({"status": "FAILED", "error": "plain text"})["message"] == "plain text"
    assert final_event({"status": "CANCELLED"})["code"] == "cancelled"
    assert "TIMED_OUT" in final_event({"status": "TIMED_OUT"})["message"]


def test_a_history_job_carries_only_what_its_mode_reads():
    from finetune_worker.contract.job import parse_job_input
    from finetune_worker.entry.client import history_job

    assert history_job("runs", "me") == {"user_id": "me", "mode": "runs"}
    job = history_job("events", "me", run_id="r1", limit=10, offset=20, user_token="jwt")
    assert job == {"user_id": "me", "mode": "events", "run_id": "r1", "limit": 10, "offset": 20, "credentials": {"user_token": "jwt"}}
    assert parse_job_input(job, 1 << 20)[1] == []
