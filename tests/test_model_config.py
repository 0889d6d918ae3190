"""The base model's config.json on the first job: fetched from the Hub (a loopback Hub,
tests/fake_hub.py, through HF_ENDPOINT) by a child process before any weights, so the
memory estimate is there from the first job, and a gated or missing model fails in seconds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from conftest import collect, collect_until, make_job, tiny_args
from fake_hub import FakeHub, user
from finetune_worker.host.hardware import Hardware
from finetune_worker.sizing.memory import GIB
from finetune_worker.sizing.resources import directory_facts, estimate_disk, model_facts

H100 = Hardware(gpu_count=2, gpu_names=("NVIDIA H100",) * 2, gpu_memory_bytes=(80 * GIB,) * 2, bf16=True, compute_capability=(9, 0))
LLAMA_3_2_1B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048, "num_hidden_layers": 16,
                "vocab_size": 128256, "intermediate_size": 8192, "num_attention_heads": 32, "num_key_value_heads": 8,
                "tie_word_embeddings": True, "torch_dtype": "bfloat16"}
TOTAL_SIZE = 2_471_645_184  # bytes of bf16 weights: 1,235,822,592 parameters
SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
INDEX = {"metadata": {"total_size": TOTAL_SIZE}, "weight_map": {"embed": SHARDS[0], "lm_head": SHARDS[1]}}
READ_TOKEN = "hf_CANARYmodelConfigReadToken01"
BAD_TOKEN = "hf_CANARYunknownToTheHub000001"


def model_files(index: bool = True) -> dict[str, bytes]:
    files = {"config.json": json.dumps(LLAMA_3_2_1B).encode()}
    if index:
        files["model.safetensors.index.json"] = json.dumps(INDEX).encode()
    return files


@pytest.fixture(scope="module")
def hub():
    fake = FakeHub().start()
    fake.tokens[READ_TOKEN] = user("alice", role="read")
    yield fake
    fake.close()


@pytest.fixture
def hub_env(env, hub, tmp_path):
    """The Hub on, at the loopback Hub; an empty Hub cache (a fresh volume's)."""
    return {**env, "HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path / "hf-home")}


def new_repo(hub: FakeHub, **kwargs) -> str:
    repo_id = f"acme/llama-{uuid.uuid4().hex[:8]}"
    hub.add_model(repo_id, kwargs.pop("files", None) or model_files(), **kwargs)
    return repo_id


def downloads(hub: FakeHub, repo_id: str) -> set[str]:
    return {path.split("/resolve/", 1)[1].split("/", 1)[1] for op, path in hub.calls if op == "resolve" and path.startswith(f"/{repo_id}/")}


def first_events(job: dict, env: dict[str, str], until: str = "memory_estimate_bytes") -> tuple[list[dict], float]:
    """Drive the job until an event carries `until` (or the job ends), then close it:
    nothing after that point runs. (The events, the seconds it took.)"""
    started = time.monotonic()
    seen = collect_until(job, env, lambda event: until in event, hardware=H100)
    return seen, time.monotonic() - started


def hub_job(tiny: Path, repo_id: str, **fields) -> dict:
    return make_job(tiny_args(tiny, base_model=repo_id, num_epochs=1), **fields)


# ------------------------------------------------------------------ model_facts
def snapshot(tmp_path: Path, files: dict[str, bytes]) -> Path:
    directory = tmp_path / "hub" / "models--acme--m" / "snapshots" / ("a" * 40)
    directory.mkdir(parents=True)
    for name, content in files.items():
        (directory / name).write_bytes(content)
    return directory


def test_a_snapshot_with_only_config_and_index_still_needs_its_download(tmp_path):
    snapshot(tmp_path, model_files())
    facts = model_facts("acme/m", tmp_path / "hub")
    assert facts.needs_download and facts.weight_bytes == TOTAL_SIZE and facts.config == LLAMA_3_2_1B
    assert facts.params == TOTAL_SIZE // 2
    disk = estimate_disk({"adapter": "lora", "lora_r": 16, "lora_target_linear": True}, facts)
    assert disk.download == TOTAL_SIZE and "model download" in disk.describe()


def test_a_complete_snapshot_needs_no_download_and_a_config_alone_has_no_size(tmp_path):
    directory = snapshot(tmp_path, {**model_files(), SHARDS[0]: b"x" * 10, SHARDS[1]: b"y" * 10})
    facts = model_facts("acme/m", tmp_path / "hub")
    assert not facts.needs_download and facts.weight_bytes == TOTAL_SIZE
    for shard in SHARDS:
        (directory / shard).unlink()
    (directory / "model.safetensors.index.json").unlink()
    alone = directory_facts(directory)
    assert alone.needs_download and alone.weight_bytes is None and alone.config == LLAMA_3_2_1B
    assert directory_facts(directory, local=True).needs_download is False


# ------------------------------------------------------------- the hub child
def model_config(hub: FakeHub, repo_id: str, home: Path, token: str | None = None) -> tuple[dict, float]:
    child_env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HF_HUB_OFFLINE")}
    child_env.update(HF_ENDPOINT=hub.url, HF_HOME=str(home), PYTHONPATH=str(Path(__file__).parents[1] / "src"))
    if token:
        child_env["HF_TOKEN"] = token
    out = home / "result.json"
    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "finetune_worker.publish.hub", "model-config", "--model", repo_id, "--out", str(out)],
                   env=child_env, capture_output=True, timeout=120)
    return json.loads(out.read_text()), time.monotonic() - started


