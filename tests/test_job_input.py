"""The job contract's top level: ids, credentials, unknown fields."""

import pytest

from finetune_worker.contract.job import JobInput, format_loc, parse_job_input

LIMIT = 10 * 1024 * 1024


def job(**fields):
    base = {"user_id": "alice", "model_id": "llama-fr", "run_id": "2026-11-23-a", "args": {"base_model": "x/y"}}
    base.update(fields)
    return base


def paths(problems):
    return [p.path for p in problems]


def test_valid_job_parses_and_credentials_are_secret():
    parsed, problems = parse_job_input(job(credentials={"hf_token": "hf_abcdefghijklmnop"}), LIMIT)
    assert problems == []
    assert isinstance(parsed, JobInput)
    assert "hf_abcdefghijklmnop" not in repr(parsed)
    assert "hf_abcdefghijklmnop" not in parsed.model_dump_json()
    assert parsed.credentials.hf_token.get_secret_value() == "hf_abcdefghijklmnop"


def test_credentials_are_optional():
    parsed, problems = parse_job_input(job(), LIMIT)
    assert problems == [] and parsed.credentials.hf_token is None


@pytest.mark.parametrize("bad", ["../x", "..", ".", "a/b", "", "x" * 65, "naïve", "a b", "/abs", "a\\b"])
def test_ids_must_be_safe_directory_names(bad):
    _, problems = parse_job_input(job(run_id=bad), LIMIT)
    assert paths(problems) == ["run_id"]
    assert "letters, digits" in problems[0].message or "must not be" in problems[0].message


@pytest.mark.parametrize("good", ["a", "A-b_c.1", "x" * 64, "2026-11-23-a", "..a"])
def test_safe_ids_are_accepted(good):
    _, problems = parse_job_input(job(user_id=good), LIMIT)
    assert problems == []


@pytest.mark.parametrize("field", ["user_id", "model_id", "run_id"])
def test_an_id_cannot_start_with_a_dash(field):
    """An id may end up as a program's argument (`--served-model-name=...`, `serve USER/RUN`):
    '-rf' or '--api-key=x' would read as an option there."""
    for bad in ("-rf", "--api-key=x", "-"):
        _, problems = parse_job_input(job(**{field: bad}), LIMIT)
        assert paths(problems) == [field] and "not starting with '-'" in problems[0].message
    _, problems = parse_job_input(job(continue_from={"run_id": "--help"}), LIMIT)
    assert paths(problems) == ["continue_from.run_id"]
    assert parse_job_input(job(**{field: "a-"}), LIMIT)[1] == []


def test_every_problem_is_reported_at_once_with_hints():
    raw = job(user_id="a/b", run_id="../x", credential={"hf_token": "x"})
    raw.pop("model_id")
    _, problems = parse_job_input(raw, LIMIT)
    text = [str(p) for p in problems]
    assert "model_id: required field is missing" in text
    assert any(t.startswith("user_id: invalid id") for t in text)
    assert any(t.startswith("run_id: invalid id") for t in text)
    assert "credential: unknown field; did you mean 'credentials'?" in text


def test_unknown_credential_key_is_named():
    _, problems = parse_job_input(job(credentials={"hf_tokn": "x"}), LIMIT)
    assert [str(p) for p in problems] == ["credentials.hf_tokn: unknown field; did you mean 'hf_token'?"]


def test_args_must_be_an_object_not_a_url():
    _, problems = parse_job_input(job(args="https://example.com/config.yml"), LIMIT)
    assert paths(problems) == ["args"]


def test_input_must_be_an_object_and_not_oversized():
    assert paths(parse_job_input(["not", "a", "dict"], LIMIT)[1]) == ["input"]
    big = job(args={"base_model": "x/y", "padding": "x" * 2000})
    assert "limit" in parse_job_input(big, 1000)[1][0].message


def test_format_loc():
    assert format_loc(("args", "datasets", 0, "type")) == "args.datasets[0].type"
    assert format_loc(()) == ""
