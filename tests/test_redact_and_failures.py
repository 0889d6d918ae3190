"""The redactor, and how a failed training is named."""

import signal

from finetune_worker import errors
from finetune_worker.failures import diagnose
from finetune_worker.redact import MASK, Redactor, secrets_in_env, secrets_in_raw_input


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
    killed = diagnose(-signal.SIGKILL, ["..."], "training", None)
    assert killed.code == errors.TRAINING_FAILED and "SIGKILL" in killed.message and "RAM" in killed.message