def test_the_child_downloads_config_and_index_into_the_hub_cache(hub, tmp_path):
    repo = new_repo(hub)
    outcome, _ = model_config(hub, repo, tmp_path)
    assert outcome["ok"] and Path(outcome["config"]).is_file() and Path(outcome["index"]).is_file()
    assert Path(outcome["snapshot"]).parent.parent == tmp_path / "hub" / ("models--" + repo.replace("/", "--"))
    assert downloads(hub, repo) == {"config.json", "model.safetensors.index.json"}
    assert model_facts(repo, tmp_path / "hub").weight_bytes == TOTAL_SIZE

    single = new_repo(hub, files=model_files(index=False))
    outcome, _ = model_config(hub, single, tmp_path)
    assert outcome["ok"] and outcome["index"] is None, "a model without an index is fine"


@pytest.mark.parametrize(
    ("kind", "token", "code", "fragment"),
    [
        ("gated", READ_TOKEN, "auth_error", "is gated: accept its terms"),
        ("gated", None, "auth_error", "is gated"),
        ("bad-token", BAD_TOKEN, "auth_error", "refused the token"),
        ("missing", READ_TOKEN, "model_load_error", "was not found on the Hugging Face Hub"),
        ("private", READ_TOKEN, "model_load_error", "if the repo is private"),
        ("no-config", None, "model_load_error", "has no config.json"),
    ],
)
def test_the_child_names_what_is_wrong(hub, tmp_path, kind, token, code, fragment):
    if kind == "missing":
        repo = f"acme/missing-{uuid.uuid4().hex[:8]}"
    elif kind == "no-config":
        repo = new_repo(hub, files={"README.md": b"# not a model"})
    else:
        repo = new_repo(hub, gated=kind == "gated", private=kind == "private")
    outcome, seconds = model_config(hub, repo, tmp_path, token)
    assert outcome["ok"] is False and outcome["code"] == code and fragment in outcome["message"], outcome
    assert f"base_model '{repo}'" in outcome["message"]
    assert seconds < 20


def test_an_unreachable_hub_is_a_network_failure_not_the_users(hub, tmp_path):
    repo = new_repo(hub)
    hub.fail["resolve"] = [404]  # a 404 without X-Error-Code: not a Hub answer about the repo
    try:
        outcome, _ = model_config(hub, repo, tmp_path)
    finally:
        hub.fail.pop("resolve", None)
    assert outcome["ok"] is False and outcome["code"] == "network", outcome


# ------------------------------------------------------------------ the pipeline
def test_the_first_job_for_a_hub_model_reports_its_memory_estimate_before_any_weights(tiny, hub, hub_env):
    repo = new_repo(hub)
    job = hub_job(tiny, repo, credentials={"hf_token": READ_TOKEN})
    seen, _ = first_events(job, hub_env)
    estimate = seen[-1]
    assert "memory_estimate_bytes" in estimate, seen[-3:]
    assert estimate["stage"] == "preparing" and 0 < estimate["memory_estimate_bytes"] < 80 * GIB
    assert downloads(hub, repo) == {"config.json", "model.safetensors.index.json"}, "no weight file was asked for"
    fetched = [e for e in seen if "config.json from the Hugging Face Hub" in e.get("message", "")]
    assert fetched and "2.3 GiB of weights to download" in fetched[0]["message"]
    assert not any(e["type"] == "warning" and "no memory estimate" in e["message"] for e in seen)
    stages = [e.get("stage") for e in seen]
    assert "training" not in stages and "downloading" not in stages
    assert not any("datasets" in e.get("message", "") and e.get("stage") == "preparing" for e in seen), "the data step comes after"
    resolves = [path for op, path in hub.calls if op == "resolve" and path.startswith(f"/{repo}/")]
    assert resolves, "the child asked the Hub"
    # the token reached the Hub only through the child; the worker's process never held it
    assert READ_TOKEN not in json.dumps(seen) and READ_TOKEN not in os.environ.values()

    calls = len(hub.calls)
    again, _ = first_events(hub_job(tiny, repo), hub_env)
    assert "memory_estimate_bytes" in again[-1], again[-3:]
    assert len(hub.calls) == calls, "a model already in the cache: no child, no request"


