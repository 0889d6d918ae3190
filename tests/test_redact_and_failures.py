"""The redactor, and how a failed training is named."""

import json
import os
import signal
import subprocess
import sys

import pytest

from finetune_worker.contract import errors
from finetune_worker.host.failures import diagnose
from finetune_worker.host.redact import MASK, Redactor, secrets_in_env, secrets_in_raw_input


def test_known_secrets_are_masked_everywhere_in_a_value():
    redactor = Redactor(["super-secret-wandb", "sixsix"])
    event = {"message": "key super-secret-wandb!", "details": ["x super-secret-wandb"], "super-secret-wandb": 1}
    assert redactor.value(event) == {"message": f"key {MASK}!", "details": [f"x {MASK}"], MASK: 1}
    assert redactor.text("sixsix") == MASK


def test_too_short_values_are_not_treated_as_secrets():
    assert Redactor(["abc", "", None]).text("abc") == "abc"


def test_token_shapes_are_masked_even_when_unknown():
    redactor = Redactor()
    assert redactor.text("token=hf_AbCdEfGhIjKlMnOp rest") == f"token={MASK} rest"
    assert redactor.text("WANDB_API_KEY=0123456789abcdef") == f"WANDB_API_KEY={MASK}"
    assert redactor.text("Authorization: Bearer abc.def") == f"Authorization: Bearer {MASK}"
    assert redactor.text("rpa_ABCDEFGH12345678") == MASK


def test_longer_secret_masked_whole_when_it_contains_a_shorter_one():
    assert Redactor(["secret-one", "secret-one-two"]).text("secret-one-two") == MASK


def test_secrets_are_found_in_any_credentials_shape():
    raw = {"credentials": {"hf_token": "hf_x1", "extra": ["nested-secret"], "bad": {"x": "deep"}}, "args": {"a": "public"}}
    assert sorted(secrets_in_raw_input(raw)) == ["deep", "hf_x1", "nested-secret"]
    assert secrets_in_raw_input("not a dict") == []
    assert secrets_in_env({"HF_TOKEN": "hf_env", "PATH": "/bin"}) == ["hf_env"]


def test_diagnosis_from_log_patterns():
    def code(*lines, rc=1, stage="training"):
        return diagnose(rc, list(lines), stage, None).code

    assert code("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate") == errors.OUT_OF_MEMORY
    assert code("OSError: [Errno 28] No space left on device") == errors.DISK_FULL
    assert code("ValueError: unhandled prompt tokenization strategy: foo.") == errors.DATASET_ERROR
    assert code("OSError: x is not a local folder and is not a valid model identifier") == errors.MODEL_LOAD_ERROR
    assert code("huggingface_hub.errors.GatedRepoError: 401 Client Error") == errors.AUTH_ERROR
    assert code("wandb.errors.errors.AuthenticationError: API key must be 40 characters long") == errors.AUTH_ERROR
    assert code("Traceback: something odd", stage="preprocessing") == errors.DATASET_ERROR
    assert code("Traceback: something odd", stage="downloading") == errors.MODEL_LOAD_ERROR
    assert code("Traceback: something odd") == errors.TRAINING_FAILED


def test_nan_wins_and_signals_are_named():
    assert diagnose(0, [], "training", 12).code == errors.NAN_LOSS
    assert "step 12" in diagnose(0, [], "training", 12).message
    killed = diagnose(-signal.SIGTERM, ["..."], "training", None)
    assert killed.code == errors.TRAINING_FAILED and "SIGTERM" in killed.message


def test_host_memory_oom_is_out_of_memory():
    # The kernel's OOM killer sends SIGKILL: a CPU worker's training ends with returncode -9.
    killed = diagnose(-signal.SIGKILL, ["{'loss': 2.1, 'epoch': 0.1}"], "training", None)
    assert killed.code == errors.OUT_OF_MEMORY and "SIGKILL" in killed.message and "RAM" in killed.message
    # Under accelerate launch the launcher exits 1 and torch elastic names the killed rank.
    elastic = ["  exitcode  : -9 (pid: 4242) ", "  traceback : Signal 9 (SIGKILL) received by PID 4242"]
    assert diagnose(1, elastic, "training", None).code == errors.OUT_OF_MEMORY


def test_a_dataloader_worker_killed_by_the_oom_killer_is_out_of_memory():
    # torch's SIGCHLD handler (torch/csrc/DataLoader.cpp: "DataLoader worker (pid {}) is killed by signal: {}. ",
    # the signal named by strsignal), then dataloader.py's own RuntimeError; the trainer itself exits 1.
    tail = [
        "RuntimeError: DataLoader worker (pid 4242) is killed by signal: Killed. ",
        "",
        "The above exception was the direct cause of the following exception:",
        "RuntimeError: DataLoader worker (pid(s) 4242) exited unexpectedly",
    ]
    found = diagnose(1, tail, "training", None)
    assert found.code == errors.OUT_OF_MEMORY, found
    assert "DataLoader worker" in found.message and "dataloader_num_workers" in found.message and "RAM" in found.message
    # another signal (a segfault in a worker) is not named as memory
    assert diagnose(1, ["RuntimeError: DataLoader worker (pid 4242) is killed by signal: Segmentation fault. "], "training", None).code \
        == errors.TRAINING_FAILED


