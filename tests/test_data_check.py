"""The cheap data step: inline rows and URLs into the run dir, rows checked, cache keyed by content."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from conftest import collect, make_job, tiny_args
from finetune_worker import errors
from finetune_worker.data import (
    DownloadRules,
    check_dataset,
    check_datasets,
    data_fingerprint,
    download,
    materialise,
    row_problem,
    row_shape,
)
from finetune_worker.errors import JobError
from finetune_worker.plan import localise_datasets
from loopback_sites import Site, file, make_cert


def write_lines(path: Path, rows: list) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows), encoding="utf-8")
    return path


ALPACA = {"type": "alpaca"}
GOOD = {"instruction": "What colour is a lime?", "input": "", "output": "A lime is green."}


@pytest.mark.parametrize(
    ("entry", "row", "problem"),
    [
        (ALPACA, {"instruction": "q"}, "missing field 'output' (this dataset type needs instruction and output)"),
        (ALPACA, {"instruction": "q", "output": 3}, "field 'output' must be a string, not int"),
        (ALPACA, ["q", "a"], "is list, not an object"),
        ({"type": "completion"}, {"content": "x"}, "missing field 'text'"),
        ({"type": "completion", "field": "content"}, {"content": "x"}, None),
        ({"type": "chat_template"}, {"messages": "hi"}, "field 'messages' must be a list of messages, not str"),
        ({"type": "chat_template"}, {"messages": [{"role": "user"}]}, "messages[0] is missing 'content'"),
        ({"type": "chat_template", "field_messages": "conversations", "message_property_mappings": {"role": "from", "content": "value"}},
         {"conversations": [{"from": "human", "value": "hi"}]}, None),
        ({"type": {"field_instruction": "q", "field_output": "a"}}, {"q": "x"}, "missing field 'a'"),
        ({"type": "some.custom.strategy"}, {"anything": 1}, None),
    ],
)
def test_rows_need_the_fields_of_their_type(entry, row, problem):
    found, _ = row_problem(row, row_shape(entry, "datasets"))
    if problem is None:
        assert found is None
    else:
        assert found is not None and found.startswith(problem)


def test_a_blank_response_counts_as_empty_not_broken():
    assert row_problem({"instruction": "q", "output": "  "}, row_shape(ALPACA, "datasets")) == (None, True)
    assert row_problem({"messages": []}, row_shape({"type": "chat_template"}, "datasets")) == (None, True)


def test_a_malformed_row_names_its_line_and_field(tmp_path):
    rows = [GOOD] * 16 + [{"instruction": "no answer here"}] + [GOOD] * 3
    path = write_lines(tmp_path / "bad.jsonl", rows)
    config = {"datasets": [{"path": str(path), "type": "alpaca"}]}
    with pytest.raises(JobError) as caught:
        check_datasets(config, {})
    assert caught.value.code == errors.DATASET_ERROR
    assert caught.value.message == "args.datasets[0] (bad.jsonl): line 17: missing field 'output' (this dataset type needs instruction and output)"


def test_every_kind_of_bad_row_is_listed_with_its_line(tmp_path):
    path = write_lines(tmp_path / "mixed.jsonl", [GOOD, "{not json", "", GOOD, "[1, 2]"])
    check = check_dataset("args.datasets[0]", path, {}, row_shape(ALPACA, "datasets"))
    assert check.rows == 3  # the blank line is not a row
    assert check.problems == [
        "args.datasets[0] (mixed.jsonl): line 2: not valid JSON (Expecting property name enclosed in double quotes at column 2)",
        "args.datasets[0] (mixed.jsonl): line 5: is list, not an object",
    ]


def test_json_arrays_csv_and_folders_are_read_too(tmp_path):
    (tmp_path / "set").mkdir()
    (tmp_path / "set" / "a.json").write_text(json.dumps([GOOD, {"instruction": "x", "output": ""}]), encoding="utf-8")
    (tmp_path / "set" / "b.csv").write_text("instruction,input,output\nq,,a\nq2,,a2\n", encoding="utf-8")
    check = check_dataset("args.datasets[0]", tmp_path / "set", {}, row_shape(ALPACA, "datasets"))
    assert (check.rows, check.empty_rows, check.problems, len(check.files)) == (4, 1, [], 2)
    (tmp_path / "c.csv").write_text("instruction,input\nq,\n", encoding="utf-8")
    check = check_dataset("args.datasets[1]", tmp_path / "c.csv", {}, row_shape(ALPACA, "datasets"))
    assert check.problems == ["args.datasets[1] (c.csv): line 2: missing field 'output' (this dataset type needs instruction and output)"]


def test_text_that_is_not_utf8_is_reported(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b"\n" + '{"instruction": "caf\xe9"}'.encode("latin-1") + b"\n")
    check = check_dataset("args.datasets[0]", path, {}, row_shape(ALPACA, "datasets"))
    assert check.problems == ["args.datasets[0] (latin1.jsonl): line 2: not UTF-8 text"]


def test_inline_rows_are_written_to_the_run_dir_and_named_by_index(tmp_path):
    config = {"datasets": [{"rows": [GOOD, {"instruction": "q"}], "type": "alpaca"}], "test_datasets": [{"path": "org/evalset", "type": "alpaca"}]}
    sources = localise_datasets(config, tmp_path / "data")
    assert config["datasets"][0] == {"path": str(tmp_path / "data" / "datasets-0.jsonl"), "ds_type": "json", "type": "alpaca"}
    assert config["test_datasets"][0]["path"] == "org/evalset"  # a Hub id stays a Hub id
    materialise(sources, DownloadRules(max_bytes=1))
    with pytest.raises(JobError) as caught:
        check_datasets(config, {s.where: s for s in sources})
    assert caught.value.message.startswith("args.datasets[0] (datasets-0.jsonl): rows[1]: missing field 'output'")


def test_the_fingerprint_follows_content_not_paths(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [GOOD])
    config = {"datasets": [{"path": str(path), "type": "alpaca"}]}
    before = data_fingerprint(config, check_datasets(config, {}))
    assert data_fingerprint(config, check_datasets(config, {})) == before
    write_lines(path, [GOOD, GOOD])
    assert data_fingerprint(config, check_datasets(config, {})) != before


@pytest.fixture(scope="module")
def https_site(tmp_path_factory):
    """A real HTTPS server on loopback with a self-signed certificate the client trusts."""
    cert_and_key = make_cert(tmp_path_factory.mktemp("tls"))
    site = Site(cert_and_key)
    yield site, cert_and_key[0]
    site.close()


LOOPBACK_ALLOWED = DownloadRules(max_bytes=10_000, allowed_private_hosts=frozenset({"localhost"}))


def test_https_datasets_are_downloaded_with_a_size_limit(https_site, tmp_path, monkeypatch):
    site, cert = https_site
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    body = (json.dumps(GOOD) + "\n").encode() * 50
    site.routes["/data/train.jsonl"] = file(body)
    dest = tmp_path / "train.jsonl"
    download(site.url("/data/train.jsonl?X-Signature=secret"), dest, "args.datasets[0]", LOOPBACK_ALLOWED)
    assert dest.read_bytes() == body
    with pytest.raises(JobError) as caught:
        download(site.url("/data/train.jsonl?X-Signature=secret"), tmp_path / "small.jsonl", "args.datasets[0]",
                 replace(LOOPBACK_ALLOWED, max_bytes=100))
    assert "larger than the worker's download limit" in caught.value.message and "secret" not in caught.value.message
    assert not list(tmp_path.glob("small.jsonl*"))
    with pytest.raises(JobError) as caught:
        download(site.url("/missing.jsonl"), tmp_path / "m.jsonl", "args.datasets[0]", LOOPBACK_ALLOWED)
    assert caught.value.message == f"args.datasets[0].path: downloading {site.url('/missing.jsonl')} failed: HTTP 404 Not Found"


def test_a_bad_row_fails_a_normal_job_before_any_model_loads(tiny, env, volume):
    rows = [GOOD] * 16 + [{"instruction": "no answer here", "input": ""}] + [GOOD] * 8
    path = write_lines(volume / "bad_line_17.jsonl", rows)
    job = make_job(tiny_args(tiny, datasets=[{"path": str(path), "type": "alpaca"}]))
    events = collect(job, env)
    final = events[-1]
    assert final["type"] == "error" and final["code"] == "dataset_error"
    assert "line 17" in final["message"] and "missing field 'output'" in final["message"]
    stages = [e.get("stage") for e in events if e["type"] == "status"]
    assert "downloading" not in stages and "training" not in stages
    assert not (volume / "runs" / job["user_id"] / job["run_id"] / "train.log").exists()  # no training process was started


def test_an_unreachable_url_fails_before_any_model_loads(tiny, env, https_site, monkeypatch):
    site, cert = https_site
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    job = make_job(tiny_args(tiny, datasets=[{"path": site.url("/nope.jsonl"), "type": "alpaca"}]))
    events = collect(job, {**env, "FINETUNE_ALLOWED_PRIVATE_HOSTS": "localhost"})
    assert events[-1]["code"] == "dataset_error" and "HTTP 404" in events[-1]["message"]


def test_a_url_on_loopback_is_refused_by_the_worker_setting_defaults(tiny, env, https_site, monkeypatch):
    site, cert = https_site
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    site.routes["/train.jsonl"] = file((json.dumps(GOOD) + "\n").encode() * 20)
    hits = len(site.hits)
    events = collect(make_job(tiny_args(tiny, datasets=[{"path": site.url("/train.jsonl?sig=secret"), "type": "alpaca"}])), env)
    assert events[-1]["code"] == "dataset_error"
    assert events[-1]["message"].startswith(f"args.datasets[0].path: {site.url('/train.jsonl')} was refused: localhost resolves to 127.0.0.1")
    assert "secret" not in json.dumps(events)
    assert len(site.hits) == hits