@pytest.mark.parametrize(
    ("kind", "code"),
    [("gated", "auth_error"), ("missing", "model_load_error"), ("bad-token", "auth_error")],
)
def test_a_gated_or_missing_model_fails_in_seconds(tiny, hub, hub_env, volume, kind, code):
    repo = f"acme/missing-{uuid.uuid4().hex[:8]}" if kind == "missing" else new_repo(hub, gated=kind == "gated")
    token = BAD_TOKEN if kind == "bad-token" else READ_TOKEN
    job = hub_job(tiny, repo, credentials={"hf_token": token})
    seen, seconds = first_events(job, hub_env)
    error = seen[-1]
    assert error["type"] == "error" and error["code"] == code, error
    assert repo in error["message"] and "base_model" in error["message"]
    assert seconds < 30
    assert token not in json.dumps(seen)
    assert not (volume / "runs" / job["user_id"] / job["run_id"]).exists(), "nothing was started for it"


def test_an_unreachable_hub_is_a_warning_and_the_job_goes_on(tiny, hub_env):
    dead = {**hub_env, "HF_ENDPOINT": "http://127.0.0.1:9"}  # nothing listens on the discard port
    seen, _ = first_events(hub_job(tiny, "acme/unreachable"), dead, until="run_dir")
    warnings = [e["message"] for e in seen if e["type"] == "warning"]
    assert any("no memory estimate: could not read acme/unreachable's config.json" in w for w in warnings), warnings
    assert seen[-1]["type"] == "status" and "run_dir" in seen[-1], seen[-1]


def test_offline_and_local_models_ask_no_hub(tiny, hub, hub_env):
    repo = new_repo(hub)
    calls = len(hub.calls)
    offline, _ = first_events(hub_job(tiny, repo), {**hub_env, "HF_HUB_OFFLINE": "1"}, until="run_dir")
    assert any("no memory estimate" in e.get("message", "") for e in offline), offline
    local, _ = first_events(make_job(tiny_args(tiny, num_epochs=1)), hub_env)
    assert "memory_estimate_bytes" in local[-1], local[-3:]
    assert len(hub.calls) == calls



def test_a_model_baked_into_the_image_asks_no_hub(tiny, hub, hub_env, tmp_path):
    repo = new_repo(hub)
    baked = tmp_path / "baked"
    directory = baked / ("models--" + repo.replace("/", "--")) / "snapshots" / ("b" * 40)
    directory.mkdir(parents=True)
    for name, content in {**model_files(), SHARDS[0]: b"x", SHARDS[1]: b"y"}.items():
        (directory / name).write_bytes(content)
    calls = len(hub.calls)
    seen, _ = first_events(hub_job(tiny, repo), {**hub_env, "FINETUNE_PREBAKED_HF_CACHE": str(baked)})
    assert "memory_estimate_bytes" in seen[-1], seen[-3:]
    assert len(hub.calls) == calls


@pytest.mark.training
def test_a_model_downloaded_from_the_hub_is_measured_apart_from_its_loading(tiny, hub, hub_env):
    """A short training of the tiny model served by the loopback Hub: its weights are fetched by
    the training child, and the result's phases say how long the download and the load took."""
    repo = f"acme/tiny-{uuid.uuid4().hex[:8]}"
    hub.add_model(repo, {path.name: path.read_bytes() for path in (tiny / "tiny-llama").iterdir() if path.is_file()})
    events = collect(make_job(tiny_args(tiny, base_model=repo, max_steps=2), credentials={"hf_token": READ_TOKEN}), hub_env)
    result = events[-1]
    assert result["type"] == "result" and result["status"] == "completed", result
    assert "model.safetensors" in downloads(hub, repo)
    phases = result["measured"]["phases_seconds"]
    assert "download" in phases and phases["load"] > 0 and phases["train"] > 0, phases  # 2 MB on loopback: milliseconds
    assert READ_TOKEN not in json.dumps(events)
