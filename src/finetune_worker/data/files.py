"""The cheap data step, run for every job before anything is downloaded.

Datasets sent inline or by https URL are written into the run directory (through a
`.part` file, renamed once whole); every local dataset file is then streamed once,
chunk by chunk in constant memory whatever its size, to check that its rows parse
and carry the fields their `type` needs (a `dataset_error` naming the row and the
field, not a crash inside Axolotl after the model has downloaded), and to
fingerprint its content for the tokenized-data cache. The pipeline runs all this in
a thread; a cancel sets the `cancel` flag, which is checked between chunks.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import json
import json.scanner
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune_worker.checks.options import DATASET_LIST_KEYS
from finetune_worker.checks.rows import RowShape, eval_row_shape, row_problem, row_shape
from finetune_worker.contract import errors
from finetune_worker.contract.errors import JobError
from finetune_worker.data.download import READ_CHUNK, Cancel, raise_if_cancelled
from finetune_worker.plan.config import DataSource

# -- reading local files ----------------------------------------------------------


@dataclass
class DatasetCheck:
    """What reading one dataset entry's local files found."""

    where: str
    files: list[str] = field(default_factory=list)
    rows: int = 0
    empty_rows: int = 0
    problems: list[str] = field(default_factory=list)
    problem_count: int = 0
    digest: str = ""

    def add_problem(self, text: str) -> None:
        self.problem_count += 1
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(text)

    def summary(self) -> dict:
        return {"rows": self.rows, "empty_rows": self.empty_rows, "files": len(self.files)}


MAX_PROBLEMS = 10
RowLabel = Callable[[int], str]


def check_datasets(config: dict, inline: dict[str, DataSource], cancel: Cancel = None) -> list[DatasetCheck]:
    """Read every local dataset of the config; raise `dataset_error` on broken rows."""
    checks = []
    for list_key in DATASET_LIST_KEYS:
        entries = config.get(list_key)
        for index, entry in enumerate(entries if isinstance(entries, list) else []):
            where = f"args.{list_key}[{index}]"
            path = Path(str(entry.get("path", "")))
            if not path.is_absolute() or not path.exists():
                continue  # a Hub or cloud dataset: Axolotl loads it, the preflight checks it
            label = _inline_label if where in inline else _line_label
            checks.append(check_dataset(where, path, entry, row_shape(entry, list_key, config.get("rl")), label, cancel))
    problems = [(check, text) for check in checks for text in check.problems]
    if problems:
        total = sum(check.problem_count for check in checks)
        check, first = problems[0]
        more = f" ({total} problems in all; the first {len(problems)} are in details)" if total > 1 else ""
        raise JobError(errors.DATASET_ERROR, f"{first}{more}", details=[text for _, text in problems])
    return checks


def check_eval_file(path: str, fmt: str, cancel: Cancel = None) -> None:
    """The evaluation set's rows, when it is a local file."""
    if not Path(path).is_absolute():
        return
    check = check_dataset("evaluation.dataset", Path(path), {}, eval_row_shape(fmt), cancel=cancel)
    if check.problems:
        raise JobError(errors.DATASET_ERROR, check.problems[0], details=check.problems)


def _line_label(number: int) -> str:
    return f"line {number}"


def _inline_label(number: int) -> str:
    return f"rows[{number - 1}]"


def dataset_files(path: Path, entry: dict) -> list[Path]:
    if path.is_file():
        return [path]
    data_files = entry.get("data_files")
    if data_files:
        names = data_files if isinstance(data_files, list) else [data_files]
        return [path / name for name in names if (path / name).is_file()]
    return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in (".jsonl", ".json", ".csv", ".parquet"))


def check_dataset(
    where: str, path: Path, entry: dict, shape: RowShape | None, label: RowLabel = _line_label, cancel: Cancel = None,
) -> DatasetCheck:
    """Stream each file once: its rows checked and its content hashed, in constant memory."""
    check = DatasetCheck(where)
    digest = hashlib.sha256()
    for file in dataset_files(path, entry):
        check.files.append(str(file))
        kind = (entry.get("ds_type") or file.suffix.lstrip(".")).lower()
        with open(file, "rb") as handle:
            chunks = _Chunks(handle, cancel)
            if kind in ("json", "jsonl"):
                _check_json_file(chunks, f"{where} ({file.name})", check, shape, label)
            elif kind == "csv":
                _check_rows(chunks, f"{where} ({file.name})", check, shape, label, _csv_rows)
            chunks.drain()  # parquet, arrow, text: only hashed (Axolotl's loader checks them)
        digest.update(file.name.encode() + b"\0" + chunks.sha.digest())
    check.digest = digest.hexdigest()
    return check


