"""Publishing: the token checked up front, a verified push with a model card, merged
weights, push_failed and re-push, W&B and TensorBoard. The real huggingface_hub talks
to a loopback Hub (tests/fake_hub.py) through HF_ENDPOINT."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import jwt
import pytest
import yaml

from conftest import collect, collect_until, make_job, tiny_args
from fake_hub import FakeHub, user
from finetune_worker.publish.card import render_model_card
from finetune_worker.publish.hub import HubFailure, token_problem, with_retries

WRITE_TOKEN = "hf_CANARYaliceWriteToken000001"
OPERATOR_TOKEN = "hf_CANARYoperatorAdminToken0001"  # an endpoint's fallback HF_TOKEN: an admin of the organisation acme
USER_TOKEN_SECRET = "operator-secret-0123456789-abcdefghijklmnop"
READ_TOKEN = "hf_aliceReadOnlyToken00000001"
WANDB_CANARY = "CANARYwandbPublishKey000000000000000000001"


# ------------------------------------------------------------------------ unit
def test_token_problem_names_what_is_wrong():
    assert token_problem(user("alice"), "alice/x") is None
    assert "read-only" in token_problem(user("alice", role="read"), "alice/x")
    assert "cannot write to 'bob'" in token_problem(user("alice"), "bob/x")
    assert token_problem(user("alice", orgs=(("acme", "write"),)), "acme/x") is None
    assert "role 'read'" in token_problem(user("alice", orgs=(("acme", "read"),)), "acme/x")
    scoped = {"scoped": [{"entity": {"name": "acme"}, "permissions": ["repo.content.read", "repo.write"]}], "global": []}
    fine = user("alice", role="fineGrained", orgs=(("acme", "admin"),), fine_grained=scoped)
    assert token_problem(fine, "acme/x") is None
    assert "no repo.write permission on 'alice'" in token_problem(fine, "alice/x")


def test_retries_only_transient_errors():
    class Response:
        def __init__(self, status):
            self.status_code = status

    class Failure(Exception):
        def __init__(self, status):
            self.response = Response(status)

    calls, waits = [], []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise Failure(503)
        return "ok"

    assert with_retries(flaky, attempts=5, backoff=1.0, sleep=waits.append) == "ok"
    assert waits == [1.0, 2.0]
    with pytest.raises(Failure):
        with_retries(lambda: (_ for _ in ()).throw(Failure(404)), attempts=5, backoff=1.0, sleep=waits.append)
    assert waits == [1.0, 2.0]


def test_model_card_has_metadata_and_no_local_paths():
    config = {"base_model": "/runpod-volume/models/my-llama", "adapter": "lora", "lora_r": 16, "learning_rate": 2e-4,
              "datasets": [{"path": "mhenrichsen/alpaca_2k_test", "type": "alpaca"}, {"path": "/runpod-volume/data/mine.jsonl"}],
              "output_dir": "/runpod-volume/runs/a/b/output"}
    card = render_model_card(repo_id="alice/x", config=config, metrics={"final_loss": 0.1}, versions={"axolotl": "0.19.0"},
                             has_loss_curve=True, merged="alice/x:merged")
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["library_name"] == "peft" and "axolotl" in meta["tags"] and meta["datasets"] == ["mhenrichsen/alpaca_2k_test"]
    assert "base_model" not in meta
    assert "/runpod-volume" not in card and "my-llama" in card and "mine.jsonl" in card
    assert 'AutoPeftModelForCausalLM.from_pretrained("alice/x")' in card
    assert 'subfolder="merged"' in card and "![Training loss](loss.png)" in card
    hub_card = render_model_card(repo_id="alice/y", config={"base_model": "NousResearch/Llama-3.2-1B"}, metrics={},
                                 versions={}, has_loss_curve=False)
    meta = yaml.safe_load(hub_card.split("---")[1])
    assert meta["base_model"] == "NousResearch/Llama-3.2-1B" and meta["library_name"] == "transformers"


HOSTILE = (
    "a`b", "``", "x|y", "<script>alert(1)</script>", "[x](http://evil.example)", "![img](http://evil.example/i.png)",
    "&lt;b&gt;&#60;", "<http://evil.example>", "www.evil.example", "line\nbreak", "\\|escaped", "*bold* _it_", "</td></tr>",
)


def _tokens(tokens):
    for token in tokens:
        yield token
        yield from _tokens(token.children or [])


def _cells(tokens) -> list[list[str]]:
    """Each table row's cells, as the text they show."""
    rows, row, cell = [], None, None
    for token in tokens:
        if token.type == "tr_open":
            row = []
        elif token.type in ("td_open", "th_open"):
            cell = []
        elif token.type == "inline" and cell is not None:
            cell.append("".join(child.content for child in token.children if child.type in ("text", "code_inline")))
        elif token.type in ("td_close", "th_close"):
            row.append("".join(cell))
            cell = None
        elif token.type == "tr_close":
            rows.append(row)
    return rows


