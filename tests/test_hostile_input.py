"""Hostile and random input: only a valid job or a validation error, never anything else."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from conftest import tiny_args
from finetune_worker import errors
from finetune_worker.errors import JobError
from finetune_worker.hardware import CPU_ONLY
from finetune_worker.paths import make_roots
from finetune_worker.plan import build_axolotl_config, run_paths
from finetune_worker.settings import REPO_ROOT, WorkerSettings
from finetune_worker.validation import validate_job


@pytest.fixture(scope="module")
def worker_settings(tmp_path_factory) -> WorkerSettings:
    volume = tmp_path_factory.mktemp("fuzz-volume")
    (volume / "data").mkdir()
    (volume / "data" / "train.jsonl").write_text('{"instruction": "a", "output": "b"}\n')
    (volume / "outside-link").symlink_to("/etc")
    return WorkerSettings(base_volume=volume, examples_dir=REPO_ROOT / "examples")


def job(**fields):
    base = {"user_id": "u", "model_id": "m", "run_id": "r", "args": {"base_model": "examples/tiny-llama", "learning_rate": 1e-4,
            "datasets": [{"path": "data/train.jsonl", "type": "alpaca"}]}}
    base.update(fields)
    return base


def rejected(raw, worker_settings) -> JobError:
    with pytest.raises(JobError) as caught:
        validate_job(raw, worker_settings, CPU_ONLY)
    assert caught.value.code in (errors.INVALID_INPUT, errors.INVALID_CONFIG)
    return caught.value


@pytest.mark.parametrize(
    ("args_update", "where"),
    [
        ({"datasets": [{"path": "../../etc/passwd", "type": "alpaca"}]}, "args.datasets[0].path"),
        ({"datasets": [{"path": "/etc/passwd", "type": "alpaca"}]}, "args.datasets[0].path"),
        ({"datasets": [{"path": "outside-link/passwd", "type": "alpaca"}]}, "args.datasets[0].path"),
        ({"datasets": [{"path": "data/train.jsonl", "type": "alpaca", "data_files": ["/etc/shadow"]}]}, "args.datasets[0].data_files[0]"),
        ({"base_model": "/root"}, "args.base_model"),
        ({"base_model": "https://evil.example/model"}, "args.base_model"),
        ({"tokenizer_config": "../../../"}, "args.tokenizer_config"),
        ({"lora_model_dir": "/tmp"}, "args.lora_model_dir"),
        ({"plugins": ["builtins.exec"]}, "args.plugins[0]"),
        ({"plugins": ["axolotl.integrations.liger.plugin.os"]}, "args.plugins[0]"),
        ({"trust_remote_code": True}, "args.trust_remote_code"),
        ({"datasets": [{"path": "data/train.jsonl", "type": "alpaca", "trust_remote_code": True}]}, "args.datasets[0].trust_remote_code"),
    ],
)
def test_hostile_args_are_rejected_naming_the_field(worker_settings, args_update, where):
    raw = job()
    raw["args"].update(args_update)
    error = rejected(raw, worker_settings)
    assert any(detail.startswith(where + ":") for detail in error.details), error.details


@pytest.mark.parametrize("field", ["user_id", "model_id", "run_id"])
@pytest.mark.parametrize("value", ["../etc", "a/../../b", "/abs", "..", ".", "x\x00y", "é", "a" * 65, 42, None, ["a"]])
def test_hostile_ids_are_rejected(worker_settings, field, value):
    error = rejected(job(**{field: value}), worker_settings)
    assert error.code == errors.INVALID_INPUT
    assert any(detail.startswith(field) for detail in error.details)


def test_remote_config_url_and_oversized_requests_are_rejected(worker_settings):
    assert rejected(job(args="https://example.com/config.yml"), worker_settings).details[0].startswith("args:")
    small = worker_settings.model_copy(update={"max_request_bytes": 2000})
    big = job()
    big["args"]["datasets"][0]["note"] = "x" * 5000
    assert "limit" in rejected(big, small).details[0]


def test_the_default_job_is_valid(worker_settings):
    valid = validate_job(job(), worker_settings, CPU_ONLY)
    assert valid.args["datasets"][0]["path"] == str((worker_settings.base_volume / "data" / "train.jsonl").resolve())


# ---------------------------------------------------------------------------- fuzz
TEXT = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=20)
NASTY = st.sampled_from(["..", ".", "../x", "/etc/passwd", "data/train.jsonl", "examples/tiny-llama", "a/b", "", "~", "%2e%2e",
                         "file:///etc", "s3://b/k", "https://x/y.json", "data/../data/train.jsonl", "outside-link/passwd", "\x00"])
IDS = st.one_of(NASTY, TEXT, st.from_regex(r"[A-Za-z0-9._-]{1,64}", fullmatch=True))
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=False) | TEXT | NASTY,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(TEXT, children, max_size=3),
    max_leaves=8,
)
ARG_KEYS = st.sampled_from(["base_model", "learning_rate", "adapter", "lora_r", "micro_batch_size", "num_epochs", "sequence_len",
                            "output_dir", "dataset_prepared_path", "plugins", "trust_remote_code", "load_in_4bit", "bf16",
                            "hub_model_id", "tokenizer_config", "lora_model_dir", "optimizer", "lerning_rate", "deepspeed"])
DATASET = st.fixed_dictionaries(
    {"path": st.one_of(NASTY, TEXT)},
    optional={"type": st.one_of(st.sampled_from(["alpaca", "alpacca", "chat_template", "completion", "os.system", ""]), JSON),
              "data_files": st.one_of(NASTY, st.lists(NASTY, max_size=2)), "ds_type": JSON, "trust_remote_code": st.booleans()},
)
ARGS = st.one_of(
    JSON,
    st.dictionaries(ARG_KEYS, st.one_of(JSON, NASTY), max_size=6).flatmap(
        lambda d: st.fixed_dictionaries({"datasets": st.one_of(st.lists(DATASET, max_size=2), JSON)}).map(lambda ds: {**d, **ds})
    ),
)
BASE_ARGS = {"base_model": "examples/tiny-llama", "learning_rate": 1e-4, "datasets": [{"path": "data/train.jsonl", "type": "alpaca"}]}
GOOD_ID = st.from_regex(r"[A-Za-z0-9._-]{1,64}", fullmatch=True)
MOSTLY_GOOD_ID = st.one_of(GOOD_ID, GOOD_ID, GOOD_ID, NASTY)
VALIDISH = st.fixed_dictionaries(
    {"user_id": MOSTLY_GOOD_ID, "model_id": MOSTLY_GOOD_ID, "run_id": MOSTLY_GOOD_ID,
     "args": st.dictionaries(ARG_KEYS, st.one_of(JSON, NASTY), max_size=3).map(lambda d: {**BASE_ARGS, **d}),
     "credentials": st.fixed_dictionaries({}, optional={"hf_token": TEXT})},
)
RAW = st.one_of(
    VALIDISH,
    VALIDISH,
    JSON,
    st.fixed_dictionaries(
        {"user_id": IDS, "model_id": IDS, "run_id": IDS, "args": ARGS},
        optional={"credentials": st.one_of(JSON, st.fixed_dictionaries({}, optional={"hf_token": TEXT, "wandb_api_key": JSON})),
                  "restart": JSON, "extra": JSON},
    ),
)


@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture])
@given(raw=RAW)
def test_fuzz_parser_outcomes_are_a_valid_job_or_a_validation_error(worker_settings, raw):
    try:
        valid = validate_job(raw, worker_settings, CPU_ONLY)
    except JobError as error:
        event(f"rejected: {error.code}")
        assert error.code in (errors.INVALID_INPUT, errors.INVALID_CONFIG)
        assert error.details and all(isinstance(d, str) and d for d in error.details)
        return
    event("valid job")
    runs = worker_settings.runs_dir.resolve()
    paths = run_paths(worker_settings.runs_dir, valid.job.user_id, valid.job.run_id)
    assert runs in paths.run_dir.resolve().parents
    plan = build_axolotl_config(valid.args, paths, worker_settings.cache_dir / "prepared", CPU_ONLY)
    run_dir = paths.run_dir.resolve()
    assert run_dir in Path(plan.config["output_dir"]).resolve().parents
    roots = make_roots(worker_settings.base_volume, worker_settings.examples_dir)
    for entry in plan.config.get("datasets") or []:
        path = entry.get("path", "")
        if path.startswith("/"):
            assert roots.contains(Path(path).resolve())


def test_tiny_args_from_conftest_are_valid(worker_settings, tiny):
    # the fixtures the other tests use pass the same validation
    settings_with_tiny = worker_settings.model_copy(update={"base_volume": tiny.parent})
    validate_job(job(args=tiny_args(tiny)), settings_with_tiny, CPU_ONLY)
