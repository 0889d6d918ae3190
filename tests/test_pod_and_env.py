"""AXOLOTL_* variables -> an Axolotl config (Pod mode and endpoint defaults), and the prebaked model link."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import collect, make_job, tiny_args
from finetune_worker.contract.envconfig import args_from_env, parse_value
from finetune_worker.contract.settings import REPO_ROOT
from finetune_worker.entry.pod import configure_from_env
from finetune_worker.host.hardware import CPU_ONLY
from finetune_worker.sizing.resources import link_prebaked_model

BASE = {"AXOLOTL_BASE_MODEL": "NousResearch/Llama-3.2-1B", "AXOLOTL_LEARNING_RATE": "0.0002",
        "AXOLOTL_DATASETS": '[{"path":"mhenrichsen/alpaca_2k_test","type":"alpaca"}]'}


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("0.0002", 0.0002), ("8", 8), ("-1", -1), ("true", True), ("false", False), ("True", True), ("no", False),
        ("null", None), ('["q_proj","v_proj"]', ["q_proj", "v_proj"]), ('{"pad_token":"<pad>"}', {"pad_token": "<pad>"}),
        ("NousResearch/Llama-3.2-1B", "NousResearch/Llama-3.2-1B"), ("cosine", "cosine"), ('"123"', "123"),
        ("[not json", "[not json"), ("a: b", "a: b"), ("", ""), ("  spaced  ", "  spaced  "),
    ],
)
def test_values_are_typed_like_json(text, value):
    assert parse_value(text) == value


def test_env_to_args_with_nesting_and_noise():
    env = {**BASE, "AXOLOTL_ADAPTER": "lora", "AXOLOTL_LORA_TARGET_MODULES": '["q_proj","v_proj"]',
           "AXOLOTL_FSDP_CONFIG__FSDP_VERSION": "2", "AXOLOTL_FSDP_CONFIG__OFFLOAD_PARAMS": "true",
           "AXOLOTL_DO_NOT_TRACK": "1", "AXOLOTL_LOG_LEVEL": "INFO", "AXOLOTL_SONICMOE_NVFP4_BWD": "1", "PATH": "/bin", "axolotl_lower": "x"}
    args, origin, problems = args_from_env(env)
    assert problems == []
    assert args == {
        "base_model": "NousResearch/Llama-3.2-1B", "learning_rate": 0.0002, "adapter": "lora",
        "datasets": [{"path": "mhenrichsen/alpaca_2k_test", "type": "alpaca"}],
        "lora_target_modules": ["q_proj", "v_proj"], "fsdp_config": {"fsdp_version": 2, "offload_params": True},
    }
    assert origin["fsdp_config"] == "AXOLOTL_FSDP_CONFIG"


def test_conflicting_and_malformed_nesting_are_problems():
    _, _, problems = args_from_env({"AXOLOTL_SPECIAL_TOKENS": "x", "AXOLOTL_SPECIAL_TOKENS__PAD_TOKEN": "<pad>", "AXOLOTL_A____B": "1"})
    text = [str(p) for p in problems]
    assert any(t.startswith("AXOLOTL_A____B: empty key segment") for t in text)
    assert any("AXOLOTL_SPECIAL_TOKENS is not an object" in t or "conflicts with nested" in t for t in text)


def configure(env, tmp_path, template=None):
    return configure_from_env(env, CPU_ONLY, tmp_path, template)


def test_a_valid_pod_config(tmp_path):
    config, problems = configure({**BASE, "AXOLOTL_ADAPTER": "lora", "AXOLOTL_MICRO_BATCH_SIZE": "2"}, tmp_path)
    assert problems == []
    assert config["micro_batch_size"] == 2 and config["adapter"] == "lora" and config["base_model"] == "NousResearch/Llama-3.2-1B"


def test_bad_values_are_named_by_their_variable(tmp_path):
    _, problems = configure({**BASE, "AXOLOTL_LEARNING_RATE": "fast", "AXOLOTL_NUM_EPOCHS": "three"}, tmp_path)
    text = [str(p) for p in problems]
    assert any(t.startswith("AXOLOTL_LEARNING_RATE: ") for t in text), text
    assert any(t.startswith("AXOLOTL_NUM_EPOCHS: ") for t in text), text


def test_a_typo_gets_the_variable_it_meant(tmp_path):
    _, problems = configure({**BASE, "AXOLOTL_LERNING_RATE": "0.1"}, tmp_path)
    assert [str(p) for p in problems] == [
        "AXOLOTL_LERNING_RATE: unknown option; did you mean 'AXOLOTL_LEARNING_RATE'? (Axolotl would silently ignore it)"
    ]


def test_dataset_problems_point_into_the_json_variable(tmp_path):
    _, problems = configure({**BASE, "AXOLOTL_DATASETS": '[{"path":"mhenrichsen/alpaca_2k_test","type":"alpacca"}]'}, tmp_path)
    assert [str(p) for p in problems] == ["AXOLOTL_DATASETS (datasets[0].type): unknown type 'alpacca'; did you mean 'alpaca'?"]


def test_missing_base_model_and_no_variables(tmp_path):
    env = dict(BASE)
    del env["AXOLOTL_BASE_MODEL"]
    assert any("base_model: required field is missing" in str(p) for p in configure(env, tmp_path)[1])
    assert configure({"PATH": "/bin"}, tmp_path)[1][0].path == "AXOLOTL_*"


def test_a_template_gives_defaults_that_variables_override(tmp_path):
    template = {"base_model": "NousResearch/Llama-3.2-1B", "learning_rate": 1e-5, "adapter": "lora", "lora_r": 8,
                "datasets": [{"path": "mhenrichsen/alpaca_2k_test", "type": "alpaca"}]}
    config, problems = configure({"AXOLOTL_LORA_R": "32"}, tmp_path, template)
    assert problems == [] and config["lora_r"] == 32 and config["learning_rate"] == 1e-5


def test_pod_allows_local_paths_and_remote_code(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n')
    env = {**BASE, "AXOLOTL_DATASETS": '[{"path":"train.jsonl","type":"alpaca"}]', "AXOLOTL_TRUST_REMOTE_CODE": "true"}
    config, problems = configure(env, tmp_path)
    assert problems == [] and config["datasets"][0]["path"] == str(data.resolve())


def test_configure_command_writes_a_yaml_or_lists_problems(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "AXOLOTL_DO_NOT_TRACK": "1", "PYTHONPATH": str(REPO_ROOT / "src"), **BASE}
    out = tmp_path / "config.yaml"
    done = subprocess.run([sys.executable, "-m", "finetune_worker.entry.cli", "configure", "--from-env", "--output", str(out)],
                          env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert yaml.safe_load(out.read_text())["learning_rate"] == 0.0002
    bad = subprocess.run([sys.executable, "-m", "finetune_worker.entry.cli", "configure", "--from-env", "--output", str(tmp_path / "bad.yaml")],
                         env={**env, "AXOLOTL_LOAD_IN_4BIT": "true", "AXOLOTL_ADAPTER": "qlora"}, capture_output=True, text=True,
                         timeout=120, cwd=tmp_path)
    assert bad.returncode == 2 and "AXOLOTL_LOAD_IN_4BIT" in bad.stderr and not (tmp_path / "bad.yaml").exists()


@pytest.mark.training
def test_endpoint_defaults_fill_what_a_job_leaves_out(tiny, env):
    args = tiny_args(tiny, max_steps=3)
    lora_r = args.pop("lora_r")
    endpoint = {**env, "AXOLOTL_LORA_R": str(lora_r), "AXOLOTL_NOT_AN_OPTION": "1"}
    evs = collect(make_job(args), endpoint)
    assert evs[-1]["type"] == "result", evs[-1]
    assert any(e["type"] == "status" and "defaults for lora_r" in e["message"] for e in evs)
    assert any(e["type"] == "warning" and "AXOLOTL_NOT_AN_OPTION" in e["message"] for e in evs)


def test_prebaked_model_is_linked_into_an_empty_volume_cache(tmp_path):
    prebaked = tmp_path / "prebaked"
    snapshot = prebaked / "models--owner--model" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    cache = tmp_path / "volume" / "hub"
    assert link_prebaked_model("owner/model", cache, prebaked)
    assert (cache / "models--owner--model" / "snapshots" / "abc" / "config.json").is_file()
    assert not link_prebaked_model("owner/model", cache, prebaked)  # already there
    assert not link_prebaked_model("owner/other", cache, prebaked)
    assert not link_prebaked_model("/local/model", cache, prebaked)
    assert not link_prebaked_model("owner/model", cache, None)
    assert isinstance(Path(cache / "models--owner--model").resolve(), Path)


def test_the_image_started_as_a_pod_writes_the_config_and_stays_up(tmp_path):
    """`python -u src/handler.py` with RUNPOD_POD_ID set and no job queue: Pod mode."""
    import os
    import signal
    import time

    env = {"PATH": os.environ["PATH"], "HF_HUB_OFFLINE": "1", "AXOLOTL_DO_NOT_TRACK": "1", "RUNPOD_POD_ID": "pod-123",
           "FINETUNE_POD_DIR": str(tmp_path / "finetune"), "PYTHONPATH": str(REPO_ROOT / "src"), **BASE, "AXOLOTL_ADAPTER": "lora"}
    log = tmp_path / "pod.log"
    with open(log, "w") as out:
        pod = subprocess.Popen([sys.executable, "-u", str(REPO_ROOT / "src" / "handler.py")], env=env, stdout=out,
                               stderr=subprocess.STDOUT, cwd=tmp_path, start_new_session=True)
    try:
        config = tmp_path / "finetune" / "config.yaml"
        deadline = time.monotonic() + 120
        while "Next:" not in log.read_text() and time.monotonic() < deadline and pod.poll() is None:
            time.sleep(0.5)
        text = log.read_text()
        assert "Next:" in text and f"axolotl train {config}" in text, text[-2000:]
        assert "not logged in" in text
        written = yaml.safe_load(config.read_text())
        assert written["adapter"] == "lora" and written["output_dir"] == str(tmp_path / "finetune" / "outputs")
        assert pod.poll() is None, "a Pod stays up for interactive use"
    finally:
        os.killpg(pod.pid, signal.SIGTERM)
        pod.wait(30)


def test_a_pod_on_one_machine_trains_with_axolotl_and_on_a_cluster_node_with_torchrun(tmp_path):
    from finetune_worker.entry.pod import training_launch
    from finetune_worker.plan.config import PROGRESS_PLUGIN

    config = {"base_model": "m", "output_dir": str(tmp_path / "outputs"), "adapter": "qlora"}
    config_file = tmp_path / "config.yaml"
    argv, _ = training_launch({"BASE_VOLUME": str(tmp_path)}, config, config_file, tmp_path, gpu_count=8)
    assert argv == ["axolotl", "train", str(config_file)]

    node = {"BASE_VOLUME": str(tmp_path), "PRIMARY_ADDR": "10.65.0.2", "PRIMARY_PORT": "29400", "NODE_RANK": "1",
            "NUM_NODES": "2", "NUM_TRAINERS": "8"}
    argv, env = training_launch(node, config, config_file, tmp_path, gpu_count=8)
    assert argv[1:3] == ["-m", "torch.distributed.run"] and "--rdzv_endpoint" in argv and "10.65.0.2:29400" in argv
    assert argv[argv.index("--node_rank") + 1] == "1" and argv[-3:-1] == [str(config_file), "--spec"]
    assert env["NCCL_SOCKET_IFNAME"] == "ens1" and env["FINETUNE_CLUSTER_STATUS_FILE"].startswith(str(tmp_path / "nodes" / "node-1"))
    spec = json.loads(Path(argv[-1]).read_text())
    assert spec["node_rank"] == 1 and spec["output_dir"] == config["output_dir"] and spec["shared_volume"] is False
    assert PROGRESS_PLUGIN in yaml.safe_load(config_file.read_text())["plugins"]  # save_on_each_node and the timeout reach the Trainer

    with pytest.raises(ValueError, match="args.fsdp_config: .*FINETUNE_SHARED_VOLUME=1"):
        training_launch(node, {**config, "fsdp_config": {"fsdp_version": 2}}, config_file, tmp_path, gpu_count=8)
    with pytest.raises(ValueError, match="NUM_TRAINERS='9'"):
        training_launch({**node, "NUM_TRAINERS": "9"}, config, config_file, tmp_path, gpu_count=8)