def test_the_model_card_shows_hostile_values_as_written_and_adds_no_html_link_or_cell():
    """Every string from the job (option values, dataset and model names, an earlier run's record,
    metric names, evaluation samples) is shown literally: parsed back as CommonMark with GFM tables,
    the card has no HTML, no link or image but its own, and every table row has its own cells."""
    from markdown_it import MarkdownIt

    from finetune_worker.plan.serving import run_recipe
    from finetune_worker.publish.card import evaluation_sections

    hostile = " ".join(HOSTILE)
    local_base = f"/v/models/{hostile.replace('/', '%')}"
    config = {
        "base_model": local_base, "adapter": "lora", "lora_r": 8, "lora_target_modules": list(HOSTILE), "optimizer": hostile,
        "lr_scheduler": "cosine` | <img src=x onerror=alert(1)>",
        "datasets": [{"path": "org/data"}, {"path": f"/v/data/{hostile.replace('/', '%')}.jsonl"}],
    }
    lineage = {"base_model": local_base, "runs": [
        {"run_id": "first`|<b>", "method": hostile, "datasets": list(HOSTILE)},
        {"run_id": "second", "method": "SFT, LoRA", "datasets": [], "continue_from": {"run_id": hostile, "checkpoint": hostile}},
    ]}
    evaluation = {"examples": 1, "base": {hostile: 0.5}, "finetuned": {hostile: 0.75}, "delta": {hostile: 0.25},
                  "samples": [{"prompt": "```\n<script>x</script>\n```", "reference": hostile, "base": "````", "finetuned": "~~~\n<b>"}]}
    card = render_model_card(
        repo_id="alice/x", config=config, metrics={hostile: 0.5, "final_loss": 0.1}, versions={"axolotl": "0.19.0"},
        has_loss_curve=True, merged="alice/x:merged", lineage=lineage, extra_sections=evaluation_sections(evaluation),
        deploy=run_recipe(config, "bot", "alice/x", adapter=True, lora_rank=8),
    )
    body = card.split("---\n", 2)[2]  # after the YAML front matter, which the Hub reads apart
    tokens = MarkdownIt("commonmark").enable("table").parse(body)
    every = list(_tokens(tokens))
    assert [t.content for t in every if t.type.startswith("html")] == []
    links = [t.attrs.get("href") for t in every if t.type == "link_open"]
    assert links == ["https://github.com/axolotl-ai-cloud/axolotl", "https://huggingface.co/datasets/org/data"]
    assert [t.attrs.get("src") for t in every if t.type == "image"] == ["loss.png"]
    flat = hostile.replace("\n", " ")
    rows = {row[0]: row[1:] for row in _cells(tokens)}
    assert rows["lora_target_modules"] == [str(list(HOSTILE)).replace("\n", " ")]
    assert rows["optimizer"] == [flat] and rows["lr_scheduler"] == [config["lr_scheduler"]]
    assert rows[flat] in (["0.5"], ["0.5", "0.75", "+0.25"])  # the results and the evaluation tables
    assert rows["final_loss"] == ["0.1"]
    fences = [t.content for t in every if t.type == "fence"]
    assert "```\n<script>x</script>\n```\n" in fences and "````\n" in fences and "~~~\n<b>\n" in fences
    shown = " ".join(t.content for t in every if t.type in ("text", "code_inline"))
    assert shown.count(flat) >= 6  # an option, the lineage's method, run and checkpoint, the metrics: shown as written
    assert "/v/models" not in card and "/v/data" not in card


