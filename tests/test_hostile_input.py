"""Hostile and random input: only a valid job or a validation error, never anything else."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from conftest import tiny_args
from finetune_worker.checks.paths import make_roots
from finetune_worker.checks.validation import validate_job
from finetune_worker.contract import errors
from finetune_worker.contract.errors import JobError
from finetune_worker.contract.settings import REPO_ROOT, WorkerSettings
from finetune_worker.host.hardware import CPU_ONLY
from finetune_worker.host.rundir import run_paths
from finetune_worker.plan.config import build_axolotl_config


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
        ({"model_kwargs": {"trust_remote_code": True}}, "args.model_kwargs.trust_remote_code"),
        ({"processor_kwargs": {"auto_map": {"AutoTokenizer": "evil.Tokenizer"}}}, "args.processor_kwargs.auto_map"),
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
# st.text() never draws lone surrogates (category Cs) by default: they come from their own alphabet, one character in four.
SURROGATES = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF, exclude_categories=())
CHARS = st.one_of(st.characters(codec="utf-8"), st.characters(codec="utf-8"), st.characters(codec="utf-8"), SURROGATES)
TEXT = st.text(alphabet=CHARS, max_size=20)
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


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture])
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


# ------------------------------------------------------- odd values: named codes only
NAMED_REFUSALS = (errors.INVALID_INPUT, errors.INVALID_CONFIG, errors.DATASET_ERROR)


def nested(depth: int, leaf=1):
    value = leaf
    for index in range(depth):
        value = [value] if index % 2 else {"k": value}
    return value


@pytest.mark.parametrize(
    ("args_update", "where", "code"),
    [
        ({"base_model": "a" * 300}, "args.base_model", errors.INVALID_CONFIG),  # ENAMETOOLONG
        ({"base_model": "examples/" + "a" * 300}, "args.base_model", errors.INVALID_CONFIG),
        ({"datasets": [{"path": "data/" + "b" * 300 + ".jsonl", "type": "alpaca"}]}, "args.datasets[0].path", errors.INVALID_CONFIG),
        ({"lora_model_dir": "/" + "c" * 300}, "args.lora_model_dir", errors.INVALID_CONFIG),
        ({"deepspeed": "\x00"}, "args.deepspeed", errors.INVALID_CONFIG),  # ValueError: embedded null byte
        ({"deepspeed": "d" * 300}, "args.deepspeed", errors.INVALID_CONFIG),
        ({"note": nested(900)}, "input", errors.INVALID_INPUT),  # RecursionError
        ({"datasets": [{"type": "alpaca", "rows": [{"instruction": "a\ud800", "output": "b"}]}]},
         "args.datasets[0].rows[0].instruction", errors.INVALID_INPUT),  # UnicodeEncodeError
        ({"plugins": ["axolotl.integrations.base.importlib"]}, "args.plugins[0]", errors.INVALID_CONFIG),  # TypeError
        ({"learning_rate": float("nan")}, "args.learning_rate", errors.INVALID_INPUT),
        ({"learning_rate": float("inf")}, "args.learning_rate", errors.INVALID_INPUT),
        ({"weight_decay": float("-inf")}, "args.weight_decay", errors.INVALID_INPUT),
        ({"datasets": [{"path": "data/train.jsonl", "type": "alpaca", "x\udcff": 1}]}, "args.datasets[0].x\\udcff", errors.INVALID_INPUT),
    ],
)
def test_odd_values_end_with_a_named_refusal(worker_settings, args_update, where, code):
    raw = job()
    raw["args"].update(args_update)
    with pytest.raises(JobError) as caught:
        validate_job(raw, worker_settings, CPU_ONLY)
    assert caught.value.code == code
    assert any(detail.startswith(where + ":") for detail in caught.value.details), caught.value.details
    assert all(detail.encode() for detail in caught.value.details)  # printable: no lone surrogate left


def test_non_finite_numbers_outside_args_are_refused(worker_settings):
    raw = job(evaluation={"dataset": {"rows": [{"instruction": "a", "output": "b"}]}, "min_improvement": float("inf")})
    error = rejected(raw, worker_settings)
    assert any(d.startswith("evaluation.min_improvement: must be a finite number") for d in error.details)


def test_odd_input_through_the_whole_job_never_ends_internal(volume, env):
    from conftest import collect, make_job

    for args in ({"base_model": "x" * 300, "datasets": [{"path": "data/train.jsonl", "type": "alpaca"}]},
                 {"base_model": "a/b", "learning_rate": float("nan"), "note": nested(950)},
                 {"base_model": "a/b", "datasets": [{"type": "alpaca", "rows": [{"instruction": "\udc80", "output": "b"}]}]}):
        final = collect(make_job(args, mode="preflight"), env)[-1]
        assert final["type"] == "error" and final["code"] in NAMED_REFUSALS, final


DEEP_DEPTHS = st.integers(0, 1200)
ODD_TEXT = st.one_of(
    st.text(alphabet=CHARS, max_size=40),  # lone surrogates included
    st.text(alphabet="abc/._-~\\ ", min_size=200, max_size=600),
    st.sampled_from(["a" * 256, "a/" + "b" * 300, "/" + "c" * 4100, "x\ud800y", "\udfff", "data/" + "d" * 300 + ".jsonl",
                     "examples/" + "e" * 255, "e" * 255, "\x00", "..", "~root", "\n", "%s%n", "\u202e"]),
)
ODD_NUMBER = st.one_of(
    st.floats(), st.sampled_from([float("nan"), float("inf"), float("-inf"), 1e308, -1e308, 5e-324]),
    st.integers(-10**30, 10**30), st.just(10**400), st.just(-(10**400)),
)
ODD_LEAF = st.one_of(ODD_TEXT, ODD_NUMBER, st.booleans(), st.none())
ODD_VALUE = st.one_of(ODD_LEAF, st.builds(nested, DEEP_DEPTHS, ODD_LEAF),
                      st.lists(ODD_LEAF, max_size=3), st.dictionaries(ODD_TEXT, ODD_LEAF, max_size=2))
PATH_OPTIONS = ("base_model", "base_model_config", "tokenizer_config", "lm_eval_model", "lora_model_dir", "resume_from_checkpoint",
                "deepspeed", "chat_template_jinja", "output_dir", "dataset_prepared_path", "hub_model_id", "axolotl_config_path",
                "push_dataset_to_hub", "cache_dir", "plugins")
ODD_KEYS = st.one_of(st.sampled_from(PATH_OPTIONS), st.sampled_from(["learning_rate", "num_epochs", "max_steps", "sequence_len",
                     "lora_r", "micro_batch_size", "warmup_ratio", "weight_decay", "max_grad_norm", "lora_dropout"]), ODD_TEXT)
ODD_DATASET = st.fixed_dictionaries(
    {"type": st.one_of(st.just("alpaca"), ODD_VALUE)},
    optional={"path": ODD_VALUE, "data_files": st.one_of(ODD_VALUE, st.lists(ODD_TEXT, max_size=2)),
              "rows": st.lists(st.dictionaries(st.sampled_from(["instruction", "output", "input"]), ODD_VALUE, max_size=3), max_size=2),
              "chat_template_jinja": ODD_VALUE},
)
ODD_REQUEST = st.fixed_dictionaries(
    {"user_id": st.one_of(GOOD_ID, GOOD_ID, GOOD_ID, ODD_TEXT), "model_id": GOOD_ID, "run_id": st.one_of(GOOD_ID, GOOD_ID, ODD_TEXT),
     "args": st.one_of(
         st.dictionaries(ODD_KEYS, ODD_VALUE, max_size=4).map(lambda d: {**BASE_ARGS, **d}),
         st.lists(ODD_DATASET, min_size=1, max_size=2).map(lambda ds: {**BASE_ARGS, "datasets": ds}),
         ODD_VALUE,
     )},
    optional={"credentials": st.dictionaries(st.sampled_from(["hf_token", "wandb_api_key", "x"]), ODD_VALUE, max_size=2),
              "evaluation": ODD_VALUE, "num_processes": ODD_NUMBER, "mode": st.sampled_from(["train", "preflight", "\ud800"])},
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture])
@given(raw=ODD_REQUEST)
def test_fuzz_odd_values_end_with_a_named_code(worker_settings, raw):
    """Deep nesting, long and odd strings, surrogates, NaN/Infinity, huge numbers, every path
    option: validation and the plan either accept the job or refuse it by name."""
    try:
        valid = validate_job(raw, worker_settings, CPU_ONLY)
        paths = run_paths(worker_settings.runs_dir, valid.job.user_id, valid.job.run_id)
        build_axolotl_config(valid.args, paths, worker_settings.cache_dir / "prepared", CPU_ONLY)
    except JobError as error:
        event(f"refused: {error.code}")
        assert error.code in NAMED_REFUSALS, error
        assert all(detail.encode() for detail in error.details)
        return
    event("accepted")


@pytest.mark.parametrize("depth", [900, 10_000])
def test_the_cli_never_raises_out_on_deep_json(tmp_path, volume, depth):
    import json
    import os
    import subprocess
    import sys

    job_file = tmp_path / "deep.json"
    job_file.write_text('{"input": {"user_id": "u", "model_id": "m", "run_id": "r", "args": {"x": ' + "[" * depth + "]" * depth + "}}}")
    env = {**os.environ, "BASE_VOLUME": str(volume), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT / "src")}
    out = subprocess.run([sys.executable, "-m", "finetune_worker.entry.cli", "run", str(job_file), "--json"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode not in (0,) and "Traceback" not in out.stderr, out.stderr[-2000:]
    final = json.loads(out.stdout.strip().splitlines()[-1])
    assert final["type"] == "error" and final["code"] == errors.INVALID_INPUT and "nested" in (final["message"] + str(final["details"]))


# ------------------------------------------------- every path option, odd values only
def _path_option_names() -> list[str]:
    """Every option the security table says names a place (a model, dataset, file, Hub repo or code)."""
    from finetune_worker.checks.options import CLASSIFIED, Kind

    kinds = (Kind.MODEL, Kind.DATA, Kind.READ, Kind.TEMPLATE, Kind.HUB, Kind.FILE_NAME, Kind.WORKER, Kind.CODE)
    return sorted(name for name, kind in CLASSIFIED.items() if kind in kinds)


MAPPING_OPTIONS = ("overrides_of_model_kwargs", "overrides_of_model_config", "bnb_config_kwargs", "model_quantization_config_kwargs",
                   "processor_kwargs", "trl.generation_kwargs", "deepspeed")
MAPPING_PATH_KEYS = ("cache_dir", "offload_folder", "pretrained_model_name_or_path", "nvme_path", "output_file", "log_dir", "my_path")
# One place each, drawn evenly: every path option, each dataset list's location fields, the eval dataset, mapping options.
PATH_PLACES = st.sampled_from(
    [("option", name) for name in [*_path_option_names(), "cache_dir"]]
    + [("dataset", key, field) for key in ("datasets", "test_datasets", "pretraining_dataset")
       for field in ("path", "data_files", "chat_template_jinja", "input_transform", "type")]
    + [("evaluation",)]
    + [("mapping", option) for option in MAPPING_OPTIONS]
)
PATHISH = st.one_of(NASTY, ODD_TEXT, st.builds(lambda a, b: f"{a}/{b}", st.sampled_from(["data", "examples", "outside-link", "..", ""]), ODD_TEXT))
PATH_VALUE = st.one_of(PATHISH, PATHISH, ODD_VALUE, st.lists(PATHISH, min_size=1, max_size=2))


def place(where: tuple, value, mapping_key: tuple[str, bool] = ("cache_dir", False)) -> dict:
    """A default job with `value` put at `where` (inside a mapping option: under `mapping_key`'s key, nested a level deeper or not)."""
    raw = job()
    args = raw["args"]
    if where[0] == "option":
        head, _, rest = where[1].partition(".")
        if where[1].startswith("datasets."):
            args["datasets"] = [{**args["datasets"][0], rest: value}]
        else:
            args[head] = {rest: value} if rest else value
    elif where[0] == "dataset":
        entry = {"path": "data/train.jsonl", "type": "alpaca", where[2]: value}
        args[where[1]] = [entry]
    elif where[0] == "evaluation":
        raw["evaluation"] = {"dataset": {"path": value}}
    else:
        option, key, deeper = where[1], *mapping_key
        head, _, rest = option.partition(".")
        inner = {"nested": {key: value}} if deeper else {key: value}
        args[head] = {rest: inner} if rest else inner
    return raw


def test_the_path_places_cover_the_options_the_audit_named():
    names = set(_path_option_names())
    assert {"deepspeed", "lm_eval_model", "tokenizer_config", "resume_from_checkpoint", "output_dir", "hub_model_id",
            "axolotl_config_path", "plugins", "dynamic_checkpoint.trigger_file_path", "trackio_space_id",
            "datasets.path", "datasets.data_files"} <= names


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture])
@given(where=PATH_PLACES, value=PATH_VALUE, mapping_key=st.tuples(st.sampled_from(MAPPING_PATH_KEYS), st.booleans()))
def test_fuzz_every_path_option_ends_with_a_named_code(worker_settings, where, value, mapping_key):
    """Each place that names a file, directory, model, dataset or repo, given odd values:
    validation and the plan accept the job or refuse it by name, never anything else."""
    event(f"place: {where[0]}")
    raw = place(where, value, mapping_key)
    try:
        valid = validate_job(raw, worker_settings, CPU_ONLY)
        paths = run_paths(worker_settings.runs_dir, valid.job.user_id, valid.job.run_id)
        plan = build_axolotl_config(valid.args, paths, worker_settings.cache_dir / "prepared", CPU_ONLY)
    except JobError as error:
        assert error.code in NAMED_REFUSALS, error
        assert all(detail.encode() for detail in error.details)
        return
    event("accepted")
    roots = make_roots(worker_settings.base_volume, worker_settings.examples_dir)
    for key in ("datasets", "test_datasets", "pretraining_dataset"):
        for entry in plan.config.get(key) or []:
            for name in [entry.get("path")] + (entry.get("data_files") if isinstance(entry.get("data_files"), list) else [entry.get("data_files")]):
                if isinstance(name, str) and name.startswith("/"):
                    resolved = Path(name).resolve()
                    assert roots.contains(resolved) or paths.run_dir.resolve() in resolved.parents, (key, name)