class _NotUtf8(Exception):
    def __init__(self, line: int):
        self.line = line


class _BadJson(Exception):
    def __init__(self, line: int, msg: str):
        self.line, self.msg = line, msg


class _Chunks:
    """A file's bytes, READ_CHUNK at a time, hashed as they are read (one pass gives the
    rows and the digest), checking the cancel flag between chunks."""

    def __init__(self, handle, cancel: Cancel):
        self.handle, self.cancel = handle, cancel
        self.sha = hashlib.sha256()
        self.pending: list[bytes] = []

    def read(self) -> bytes:
        if self.pending:
            return self.pending.pop(0)
        raise_if_cancelled(self.cancel)
        chunk = self.handle.read(READ_CHUNK)
        self.sha.update(chunk)
        return chunk

    def unread(self, chunks: list[bytes]) -> None:
        self.pending[:0] = chunks

    def drain(self) -> None:
        while self.read():
            pass


def _starts_with_bracket(chunks: _Chunks) -> bool:
    """Whether the text starts, after whitespace, with `[` (a JSON array, not JSON Lines)."""
    seen, decoder, found = [], codecs.getincrementaldecoder("utf-8")("replace"), False
    while chunk := chunks.read():
        seen.append(chunk)
        text = decoder.decode(chunk).lstrip()
        if len(seen) == 1:
            text = text.removeprefix("\ufeff").lstrip()
        if text:
            found = text.startswith("[")
            break
    chunks.unread(seen)
    return found


def _line_batches(chunks: _Chunks) -> Iterator[tuple[int, list[str], bool]]:
    """(number of the first line, the lines, whether the last one ended with \\n) for the
    whole lines of each chunk, split at \\n (without it) and decoded together. UTF-8 never has a newline byte inside a
    character, so a byte that is not UTF-8 names its line: `_NotUtf8`."""
    pieces: list[bytes] = []
    number, first = 1, True
    while True:
        chunk = chunks.read()
        cut = chunk.rfind(b"\n")
        if chunk and cut < 0:
            pieces.append(chunk)  # a line longer than a chunk
            continue
        if not chunk:
            whole, pieces = b"".join(pieces), []
            if not whole:
                return
        else:
            whole, pieces = b"".join([*pieces, chunk[:cut]]), [chunk[cut + 1:]]
        try:
            text = whole.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _NotUtf8(number + whole.count(b"\n", 0, exc.start)) from None
        if first:
            text, first = text.removeprefix("\ufeff"), False
        lines = text.split("\n")
        yield number, lines, bool(chunk)
        number += len(lines)
        if not chunk:
            return


RowReader = Callable[[_Chunks, str, DatasetCheck, RowLabel], Iterator[tuple[int, Any]]]


def _check_json_file(chunks: _Chunks, where: str, check: DatasetCheck, shape: RowShape | None, label: RowLabel) -> None:
    reader = _json_array_rows if _starts_with_bracket(chunks) else _jsonl_rows
    _check_rows(chunks, where, check, shape, label, reader)


def _check_rows(chunks: _Chunks, where: str, check: DatasetCheck, shape: RowShape | None, label: RowLabel, reader: RowReader) -> None:
    """Check every row of one file. A file that is not UTF-8, or a JSON array that does not
    parse, is one problem and has no rows (what reading the whole file first reported)."""
    before = (check.rows, check.empty_rows, check.problem_count, len(check.problems))
    try:
        for number, row in reader(chunks, where, check, label):
            check.rows += 1
            problem, empty = row_problem(row, shape)
            if problem:
                check.add_problem(f"{where}: {label(number)}: {problem}")
            check.empty_rows += empty
        return
    except _NotUtf8 as bad:
        problem = f"{where}: line {bad.line}: not UTF-8 text"
    except _BadJson as bad:
        problem = f"{where}: line {bad.line}: not valid JSON ({bad.msg})"
    check.rows, check.empty_rows, check.problem_count, kept = before
    del check.problems[kept:]
    check.add_problem(problem)


def _jsonl_rows(chunks: _Chunks, where: str, check: DatasetCheck, label: RowLabel) -> Iterator[tuple[int, Any]]:
    scan = _SCANNER
    for number, lines, _ in _line_batches(chunks):
        for number, line in enumerate(lines, start=number):  # noqa: B020 (the batch's first line number)
            try:  # the common case, fast: one value that fills the line (what json.loads accepts)
                row, end = scan(line, 0)
            except (StopIteration, json.JSONDecodeError):
                end = -1
            if end != len(line):  # anything else as json.loads sees it, with its message
                line = line.removesuffix("\r")  # CRLF ends one line, as splitlines() read it
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    check.add_problem(f"{where}: {label(number)}: not valid JSON ({exc.msg} at column {exc.colno})")
                    continue
            yield number, row