# ------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def hub():
    fake = FakeHub().start()
    fake.tokens[WRITE_TOKEN] = user("alice", orgs=(("acme", "write"),))
    fake.tokens[READ_TOKEN] = user("alice", role="read")
    fake.tokens[OPERATOR_TOKEN] = user("operator", orgs=(("acme", "admin"),))
    yield fake
    fake.close()


@pytest.fixture
def hub_env(env, hub):
    return {**env, "HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "WANDB_MODE": "offline"}


def run_dir(volume: Path, job: dict) -> Path:
    return volume / "runs" / job["user_id"] / job["run_id"]


def assert_no_secret(*blobs: bytes) -> None:
    for blob in blobs:
        assert WRITE_TOKEN.encode() not in blob and WANDB_CANARY.encode() not in blob


@pytest.mark.training
def test_a_job_with_hub_model_id_pushes_adapter_tokenizer_card_and_curve(tiny, hub, hub_env, volume):
    repo = f"alice/tiny-{time.time_ns()}"
    job = make_job(tiny_args(tiny, num_epochs=3, hub_model_id=repo), credentials={"hf_token": WRITE_TOKEN})
    evs = collect(job, hub_env)
    result = evs[-1]
    assert result["type"] == "result", result
    files = hub.files(repo)
    assert result["hub"]["repo_id"] == repo
    assert result["hub"]["revision"] == hub.repos[repo].heads["main"]
    assert result["hub"]["url"] == f"{hub.url}/{repo}"
    assert hub.repos[repo].private is True
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "tokenizer_config.json", "README.md", "loss.png"):
        assert name in files, sorted(files)
    assert not [f for f in files if f.startswith("checkpoint-") or f in ("debug.log", "training_args.bin")]
    assert files["loss.png"].startswith(b"\x89PNG")
    card = files["README.md"].decode()
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["library_name"] == "peft" and "finetune-worker" in meta["tags"]
    assert "![Training loss](loss.png)" in card and "final_loss" in card and "lora_r" in card and "axolotl" in card
    assert str(volume) not in card and "/tmp" not in card
    assert_no_secret(*files.values(), *hub.bodies[-3:], json.dumps(evs).encode())
    stages = [e["stage"] for e in evs if e["type"] == "status"]
    assert stages.index("publishing") < stages.index("training")  # the token check comes first
    tensorboard = list((run_dir(volume, job) / "output" / "runs").rglob("events.out.tfevents.*"))
    assert tensorboard, "every run writes TensorBoard logs"
    # complete: the training child ends without the interpreter's teardown (fastexit.py)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars = EventAccumulator(str(tensorboard[0].parent)).Reload()
    steps = [event.step for event in scalars.Scalars("train/loss")]
    assert steps == list(range(1, result["metrics"]["total_steps"] + 1))
    assert any(name.startswith("runs/") for name in files)


@pytest.mark.training
def test_transient_hub_errors_are_retried_and_a_tenant_publishes_in_its_namespace(tiny, hub, hub_env):
    """On a shared endpoint (user tokens) whose operator named a Hub namespace, a tenant without
    a token of its own publishes with the endpoint's (an organisation admin's) to its own repo
    there: a bare hub_model_id goes to acme/<user_id>__<name>. The push survives two 503s."""
    name = f"retry-{time.time_ns()}"
    repo = f"acme/tester__{name}"
    shared = {**hub_env, "FINETUNE_USER_TOKEN_SECRET": USER_TOKEN_SECRET, "HF_TOKEN": OPERATOR_TOKEN, "FINETUNE_HUB_NAMESPACE": "acme"}
    token = jwt.encode({"sub": "tester", "exp": int(time.time()) + 3600}, USER_TOKEN_SECRET, "HS256")
    hub.fail["commit"] = [503, 503]
    before = hub.count("commit")
    evs = collect(make_job(tiny_args(tiny, max_steps=3, hub_model_id=name, hub_private_repo=False), credentials={"user_token": token}), shared)
    assert evs[-1]["type"] == "result", evs[-1]
    assert hub.count("commit") - before == 3
    assert evs[-1]["hub"]["repo_id"] == repo and hub.repos[repo].private is False
    assert "adapter_model.safetensors" in hub.files(repo) and f"from_pretrained({json.dumps(repo)})" in hub.files(repo)["README.md"].decode()
    assert any(f"so it goes to {repo}" in e.get("message", "") for e in evs)
    assert OPERATOR_TOKEN not in json.dumps(evs)