# -------------------------------------- generated requests through the whole job and the CLI
KNOWN_CODES = {value for name, value in vars(errors).items() if name.isupper() and isinstance(value, str)} - {errors.INTERNAL_ERROR}
ANY_REQUEST = st.one_of(RAW, ODD_REQUEST)


@pytest.fixture(scope="module")
def fuzz_env(worker_settings) -> dict[str, str]:
    from conftest import SECRET_ENV

    base = {k: v for k, v in os.environ.items() if k not in SECRET_ENV and not k.startswith(("FINETUNE_", "AXOLOTL_"))}
    return {**base, "BASE_VOLUME": str(worker_settings.base_volume), "HF_HUB_OFFLINE": "1", "AXOLOTL_DO_NOT_TRACK": "1"}


def refused_cheaply(raw, env: dict[str, str]):
    """`raw` in preflight mode (never a training), or None when validation accepts it: an
    accepted request would go on to load a model, which these tests leave to others."""
    if isinstance(raw, dict) and raw.get("mode", "train") == "train":
        raw = {**raw, "mode": "preflight"}
    try:
        validate_job(raw, WorkerSettings.from_env(env), CPU_ONLY)
    except JobError:
        return raw
    return None


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture])
@given(raw=ANY_REQUEST)
def test_fuzz_refused_requests_end_the_whole_job_with_a_named_code(fuzz_env, raw):
    """A job only ever ends with a named code, never internal_error, and its events are JSON."""
    from conftest import collect

    raw = refused_cheaply(raw, fuzz_env)
    if raw is None:
        event("accepted by validation: not run")
        return
    out = collect(raw, fuzz_env, CPU_ONLY)
    final = out[-1]
    event(f"ended: {final.get('code', final['type'])}")
    assert final["type"] == "error" and final["code"] in KNOWN_CODES, final
    assert [e for e in out if e["type"] in ("error", "result")] == [final]
    json.dumps(out).encode()  # every event is JSON a client can read: no NaN object, no lone surrogate left