# The messages huggingface_hub and transformers raise, copied from their source in the venv.
OFFLINE_LINES = [
    "huggingface_hub.errors.OfflineModeIsEnabled: Cannot reach https://huggingface.co/api/models/someone/not-cached-model/revision/main: "
    "offline mode is enabled. To disable it, please unset the `HF_HUB_OFFLINE` environment variable.",
    "huggingface_hub.errors.LocalEntryNotFoundError: Cannot find an appropriate cached snapshot folder for the specified revision on "
    "the local disk and outgoing traffic has been disabled. To enable repo look-ups and downloads online, set 'HF_HUB_OFFLINE=0' as "
    "environment variable.",
    "OSError: We couldn't connect to 'https://huggingface.co' to load the files, and couldn't find them in the cached files.",
    "OSError: There was a specific connection error when trying to load someone/not-cached-model:",
]
REMOTE_CODE_LINE = (
    "ValueError: The repository someone/custom-model contains custom code which must be executed to correctly load the model. "
    "You can inspect the repository content at https://hf.co/someone/custom-model .\n"
    "Please pass the argument `trust_remote_code=True` to allow custom code to be run."
)


@pytest.mark.parametrize("line", OFFLINE_LINES)
@pytest.mark.parametrize("stage", [None, "preprocessing", "downloading", "training"])
def test_a_hub_model_not_cached_offline_is_a_model_load_error(line, stage):
    diagnosis = diagnose(1, ["Traceback (most recent call last):", line], stage, None, "someone/not-cached-model")
    assert diagnosis.code == errors.MODEL_LOAD_ERROR
    assert "'someone/not-cached-model'" in diagnosis.message and "download" in diagnosis.message


def test_a_tokenizer_that_needs_remote_code_is_a_model_load_error():
    diagnosis = diagnose(1, [REMOTE_CODE_LINE], "preprocessing", None, "someone/custom-model")
    assert diagnosis.code == errors.MODEL_LOAD_ERROR and "trust_remote_code" in diagnosis.message


def test_network_noise_from_other_services_is_not_a_model_load_error():
    line = "requests.exceptions.ConnectionError: HTTPSConnectionPool(host='api.wandb.ai', port=443): Max retries exceeded with url: /graphql"
    assert diagnose(1, [line, "RuntimeError: something else"], "training", None, "a/b").code == errors.TRAINING_FAILED
    hub = "HTTPSConnectionPool(host='huggingface.co', port=443): Max retries exceeded with url: /api/models/a/b (Caused by NameResolutionError)"
    assert diagnose(1, [hub], "downloading", None, "a/b").code == errors.MODEL_LOAD_ERROR


def test_a_hub_dataset_not_reachable_stays_a_dataset_error():
    line = "ConnectionError: Couldn't reach 'someone/some-dataset' on the Hub (LocalEntryNotFoundError)"
    assert diagnose(1, [line], "preprocessing", None, "someone/model").code == errors.DATASET_ERROR


def test_real_library_errors_are_diagnosed(tmp_path):
    """The exact lines transformers prints, offline, for a Hub id that is not cached and for a
    model directory whose config needs remote code."""
    custom = tmp_path / "custom"
    custom.mkdir()
    (custom / "config.json").write_text(json.dumps({"model_type": "custom-x", "auto_map": {"AutoConfig": "conf.CustomConfig"}}))
    script = (
        "import sys, traceback\n"
        "from transformers import AutoConfig, AutoTokenizer\n"
        "for load, name in ((AutoTokenizer.from_pretrained, 'someone/not-cached-model'), (AutoConfig.from_pretrained, sys.argv[1])):\n"
        "    try:\n"
        "        load(name)\n"
        "    except Exception:\n"
        "        traceback.print_exc()\n"
        "    print('=====', flush=True)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "TRANSFORMERS_VERBOSITY": "error"}
    out = subprocess.run([sys.executable, "-c", script, str(custom)], capture_output=True, text=True, env=env, timeout=300)
    offline, remote, _ = (out.stderr + out.stdout).split("=====")
    diagnosis = diagnose(1, offline.splitlines()[-40:], "preprocessing", None, "someone/not-cached-model")
    assert diagnosis.code == errors.MODEL_LOAD_ERROR and "someone/not-cached-model" in diagnosis.message, offline
    diagnosis = diagnose(1, remote.splitlines()[-40:], "preprocessing", None, str(custom))
    assert diagnosis.code == errors.MODEL_LOAD_ERROR and "trust_remote_code" in diagnosis.message, remote


def test_an_offline_hub_model_that_is_not_cached_fails_fast_as_model_load_error(env, tmp_path):
    """A real job: the training child looks the model up offline and fails; nothing is downloaded."""
    from conftest import collect, make_job
    from finetune_worker.contract.settings import REPO_ROOT

    args = {"base_model": "someone/not-cached-model", "learning_rate": 1e-4, "adapter": "lora", "lora_r": 8, "lora_alpha": 16,
            "lora_target_linear": True, "sequence_len": 128, "micro_batch_size": 1, "num_epochs": 1,
            "datasets": [{"path": str(REPO_ROOT / "examples" / "tiny_alpaca.jsonl"), "type": "alpaca", "ds_type": "json"}]}
    hf_home = tmp_path / "hf"
    final = collect(make_job(args), {**env, "HF_HUB_OFFLINE": "1", "HF_HOME": str(hf_home)})[-1]
    assert final["type"] == "error" and final["code"] == errors.MODEL_LOAD_ERROR, final
    assert "'someone/not-cached-model'" in final["message"]
    assert not list(hf_home.rglob("*.safetensors"))