@pytest.mark.training
@pytest.mark.parametrize(("token", "why"), [("hf_notAValidToken0000000001", "refused"), (READ_TOKEN, "read-only")])
def test_a_bad_or_read_only_token_fails_in_seconds_before_training(tiny, hub, hub_env, volume, token, why):
    job = make_job(tiny_args(tiny, hub_model_id="alice/never"), credentials={"hf_token": token})
    started = time.monotonic()
    evs = collect(job, hub_env)
    assert time.monotonic() - started < 15
    assert evs[-1]["code"] == "auth_error" and why in evs[-1]["message"]
    assert not (run_dir(volume, job) / "train.log").exists()
    assert "progress" not in [e["type"] for e in evs]
    assert token not in json.dumps(evs)


def test_a_repo_without_an_owner_goes_to_the_tokens_user(hub, monkeypatch):
    """`hub_model_id: my-adapter` (as the Hub itself allows): the owner comes from whoami."""
    from huggingface_hub import HfApi, constants

    from finetune_worker.publish.hub import check

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)

    api = HfApi(endpoint=hub.url, token=WRITE_TOKEN)
    assert check(api, "my-adapter") == {"user": "alice", "repo_ids": ["alice/my-adapter"]}
    assert check(api, "acme/x", "my-adapter")["repo_ids"] == ["acme/x", "alice/my-adapter"]
    with pytest.raises(HubFailure, match="cannot push to bob/x: the token belongs to 'alice'"):
        check(api, "acme/x", "bob/x")  # every repo is checked, not only the first


@pytest.mark.training
def test_another_namespace_is_refused_before_training(tiny, hub, hub_env):
    evs = collect(make_job(tiny_args(tiny, hub_model_id="bob/x"), credentials={"hf_token": WRITE_TOKEN}), hub_env)
    assert evs[-1]["code"] == "auth_error" and "cannot write to 'bob'" in evs[-1]["message"]


@pytest.mark.training
def test_push_failed_keeps_artifacts_and_a_resubmission_pushes_without_training(tiny, hub, hub_env, volume):
    repo = f"acme/flaky-{time.time_ns()}"
    job = make_job(tiny_args(tiny, max_steps=4, hub_model_id=repo), credentials={"hf_token": WRITE_TOKEN})
    hub.fail["commit"] = [500] * 5
    evs = collect(job, hub_env)
    error = evs[-1]
    assert error["code"] == "push_failed", error
    output = run_dir(volume, job) / "output"
    assert str(output) in error["message"] and "resubmit the same run_id" in error["message"]
    assert (output / "adapter_model.safetensors").is_file()
    assert_no_secret(json.dumps(evs).encode())

    hub.fail.pop("commit", None)
    again = collect(job, hub_env)
    assert again[-1]["type"] == "result", again[-1]
    assert again[-1]["hub"]["repo_id"] == repo and "adapter_model.safetensors" in hub.files(repo)
    assert "progress" not in [e["type"] for e in again]
    assert any("without training again" in e.get("message", "") for e in again)
    assert (run_dir(volume, job) / "train.log").read_text().count("===== training process") == 1
    # pushing the same artifacts again changes nothing: the same commit comes back
    third = collect(job, hub_env)
    assert third[-1]["reused"] is True and third[-1]["hub"]["revision"] == again[-1]["hub"]["revision"]


def read_gguf(path: Path):
    """The file read back with the gguf package of the worker's llama.cpp (gguf-py)."""
    import os
    import sys

    from finetune_worker.contract.settings import WorkerSettings

    sys.path.insert(0, str(WorkerSettings.from_env(os.environ).llama_cpp_dir / "gguf-py"))
    from gguf import GGUFReader

    return GGUFReader(path)


