"""The cheap data step: inline rows and URLs into the run dir, rows checked, cache keyed by content."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import io
import json
import random
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from conftest import collect, make_job, tiny_args
from finetune_worker.checks.rows import row_problem, row_shape
from finetune_worker.contract import errors
from finetune_worker.contract.errors import JobError
from finetune_worker.contract.settings import REPO_ROOT
from finetune_worker.data import files as data
from finetune_worker.data.download import Cancelled, DownloadRules, download, materialise
from finetune_worker.data.files import check_dataset, check_datasets
from finetune_worker.data.fingerprint import data_fingerprint
from finetune_worker.plan.config import localise_datasets
from loopback_sites import Site, drip, file, make_cert


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


def test_a_full_volume_leaves_no_partial_inline_dataset(full_volume):
    mount, fill = full_volume
    config = {"datasets": [{"rows": [GOOD] * 500, "type": "alpaca"}]}  # about 40 KB
    sources = localise_datasets(config, mount / "data")
    (mount / "data").mkdir()
    fill(free=8192)
    with pytest.raises(OSError) as caught:
        materialise(sources, DownloadRules())
    assert caught.value.errno == errno.ENOSPC
    assert not list((mount / "data").iterdir())  # neither datasets-0.jsonl nor its .part


def test_the_fingerprint_follows_content_not_paths(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [GOOD])
    config = {"datasets": [{"path": str(path), "type": "alpaca"}]}
    before = data_fingerprint(config, check_datasets(config, {}))
    assert data_fingerprint(config, check_datasets(config, {})) == before
    write_lines(path, [GOOD, GOOD])
    assert data_fingerprint(config, check_datasets(config, {})) != before


def test_files_are_read_in_small_chunks_with_the_same_rows_problems_and_digest(tmp_path, monkeypatch):
    folder = tmp_path / "set"
    folder.mkdir()
    write_lines(folder / "a.jsonl", [GOOD, "{not json", "", {"instruction": "caf\u00e9 \u2028", "output": "\u00e9"}, "[1]"])
    (folder / "b.json").write_text("\ufeff [\n" + ",\n".join(json.dumps(r) for r in [GOOD, {"instruction": "x"}]) + "\n]\n", encoding="utf-8")
    (folder / "c.csv").write_text('instruction,input,output\r\n"multi\nline",,a\r\nq2,,\r\n', encoding="utf-8")
    whole = check_dataset("args.datasets[0]", folder, {}, row_shape(ALPACA, "datasets"))
    assert (whole.rows, whole.empty_rows) == (7, 1)
    assert whole.problems == [
        "args.datasets[0] (a.jsonl): line 2: not valid JSON (Expecting property name enclosed in double quotes at column 2)",
        "args.datasets[0] (a.jsonl): line 5: is list, not an object",
        "args.datasets[0] (b.json): line 2: missing field 'output' (this dataset type needs instruction and output)",
    ]
    monkeypatch.setattr(data, "READ_CHUNK", 3)  # every row, line and character split across reads
    chunked = check_dataset("args.datasets[0]", folder, {}, row_shape(ALPACA, "datasets"))
    assert (chunked.rows, chunked.empty_rows, chunked.problems, chunked.digest) == (whole.rows, whole.empty_rows, whole.problems, whole.digest)
    import hashlib

    expected = hashlib.sha256()
    for name in ("a.jsonl", "b.json", "c.csv"):
        expected.update(name.encode() + b"\0" + hashlib.sha256((folder / name).read_bytes()).digest())
    assert whole.digest == expected.hexdigest()  # as when the files were read whole: the cache stays warm


@pytest.mark.parametrize("chunk", [1, 5, 1 << 20])
def test_a_json_array_read_in_chunks_reports_what_json_loads_reports(chunk, monkeypatch):
    monkeypatch.setattr(data, "READ_CHUNK", chunk)
    rng = random.Random(chunk)
    base = '[\n {"instruction": "caf\u00e9 \\ud83d\\ude00", "output": "x\\ny"},\n {"a": [1, 2.5e3, true, null]}, 12, "s\\"t"\n]\n'
    for _ in range(400):
        text = base
        for _ in range(rng.randint(1, 3)):
            at = rng.randrange(len(text))
            text = text[:at] + rng.choice(["", "", " ", "\n", ",", "]", "{", '"', "1", "\\"]) + text[at + 1:]
        if not text.lstrip().startswith("["):
            continue
        try:
            want = ("ok", json.loads(text))
        except json.JSONDecodeError as exc:
            want = ("error", exc.lineno, exc.msg)
        items = data._Text(data._Chunks(io.BytesIO(text.encode()), None))
        try:
            got = ("ok", list(items.array_items()))
        except data._BadJson as bad:
            got = ("error", bad.line, bad.msg)
        assert got == want, text


def test_lines_end_only_at_newlines_as_json_lines_loaders_read_them(tmp_path):
    """U+2028, U+0085 and the like are valid inside a JSON string (and the worker writes inline
    rows with them raw); reading the whole text with splitlines() used to break rows there."""
    row = {"instruction": "one\u2028two\u0085three", "output": "ok\x1c"}
    path = write_lines(tmp_path / "seps.jsonl", [json.dumps(row, ensure_ascii=False), GOOD])
    check = check_dataset("args.datasets[0]", path, {}, row_shape(ALPACA, "datasets"))
    assert (check.rows, check.problems) == (2, [])


def test_a_byte_that_is_not_utf8_after_bad_json_is_what_is_reported(tmp_path):
    path = tmp_path / "a.json"
    path.write_bytes(b'[{"instruction": "q", "output": "a"},\n oops,\n' + b'"caf\xe9"]\n')
    check = check_dataset("args.datasets[0]", path, {}, row_shape(ALPACA, "datasets"))
    assert (check.rows, check.problems) == (0, ["args.datasets[0] (a.json): line 3: not UTF-8 text"])
    path.write_bytes(b'[{"instruction": "q", "output": "a"},\n oops]\n')
    check = check_dataset("args.datasets[0]", path, {}, row_shape(ALPACA, "datasets"))
    assert (check.rows, check.problems) == (0, ["args.datasets[0] (a.json): line 2: not valid JSON (Expecting value)"])


def test_a_cancel_stops_the_row_check_between_chunks(tmp_path):
    path = tmp_path / "big.jsonl"
    path.write_text((json.dumps(GOOD) + "\n") * 400_000, encoding="utf-8")  # about 30 MB
    cancel = threading.Event()
    threading.Timer(0.05, cancel.set).start()
    started = time.monotonic()
    with pytest.raises(Cancelled):
        check_datasets({"datasets": [{"path": str(path), "type": "alpaca"}]}, {}, cancel)
    assert time.monotonic() - started < 1.0


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


def test_a_download_onto_a_full_disk_is_disk_full(https_site, tmp_path, monkeypatch):
    # /dev/full answers every write with ENOSPC, as a full volume does (no root needed): the .part file points there
    site, cert = https_site
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    site.routes["/data/full.jsonl"] = file((json.dumps(GOOD) + "\n").encode() * 50)
    dest = tmp_path / "full.jsonl"
    (tmp_path / "full.jsonl.part").symlink_to("/dev/full")
    with pytest.raises(JobError) as caught:
        download(site.url("/data/full.jsonl?X-Signature=secret"), dest, "args.datasets[0]", LOOPBACK_ALLOWED)
    assert caught.value.code == errors.DISK_FULL, caught.value
    assert caught.value.message.startswith("args.datasets[0].path: ") and "No space left on device" in caught.value.message
    assert "secret" not in caught.value.message
    assert not list(tmp_path.glob("full.jsonl*"))


def test_a_download_filling_a_real_volume_is_disk_full_and_leaves_nothing(https_site, full_volume, monkeypatch):
    mount, fill = full_volume
    site, cert = https_site
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    site.routes["/data/big.jsonl"] = file((json.dumps(GOOD) + "\n").encode() * 500)  # about 40 KB
    fill(free=8192)
    with pytest.raises(JobError) as caught:
        download(site.url("/data/big.jsonl"), mount / "big.jsonl", "args.datasets[0]", replace(LOOPBACK_ALLOWED, max_bytes=1 << 20))
    assert caught.value.code == errors.DISK_FULL, caught.value
    assert not list(mount.glob("big.jsonl*"))


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


def test_a_cancel_lands_while_the_data_step_runs(env, volume, https_site, monkeypatch):
    """The data step runs off the event loop: a cancel during a slow download ends the job
    at once (cancelled), with no partial file and the run free again."""
    site, cert = https_site
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    site.routes["/slow.jsonl"] = drip(size=400, every=0.05)  # 20 s in all
    job = make_job(tiny_args(REPO_ROOT / "examples", datasets=[{"path": site.url("/slow.jsonl"), "type": "alpaca"}]))
    run_dir = volume / "runs" / job["user_id"] / job["run_id"]

    async def run() -> tuple[float, list[dict]]:
        from finetune_worker.pipeline import run_job

        seen: list[dict] = []
        data_step_began = None

        async def consume():
            nonlocal data_step_began
            async for event in run_job(job, env={**env, "FINETUNE_ALLOWED_PRIVATE_HOSTS": "localhost"}):
                seen.append(event)
                if "checking the datasets" in event.get("message", ""):
                    data_step_began = time.monotonic()

        task = asyncio.create_task(consume())
        while data_step_began is None:
            assert not task.done(), seen[-1:]
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.5)  # the download is under way (on the loop, this sleep would last until it ended)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return time.monotonic() - data_step_began, seen

    took, _ = asyncio.run(run())
    assert took < 3.5, took  # the whole download would take 20 s
    recorded = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    assert recorded[-1]["type"] == "error" and recorded[-1]["code"] == "cancelled"
    assert not list((run_dir / "data").glob("*"))  # no partial download left behind
    assert not run_dir.with_name(run_dir.name + ".lock").exists()