def _csv_rows(chunks: _Chunks, where: str, check: DatasetCheck, label: RowLabel) -> Iterator[tuple[int, Any]]:
    def lines() -> Iterator[str]:  # each with its newline, as io.StringIO gave them
        for _, batch, ended in _line_batches(chunks):
            yield from (line + "\n" for line in batch) if ended else batch

    reader = csv.DictReader(lines())
    for row in reader:
        yield reader.line_num, {k: v for k, v in row.items() if k is not None}


def _json_array_rows(chunks: _Chunks, where: str, check: DatasetCheck, label: RowLabel) -> Iterator[tuple[int, Any]]:
    text = _Text(chunks)
    try:
        yield from enumerate(text.array_items(), start=1)
    except _BadJson:
        text.drain()  # a byte that is not UTF-8 anywhere in the file is what is reported
        raise


_SCANNER = json.scanner.make_scanner(json.JSONDecoder())  # json.loads without its checks around the C scanner
JSON_SPACE = " \t\n\r"
MARGIN = 64  # a value parsed this far from the end of the text read so far cannot change with more text


class _Text:
    """A JSON array's text decoded chunk by chunk; the items one at a time.

    What `json.loads` does with the whole text, with the same error messages and line
    numbers, holding only the unparsed tail (one item at most, plus a chunk)."""

    def __init__(self, chunks: _Chunks):
        self.chunks = chunks
        self.decoder = codecs.getincrementaldecoder("utf-8")()
        self.buf, self.pos = "", 0
        self.lines_dropped = 0  # newlines in the text already dropped from buf
        self.byte_lines = 0  # newlines in the bytes already decoded
        self.eof, self.first = False, True
        self.scan = json.JSONDecoder().raw_decode

    def more(self) -> bool:
        """Read more text (at least as much again as the unparsed tail); False at the end."""
        if self.eof:
            return False
        self.lines_dropped += self.buf.count("\n", 0, self.pos)
        tail = self.buf[self.pos:]
        parts, wanted = [], max(len(tail), 1)
        while wanted > 0:
            data = self.chunks.read()
            pending = self.decoder.getstate()[0]
            try:
                decoded = self.decoder.decode(data, final=not data)
            except UnicodeDecodeError as exc:
                raise _NotUtf8(self.byte_lines + (pending + data)[: exc.start].count(b"\n") + 1) from None
            self.byte_lines += data.count(b"\n")
            if self.first and decoded:
                decoded, self.first = decoded.removeprefix("\ufeff"), False
            parts.append(decoded)
            wanted -= len(decoded)
            if not data:
                self.eof = True
                break
        self.buf, self.pos = tail + "".join(parts), 0
        return True

    def drain(self) -> None:
        self.buf, self.pos = "", 0
        while self.more():
            self.buf = ""

    def error(self, msg: str, pos: int) -> _BadJson:
        return _BadJson(self.lines_dropped + self.buf.count("\n", 0, pos) + 1, msg)

    def char(self) -> str:
        """The character at pos after JSON whitespace ('' at the end of the text)."""
        while True:
            while self.pos < len(self.buf) and self.buf[self.pos] in JSON_SPACE:
                self.pos += 1
            if self.pos < len(self.buf) or not self.more():
                return self.buf[self.pos:self.pos + 1]

    def value(self) -> Any:
        self.char()
        while True:
            try:
                value, end = self.scan(self.buf, self.pos)
            except json.JSONDecodeError as exc:
                settled = exc.pos + MARGIN <= len(self.buf) and not exc.msg.startswith("Unterminated string")
                if self.eof or settled:
                    raise self.error(exc.msg, exc.pos) from None
            else:
                if self.eof or end + MARGIN <= len(self.buf):
                    self.pos = end
                    return value
            self.more()

    def array_items(self) -> Iterator[Any]:
        if self.char() != "[":
            raise self.error("Expecting value", self.pos)
        self.pos += 1
        if self.char() != "]":
            while True:
                yield self.value()
                found = self.char()
                self.pos += 1
                if found == "]":
                    break
                if found != ",":
                    raise self.error("Expecting ',' delimiter", self.pos - 1)
        else:
            self.pos += 1
        if self.char():
            raise self.error("Extra data", self.pos)