@pytest.mark.training
def test_a_gguf_export_and_merged_weights_are_pushed_and_a_failed_export_resumes_without_training(tiny_sentencepiece, hub, hub_env, volume):
    """`export:` after a LoRA training: the LoRA is merged, converted to GGUF (q8_0) in output/gguf,
    pushed with the adapter and the merged weights. The first attempt stops once training is done;
    the second finds the base model broken, so the export fails (export_failed); the third, with
    the base model whole again, exports and pushes without training again."""
    base = volume / f"fragile-sentencepiece-base-{time.time_ns()}"
    shutil.copytree(tiny_sentencepiece / "tiny-llama", base)
    repo = f"alice/gguf-{time.time_ns()}"
    args = tiny_args(tiny_sentencepiece, base_model=str(base), max_steps=4, hub_model_id=repo, export={"outtype": "q8_0"})
    job = make_job(args, credentials={"hf_token": WRITE_TOKEN}, publish={"merge_lora": True})
    trained = collect_until(job, hub_env, lambda event: event.get("stage") == "exporting")
    assert trained[-1]["message"] == "merging the LoRA into the base model for the GGUF export", trained[-1]
    weights = (base / "model.safetensors").read_bytes()
    (base / "model.safetensors").write_bytes(b"broken")
    failed = collect(job, hub_env)
    error, output = failed[-1], run_dir(volume, job) / "output"
    assert error["code"] == "export_failed" and "merging the LoRA into its base model failed" in error["message"], error
    assert str(output) in error["message"] and "resubmit the same run_id to export again without training" in error["message"]
    assert repo not in hub.repos

    (base / "model.safetensors").write_bytes(weights)
    evs = collect(job, hub_env)
    result = evs[-1]
    assert result["type"] == "result", result
    assert "progress" not in [e["type"] for e in failed + evs]
    assert (run_dir(volume, job) / "train.log").read_text().count("===== training process") == 1
    gguf = output / "gguf" / "tiny-q8_0.gguf"
    assert result["gguf"] == [str(gguf)] and result["merged_dir"] == str(output / "merged")
    exported = [e for e in evs if e.get("stage") == "exporting"]
    assert exported[-1]["gguf"] == [str(gguf)] and "tiny-q8_0.gguf" in exported[-1]["message"]
    reader = read_gguf(gguf)
    assert reader.fields["general.architecture"].contents() == "llama"
    assert len(reader.tensors) == 2 * 9 + 3  # per layer: 2 norms, 4 attention, 3 MLP; plus embeddings, final norm, head
    assert {t.tensor_type.name for t in reader.tensors if t.name.endswith("attn_q.weight")} == {"Q8_0"}
    files = hub.files(repo)
    assert files["gguf/tiny-q8_0.gguf"] == gguf.read_bytes()
    assert "adapter_model.safetensors" in files and "merged/model.safetensors" in files and "merged/config.json" in files
    card = files["README.md"].decode()
    assert 'subfolder="merged"' in card and "## GGUF" in card and f"hf download {repo} gguf/tiny-q8_0.gguf" in card
    assert_no_secret(*files.values(), *(p.read_bytes() for p in run_dir(volume, job).rglob("*") if p.is_file()))
    # a resubmission of the completed run answers with its stored result, which names the files
    again = collect(job, hub_env)
    assert again[-1]["reused"] is True and again[-1]["gguf"] == [str(gguf)]


@pytest.mark.training
def test_a_failed_merge_still_pushes_the_adapter(tiny, hub, hub_env, volume):
    """A base model that breaks after training: the merge (publish.merge_lora) fails, the adapter is pushed anyway."""
    base = volume / f"fragile-base-{time.time_ns()}"
    shutil.copytree(tiny / "tiny-llama", base)
    other = f"alice/unmerged-{time.time_ns()}"
    job = make_job(tiny_args(tiny, base_model=str(base), max_steps=4, hub_model_id=other), credentials={"hf_token": WRITE_TOKEN})
    hub.fail["commit"] = [500] * 5
    assert collect(job, hub_env)[-1]["code"] == "push_failed"
    hub.fail.pop("commit", None)
    (base / "model.safetensors").write_bytes(b"broken")
    evs = collect({**job, "publish": {"merge_lora": True}}, hub_env)
    assert evs[-1]["type"] == "result", evs[-1]
    assert any(e["type"] == "warning" and e["message"].startswith("merging the LoRA failed") for e in evs)
    assert "adapter_model.safetensors" in hub.files(other) and not [f for f in hub.files(other) if f.startswith("merged/")]


