"""mode: generate: a finished run answers prompts; the deploy recipe; the contract of the mode.

One chat LoRA run on the tiny model is trained for the module (about 40 s on CPU) and
answers every generate job here; tests/test_serve.py serves the same kind of run.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from conftest import SECRET_ENV, collect, make_job, tiny_args
from finetune_worker.contract.job import parse_job_input
from finetune_worker.entry.tiny import facts

USER = "gen-user"
# One fact of each kind the tiny model learns: a fruit, an animal, a capital.
THREE_FACTS = [facts()[0], facts()[13], facts()[26]]


def volume_env(volume) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if k not in SECRET_ENV}
    return {**base, "BASE_VOLUME": str(volume), "HF_HUB_OFFLINE": "1", "AXOLOTL_DO_NOT_TRACK": "1"}


def chat_args(tiny) -> dict:
    return tiny_args(tiny, datasets=[{"path": str(tiny / "tiny_chat.jsonl"), "type": "chat_template"}],
                     chat_template="chatml", num_epochs=20, save_steps=90)


@pytest.fixture(scope="module")
def chat_run(tiny, volume) -> str:
    """A finished chat LoRA run of USER that has memorised the facts."""
    job = make_job(chat_args(tiny), user_id=USER, run_id="chat-facts")
    events = collect(job, volume_env(volume))
    assert events[-1]["type"] == "result", events[-1]
    return job["run_id"]


def generate_job(run_id: str, user_id: str = USER, **fields) -> dict:
    return {"user_id": user_id, "mode": "generate", "run_id": run_id, **fields}


@pytest.mark.training
def test_generate_answers_conversations_with_the_trained_facts(chat_run, volume):
    messages = [[{"role": "user", "content": question}] for question, _ in THREE_FACTS]
    events = collect(generate_job(chat_run, messages=messages, max_new_tokens=24), volume_env(volume))
    result = events[-1]
    assert result["type"] == "result" and result["mode"] == "generate", result
    assert [c["completion"] for c in result["completions"]] == [answer for _, answer in THREE_FACTS]
    assert result["completions"][0]["prompt"] == messages[0]
    assert all(c["finish_reason"] == "stop" for c in result["completions"])
    generations = [e for e in events if e["type"] == "generation"]
    assert sorted(e["index"] for e in generations) == [0, 1, 2]
    assert {e["completion"] for e in generations} == {answer for _, answer in THREE_FACTS}
    assert result["prompt_format"] == "chat" and result["checkpoint"] == "final"
    assert result["generation"] == {"max_new_tokens": 24, "temperature": 0.0, "top_p": 1.0}
    recipe = result["deploy"]
    assert recipe["runpod_vllm_worker"]["env"]["ENABLE_LORA"] == "true"
    assert "--enable-lora" in recipe["vllm_serve"] and "--max-model-len=256" in recipe["vllm_serve"]
    # nothing of the job stays in the run but the child's log; the run's own events are untouched
    work = sorted((volume / "runs" / USER / chat_run / "generations").iterdir())[-1]
    assert [p.name for p in work.iterdir()] == ["generate.log"]
    recorded = (volume / "runs" / USER / chat_run / "events.jsonl").read_text()
    assert '"generation"' not in recorded


@pytest.mark.training
def test_plain_prompts_are_formatted_as_the_run_was_trained(chat_run, volume):
    prompts = [question for question, _ in THREE_FACTS]
    result = collect(generate_job(chat_run, prompts=prompts, checkpoint="final"), volume_env(volume))[-1]
    assert [c["completion"] for c in result["completions"]] == [answer for _, answer in THREE_FACTS], result
    assert result["prompt_format"] == "chat"


@pytest.mark.training
def test_a_checkpoint_answers_too_and_a_missing_one_names_those_there_are(chat_run, volume):
    result = collect(generate_job(chat_run, prompts=["What colour is a lemon?"], checkpoint=90, max_new_tokens=4), volume_env(volume))[-1]
    assert result["type"] == "result" and result["checkpoint"] == 90
    assert result["completions"][0]["finish_reason"] == "length" and result["completions"][0]["tokens"] == 4
    error = collect(generate_job(chat_run, prompts=["hi"], checkpoint=7), volume_env(volume))[-1]
    assert error["code"] == "invalid_input" and "no checkpoint at step 7; its checkpoints: 90" in error["message"]


@pytest.mark.training
def test_another_users_run_answers_as_no_such_run(chat_run, volume):
    env = volume_env(volume)
    theirs = collect(generate_job(chat_run, user_id="someone-else", prompts=["What colour is a lemon?"]), env)
    missing = collect(generate_job("never-was", user_id="someone-else", prompts=["What colour is a lemon?"]), env)
    assert theirs[-1]["code"] == missing[-1]["code"] == "run_not_found"
    assert theirs[-1]["message"].replace(chat_run, "RUN") == missing[-1]["message"].replace("never-was", "RUN")
    assert not (volume / "runs" / "someone-else").exists()


@pytest.mark.training
def test_limits_are_checked_before_anything_loads(chat_run, volume):
    env = {**volume_env(volume), "FINETUNE_MAX_GENERATE_PROMPTS": "2", "FINETUNE_MAX_NEW_TOKENS": "16"}
    before = set((volume / "runs" / USER / chat_run / "generations").glob("*"))
    events = collect(generate_job(chat_run, prompts=["a", "b", "c"], max_new_tokens=32), env)
    error = events[-1]
    assert error["code"] == "invalid_input"
    assert any("FINETUNE_MAX_GENERATE_PROMPTS" in d and d.startswith("prompts") for d in error["details"])
    assert any("FINETUNE_MAX_NEW_TOKENS" in d and d.startswith("max_new_tokens") for d in error["details"])
    assert set((volume / "runs" / USER / chat_run / "generations").glob("*")) == before


def test_an_unfinished_run_is_refused_with_what_to_do(volume):
    run_dir = volume / "runs" / USER / "half-done"
    (run_dir / "output").mkdir(parents=True)
    (run_dir / "job.json").write_text("{}")
    (run_dir / "config.yaml").write_text("base_model: x\nadapter: lora\n")
    error = collect(generate_job("half-done", prompts=["hi"]), volume_env(volume))[-1]
    assert error["code"] == "invalid_input" and "has not finished training" in error["message"]
    assert "checkpoint: <step>" in error["message"]


@pytest.mark.parametrize(("fields", "expected"), [
    ({"prompts": ["hi"]}, "run_id: required field is missing"),
    ({"run_id": "r"}, "prompts: give exactly one of prompts"),
    ({"run_id": "r", "prompts": ["hi"], "messages": [[{"role": "user", "content": "hi"}]]}, "prompts: give exactly one of prompts"),
    ({"run_id": "r", "prompts": ["hi"], "args": {}}, "args: not used by mode 'generate'"),
    ({"run_id": "r", "prompts": ["hi"], "model_id": "m"}, "model_id: not used by mode 'generate'"),
    ({"run_id": "r", "prompts": ["hi"], "credentials": {"wandb_api_key": "k"}}, "credentials.wandb_api_key: not used by mode 'generate'"),
    ({"run_id": "r", "messages": [[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]]},
     "messages[0]: ends with the assistant's message"),
    ({"run_id": "r", "prompts": []}, "prompts: List should have at least 1 item"),
    ({"run_id": "r", "prompts": ["hi"], "max_new_tokens": 0}, "max_new_tokens: Input should be greater than or equal to 1"),
    ({"run_id": "r", "prompts": ["hi"], "top_p": 0}, "top_p: Input should be greater than 0"),
    ({"run_id": "r", "prompts": ["hi"], "checkpoint": "best"}, "checkpoint"),
])
def test_the_generate_contract(fields, expected):
    job, problems = parse_job_input({"user_id": "u", "mode": "generate", **fields}, 10**6)
    assert job is None
    assert any(str(p).startswith(expected) for p in problems), [str(p) for p in problems]


def test_generation_fields_are_refused_by_a_training_job(tiny):
    job, problems = parse_job_input(make_job(tiny_args(tiny), prompts=["hi"], temperature=0.5), 10**6)
    assert job is None
    assert {str(p) for p in problems} >= {"prompts: only used by mode 'generate'", "temperature: only used by mode 'generate'"}


def test_a_generate_job_passes_hf_token_only_to_its_child(volume):
    """credentials.hf_token (a gated base model) is accepted by generate, and never in the answer."""
    job, problems = parse_job_input(generate_job("r", prompts=["hi"], credentials={"hf_token": "hf_secret"}), 10**6)
    assert problems == [] and job.credentials.hf_token.get_secret_value() == "hf_secret"


@pytest.mark.training
def test_serve_answers_chat_completions_with_the_fine_tune_and_stops_whole(chat_run, volume):
    """`finetune-worker serve USER/RUN` with transformers serve (no vLLM here): the LoRA is
    merged, the server answers /v1/chat/completions on loopback, and SIGTERM ends its whole tree."""
    import json
    import signal
    import subprocess
    import sys
    import urllib.request

    from finetune_worker.host.children import group_members
    from finetune_worker.host.tools import free_port

    port = free_port()
    cli = subprocess.Popen([sys.executable, "-m", "finetune_worker.entry.cli", "serve", f"{USER}/{chat_run}", "--port", str(port),
                            "--server", "transformers"], env=volume_env(volume), stdout=subprocess.PIPE, text=True)
    try:
        ready = None
        for line in cli.stdout:  # the merge, the start line, then one JSON line once /health answers
            if line.startswith("{"):
                ready = json.loads(line)
                break
        assert ready and ready["ready"] == f"http://127.0.0.1:{port}/v1" and ready["server"] == "transformers", ready
        question, answer = THREE_FACTS[2]
        request = urllib.request.Request(f"{ready['ready']}/chat/completions", method="POST", headers={"Content-Type": "application/json"},
                                         data=json.dumps({"messages": [{"role": "user", "content": question}], "max_tokens": 24,
                                                          "temperature": 0, "stream": False}).encode())
        with urllib.request.urlopen(request, timeout=120) as response:
            reply = json.loads(response.read())
        assert reply["choices"][0]["message"]["content"].strip() == answer, reply
    finally:
        cli.send_signal(signal.SIGTERM)
        code = cli.wait(timeout=60)
    assert code == 0
    assert group_members(ready["pid"]) == [], "the server's process tree outlived the stop"
    assert (volume / "runs" / USER / chat_run / "output" / "merged" / "config.json").is_file()


# ------------------------------------------------------------------ bounds: deadlines, tokens, links
# Runs made by hand (no training): a full fine-tune whose weights are the bundled tiny model.
LOOPING_TEMPLATE = (
    "{%- for m in messages -%}{%- if m['content'] == 'LOOP' -%}"
    "{%- for i in range(100000) -%}{%- for j in range(100000) -%}{%- endfor -%}{%- endfor -%}"
    "{%- endif -%}<|user|>{{ m['content'] }}{%- endfor -%}{%- if add_generation_prompt -%}<|assistant|>{%- endif -%}"
)


def hand_made_run(volume, run_id: str, user_id: str = USER, **config) -> Path:
    """A finished full fine-tune on the volume: the bundled tiny model as its output, a chat template
    that loops on the message 'LOOP', sequence_len 64."""
    import json
    import shutil

    import yaml

    from finetune_worker.contract.settings import REPO_ROOT

    run_dir = Path(volume) / "runs" / user_id / run_id
    shutil.copytree(REPO_ROOT / "examples" / "tiny-llama", run_dir / "output")
    (run_dir / "output" / "chat_template.jinja").write_text(LOOPING_TEMPLATE)
    settings = {"base_model": str(REPO_ROOT / "examples" / "tiny-llama"), "datasets": [{"path": "x.jsonl", "type": "chat_template"}],
                "sequence_len": 64, "output_dir": str(run_dir / "output"), **config}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(settings))
    (run_dir / "job.json").write_text(json.dumps({"run_id": run_id, "model_id": "m", "args": settings}))
    (run_dir / "trained.json").write_text("{}")
    return run_dir


def example_args() -> dict:
    """A LoRA config on the bundled examples (no session assets needed)."""
    return {"base_model": "examples/tiny-llama", "datasets": [{"path": "examples/tiny_alpaca.jsonl", "type": "alpaca", "ds_type": "json"}],
            "adapter": "lora", "lora_r": 16, "lora_target_linear": True, "sequence_len": 256, "learning_rate": 0.002, "max_steps": 2}


def generation_dirs(run_dir) -> list:
    return sorted((run_dir / "generations").iterdir()) if (run_dir / "generations").is_dir() else []


def test_a_chat_template_that_loops_cannot_hold_the_worker(volume):
    import time

    from conftest import live_processes

    run_dir = hand_made_run(volume, "loops")
    started = time.monotonic()
    error = collect(generate_job("loops", messages=[[{"role": "user", "content": "LOOP"}]]),
                    {**volume_env(volume), "FINETUNE_GENERATE_DEADLINE_S": "10"})[-1]
    assert error["code"] == "deadline_exceeded", error
    assert "the generate step was stopped at its deadline (FINETUNE_GENERATE_DEADLINE_S=10 s" in error["message"]
    assert time.monotonic() - started < 60
    work = generation_dirs(run_dir)[-1]
    assert [p.name for p in work.iterdir()] == ["generate.log"], "the spec (the prompts) outlived the job"
    assert live_processes(str(work), ("finetune_worker.serve.generate",)) == []


def test_prompts_are_capped_in_tokens_with_the_index_of_each_one_too_long(volume):
    run_dir = hand_made_run(volume, "capped")
    prompts = ["hello", "word " * 100, "hi", "word " * 8]  # about 420 and 50 tokens once formatted
    error = collect(generate_job("capped", prompts=prompts), volume_env(volume))[-1]
    assert error["code"] == "invalid_input", error
    assert [d.split(":")[0] for d in error["details"]] == ["prompts[1]"]
    assert "over the limit of 64 (the run's sequence_len)" in error["details"][0]
    error = collect(generate_job("capped", prompts=prompts), {**volume_env(volume), "FINETUNE_MAX_PROMPT_TOKENS": "32"})[-1]
    assert [d.split(":")[0] for d in error["details"]] == ["prompts[1]", "prompts[3]"], error
    assert "FINETUNE_MAX_PROMPT_TOKENS" in error["details"][1]
    for work in generation_dirs(run_dir):  # refused, and nothing of the prompts stays on the volume
        assert [p.name for p in work.iterdir()] == ["generate.log"]
        assert "word word" not in (work / "generate.log").read_text()


def test_a_symlinked_run_is_never_followed(volume):
    """A run directory (or a user directory) that is a link could lead anywhere on the volume:
    events, generate and continue_from answer as for a missing run, and a training refuses it."""
    from finetune_worker.checks.validation import validate_job
    from finetune_worker.contract.errors import JobError
    from finetune_worker.contract.settings import WorkerSettings
    from finetune_worker.host import history
    from finetune_worker.host.hardware import CPU_ONLY

    env = volume_env(volume)
    run_dir = hand_made_run(volume, "linked-target")
    (run_dir.parent / "linked").symlink_to(run_dir, target_is_directory=True)
    (volume / "runs" / "link-user").symlink_to(run_dir.parent, target_is_directory=True)
    for user, run_id in ((USER, "linked"), ("link-user", "linked-target")):
        generated = collect(generate_job(run_id, user_id=user, prompts=["hi"]), env)[-1]
        assert generated["code"] == "run_not_found", generated
        with pytest.raises(JobError) as caught:
            history.read_events(volume / "runs", user, run_id, None, None)
        assert caught.value.code == "run_not_found"
        assert run_id not in [r["run_id"] for r in history.list_runs(volume / "runs", user, None, None)["runs"]]
        raw = make_job(example_args(), user_id=user, continue_from={"run_id": run_id})
        with pytest.raises(JobError) as caught:
            validate_job(raw, WorkerSettings.from_env(env), CPU_ONLY)
        assert f"continue_from.run_id: no such run: {run_id!r}" in caught.value.details[0], caught.value.details
    # the run itself is found, so the link is what was refused
    assert "linked-target" in [r["run_id"] for r in history.list_runs(volume / "runs", USER, None, None)["runs"]]
    # a training whose own run directory is a link is refused before it writes anything there
    (run_dir.parent / "train-linked").symlink_to(run_dir.parent / "elsewhere", target_is_directory=True)
    refused = collect(make_job(example_args(), user_id=USER, run_id="train-linked"), env)[-1]
    assert refused["code"] == "invalid_input" and "symbolic link" in refused["message"], refused
    assert not (run_dir.parent / "elsewhere").exists()


def test_paths_in_a_runs_config_are_confined_again(volume):
    """A run's config.yaml naming another user's files is not loaded for generate or continue_from."""
    from finetune_worker.checks.validation import validate_job
    from finetune_worker.contract.errors import JobError
    from finetune_worker.contract.settings import WorkerSettings
    from finetune_worker.host.hardware import CPU_ONLY

    env = volume_env(volume)
    theirs = hand_made_run(volume, "private", user_id="victim")
    hand_made_run(volume, "pointing", base_model=str(theirs / "output"), tokenizer_config=str(theirs / "output"))
    generated = collect(generate_job("pointing", prompts=["hi"]), env)[-1]
    assert generated["code"] == "invalid_input" and "config.yaml's base_model: no such file or directory" in generated["message"], generated
    raw = make_job({**example_args(), "adapter": None, "lora_r": None, "lora_target_linear": None},
                   user_id=USER, continue_from={"run_id": "pointing"})
    raw["args"] = {k: v for k, v in raw["args"].items() if v is not None}
    with pytest.raises(JobError) as caught:
        validate_job(raw, WorkerSettings.from_env(env), CPU_ONLY)
    assert any("cannot be continued: its config.yaml's base_model: no such file" in d for d in caught.value.details), caught.value.details