JOB_FILE = st.one_of(
    ANY_REQUEST.map(lambda raw: ("input", raw)),
    ANY_REQUEST.map(lambda raw: ("bare", raw)),
    st.binary(max_size=200).map(lambda data: ("bytes", data)),
    st.text(alphabet=CHARS, max_size=200).map(lambda text: ("text", text)),
)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture])
@given(content=JOB_FILE, as_json=st.booleans())
def test_fuzz_the_cli_returns_an_exit_code_and_never_raises(fuzz_env, tmp_path_factory, content, as_json):
    """`finetune-worker run FILE` in-process on generated job files (refused ones: no model
    loads), printing to a strict UTF-8 stdout as a terminal's is: an exit code, never a traceback."""
    import contextlib
    import io
    from unittest import mock

    from finetune_worker.entry.cli import main

    kind, value = content
    job_file = tmp_path_factory.mktemp("job") / "job.json"
    if kind in ("input", "bare"):
        raw = refused_cheaply(value, fuzz_env)
        if raw is None:
            event("accepted by validation: not run")
            return
        try:
            job_file.write_text(json.dumps({"input": raw} if kind == "input" else raw), encoding="utf-8", errors="surrogatepass")
        except (RecursionError, ValueError):
            event("not JSON-serialisable: not run")
            return
    elif kind == "bytes":
        job_file.write_bytes(value)
    else:
        job_file.write_text(value, encoding="utf-8", errors="surrogatepass")
    stdout = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="strict", line_buffering=True)
    with mock.patch.dict(os.environ, fuzz_env, clear=True), contextlib.redirect_stdout(stdout):
        code = main(["run", str(job_file), *(["--json"] if as_json else [])])
    event(f"exit {code}")
    assert isinstance(code, int) and code != 0
    stdout.flush()
    printed = stdout.buffer.getvalue().decode("utf-8")
    if as_json and printed.strip():
        final = json.loads(printed.strip().splitlines()[-1])
        assert final["type"] == "error" and final["code"] in KNOWN_CODES, final