@pytest.mark.training
def test_wandb_offline_logs_the_run_and_the_key_appears_nowhere(tiny, hub_env, volume):
    job = make_job(tiny_args(tiny, max_steps=6), credentials={"wandb_api_key": WANDB_CANARY})
    evs = collect(job, hub_env)
    assert evs[-1]["type"] == "result", evs[-1]
    wandb_status = [e for e in evs if e["type"] == "status" and e["message"].startswith("W&B run")]
    assert wandb_status, [e["message"] for e in evs if e["type"] == "status"]
    assert evs[-1]["wandb"]["project"] == "tiny" and evs[-1]["wandb"]["name"] == job["run_id"]
    # wandb 0.31 keeps an offline run's history in its binary log (protobuf records)
    logs = list((run_dir(volume, job) / "wandb").glob("offline-run-*/run-*.wandb"))
    assert logs, "the offline W&B run lives in the run directory"
    history = logs[0].read_bytes()
    assert history.count(b"train/loss") >= 6 and history.count(b"train/learning_rate") >= 6
    for path in run_dir(volume, job).rglob("*"):
        if path.is_file():
            assert WANDB_CANARY.encode() not in path.read_bytes(), path
    assert WANDB_CANARY not in json.dumps(evs)


@pytest.mark.training
def test_without_a_wandb_key_wandb_is_off_and_says_so(tiny, hub_env, volume):
    job = make_job(tiny_args(tiny, max_steps=3, wandb_project="mine"))
    evs = collect(job, hub_env)
    assert evs[-1]["type"] == "result" and evs[-1]["wandb"] is None
    assert any("W&B is off" in e["message"] for e in evs if e["type"] == "warning")
    assert not (run_dir(volume, job) / "wandb").exists()
    assert (run_dir(volume, job) / "loss.png").is_file()


def test_a_job_with_hub_model_id_without_an_owner_says_where_it_goes(tiny, hub, hub_env):
    """The pipeline resolves the owner before training and says so; the events are read
    up to the token check, and the job is stopped there (no training)."""
    job = make_job(tiny_args(tiny, hub_model_id="my-adapter"), credentials={"hf_token": WRITE_TOKEN})
    evs = collect_until(job, hub_env, lambda event: "may push to" in event.get("message", ""))
    messages = [e.get("message", "") for e in evs]
    assert "hub_model_id 'my-adapter' has no owner, so it goes to the token's user: alice/my-adapter" in messages, evs[-1]
    assert messages[-1] == "the token of 'alice' may push to alice/my-adapter"
    assert "progress" not in [e["type"] for e in evs]


def test_the_card_shows_the_estimate_beside_what_the_run_measured():
    from finetune_worker.publish.card import time_and_cost_section

    measured = {"train_seconds": 120.5, "tokens_per_second": 2100.0, "utilisation": 0.21, "peak_memory_reserved": 30 * 2**30,
                "phases_seconds": {"tokenize": 3.2, "load": 40.0, "train": 120.5}, "cost_usd": 0.21, "duration_seconds": 171.0}
    estimate = {"train_seconds": 100.0, "tokens_per_second": 2500.0, "memory_gib": 31.2, "cost_usd": 0.19, "total_seconds": 160.3,
                "phases_seconds": {"download": 0.0, "load": 45.0, "tokenize": 3.0, "evaluate": 12.3, "train": 100.0}}
    lines = time_and_cost_section(measured, estimate)
    assert "| training time (s) | 100.0 | 120.5 |" in lines and "| peak GPU memory (GiB) | 31.2 | 30.0 |" in lines
    assert "| whole job (s; measured: until this card) | 160.3 | 171.0 |" in lines
    assert "Estimated phases (s): download 0.0, load 45.0, tokenize 3.0, evaluate 12.3, train 100.0" in lines
    assert "| cost (US$; measured: the job until this card) | 0.19 | 0.21 |" in lines
    assert "| utilisation (model FLOPs / peak) | - | 0.21 |" in lines and "Phases (s): tokenize 3.2, load 40.0, train 120.5" in lines
    cpu = time_and_cost_section({"train_seconds": 9.0, "phases_seconds": {}}, None)
    assert "| training time (s) | - | 9.0 |" in cpu and not any("GPU memory" in line for line in cpu)
    assert time_and_cost_section(None, None) == []
