"""The cheap data step, run for every job before anything is downloaded.

Datasets sent inline or by https URL are written into the run directory; every
local dataset file is then read once, to check that its rows parse and carry the
fields their `type` needs (a `dataset_error` naming the row and the field, not a
crash inside Axolotl after the model has downloaded), and to fingerprint its
content for the tokenized-data cache.
"""

from __future__ import annotations

import csv
import hashlib
import http.client
import io
import json
import time
import urllib.error
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import errors
from .args_check import DATASET_LIST_KEYS
from .errors import JobError
from .plan import DataSource
from .settings import DOWNLOAD_DEADLINE_S, MAX_DOWNLOAD_BYTES, WorkerSettings
from .urlguard import Guard, Refused, open_url, url_for_humans

MAX_PROBLEMS = 10
CHUNK = 1 << 20
TOKENIZER_FILES = ("tokenizer*", "special_tokens_map.json", "vocab*", "merges.txt", "*.model", "chat_template*")


# -- inline rows and URLs ---------------------------------------------------------


@dataclass(frozen=True)
class DownloadRules:
    """The operator's limits on a dataset fetched from an https URL."""

    max_bytes: int = MAX_DOWNLOAD_BYTES
    deadline_s: float = DOWNLOAD_DEADLINE_S
    allowed_private_hosts: frozenset[str] = frozenset()

    @classmethod
    def from_settings(cls, settings: WorkerSettings) -> DownloadRules:
        return cls(settings.max_download_bytes, settings.download_deadline_s, frozenset(settings.allowed_private_hosts))


def materialise(sources: list[DataSource], rules: DownloadRules) -> None:
    for source in sources:
        source.dest.parent.mkdir(parents=True, exist_ok=True)
        if source.rows is not None:
            text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in source.rows)
            source.dest.write_text(text, encoding="utf-8")
        elif source.url is not None:
            download(source.url, source.dest, source.where, rules)


def without_url_queries(value: Any) -> Any:
    """A JSON-like value with every https URL's query and fragment dropped."""
    if isinstance(value, str) and value.startswith(("https://", "http://")):
        return url_for_humans(value)
    if isinstance(value, dict):
        return {key: without_url_queries(item) for key, item in value.items()}
    if isinstance(value, list):
        return [without_url_queries(item) for item in value]
    return value


def download(url: str, dest: Path, where: str, rules: DownloadRules) -> None:
    """Fetch an https URL into `dest` under the rules, or raise `dataset_error`."""
    shown = url_for_humans(url)
    partial = dest.with_name(dest.name + ".part")
    guard = Guard(allowed_hosts=rules.allowed_private_hosts, deadline=time.monotonic() + rules.deadline_s)
    try:
        with open_url(url, guard) as response, open(partial, "wb") as out:
            declared = int(response.headers.get("Content-Length") or 0)
            if declared > rules.max_bytes:
                raise _too_big(where, shown, declared, rules.max_bytes)
            written = 0
            while chunk := response.read(CHUNK):
                written += len(chunk)
                if written > rules.max_bytes:
                    raise _too_big(where, shown, written, rules.max_bytes)
                out.write(chunk)
    except Refused as exc:
        failure = _refused(where, shown, guard, exc)
    except urllib.error.HTTPError as exc:
        failure = JobError(errors.DATASET_ERROR, f"{where}.path: downloading {shown} failed: HTTP {exc.code} {exc.reason}")
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        reason = getattr(exc, "reason", None)
        if isinstance(reason, Refused):  # raised while connecting: urllib wraps it
            failure = _refused(where, shown, guard, reason)
        elif guard.remaining() <= 0:
            failure = _too_slow(where, shown, rules.deadline_s)
        else:
            failure = JobError(errors.DATASET_ERROR, f"{where}.path: downloading {shown} failed: {reason or exc.__class__.__name__}")
    except JobError as exc:
        failure = exc
    else:
        partial.replace(dest)
        return
    partial.unlink(missing_ok=True)
    raise failure from None


def _refused(where: str, shown: str, guard: Guard, refused: Refused) -> JobError:
    hop = f" (redirected to {url_for_humans(guard.visited[-1])})" if len(guard.visited) > 1 else ""
    allow = ", or ask the operator to allow the host with FINETUNE_ALLOWED_PRIVATE_HOSTS" if refused.operator_can_allow else ""
    return JobError(
        errors.DATASET_ERROR,
        f"{where}.path: {shown}{hop} was refused: {refused.reason}. Put the file on the volume or the Hub{allow}",
    )


def _too_slow(where: str, shown: str, deadline_s: float) -> JobError:
    return JobError(
        errors.DATASET_ERROR,
        f"{where}.path: downloading {shown} did not finish within the worker's {deadline_s:g} s deadline; "
        "put the file on the volume or the Hub (the operator sets FINETUNE_DOWNLOAD_DEADLINE_S)",
    )


def _too_big(where: str, shown: str, size: int, limit: int) -> JobError:
    return JobError(
        errors.DATASET_ERROR,
        f"{where}.path: {shown} is larger than the worker's download limit ({size} > {limit} bytes); "
        "put the file on the volume or the Hub (the operator sets FINETUNE_MAX_DOWNLOAD_BYTES)",
    )


# -- what each dataset type needs -------------------------------------------------


@dataclass(frozen=True)
class RowShape:
    """The fields a row of one dataset type must have."""

    text_fields: tuple[str, ...] = ()  # strings; the row is empty when all are blank
    messages_field: str | None = None  # a list of {role, content} objects
    role_key: str = "role"
    content_key: str = "content"
    list_fields: tuple[str, ...] = ()

    def describe(self) -> str:
        names = [*self.text_fields, *self.list_fields, *([self.messages_field] if self.messages_field else [])]
        return " and ".join(names)


ALPACA_TYPES = ("alpaca", "alpaca_chat", "alpaca_w_system")


def row_shape(entry: dict, list_key: str) -> RowShape | None:
    """What rows need for this dataset entry's `type`; None when the worker does not know."""
    kind = entry.get("type")
    if list_key == "pretraining_dataset" or kind == "pretrain":
        return RowShape(text_fields=(entry.get("text_column") or "text",))
    if isinstance(kind, dict):
        return RowShape(text_fields=(kind.get("field_instruction") or "instruction", kind.get("field_output") or "output"))
    if not isinstance(kind, str):
        return None
    base = kind.split(":")[0].split(".")[0]
    if base in ALPACA_TYPES:
        return RowShape(text_fields=("instruction", "output"))
    if base == "completion":
        return RowShape(text_fields=(entry.get("field") or "text",))
    if base == "input_output":
        return RowShape(list_fields=("segments",))
    if base == "chat_template":
        mappings = entry.get("message_property_mappings") or {}
        return RowShape(
            messages_field=entry.get("field_messages") or "messages",
            role_key=mappings.get("role") or entry.get("message_field_role") or "role",
            content_key=mappings.get("content") or entry.get("message_field_content") or "content",
        )
    return None


EVAL_FORMAT_SHAPES = {
    "alpaca": RowShape(text_fields=("instruction", "output")),
    "messages": RowShape(messages_field="messages"),
    "prompt_completion": RowShape(text_fields=("prompt", "completion")),
}


def eval_row_shape(fmt: str) -> RowShape | None:
    return EVAL_FORMAT_SHAPES.get(fmt)


def row_problem(row: Any, shape: RowShape | None) -> tuple[str | None, bool]:
    """(what is wrong with the row or None, whether it is empty)."""
    if not isinstance(row, dict):
        return f"is {type(row).__name__}, not an object", False
    if shape is None:
        return None, False
    wanted = f" (this dataset type needs {shape.describe()})"
    for name in shape.text_fields:
        if row.get(name) is None:
            return f"missing field '{name}'{wanted}", False
        if not isinstance(row[name], str):
            return f"field '{name}' must be a string, not {type(row[name]).__name__}", False
    for name in shape.list_fields:
        if not isinstance(row.get(name), list):
            return f"missing field '{name}' (a list){wanted}", False
    if shape.messages_field:
        problem = _messages_problem(row.get(shape.messages_field), shape)
        if problem:
            return problem, False
        return None, not row[shape.messages_field]
    empty = bool(shape.text_fields) and not row[shape.text_fields[-1]].strip()  # the answer (or the text)
    return None, empty


def _messages_problem(messages: Any, shape: RowShape) -> str | None:
    name = shape.messages_field
    if messages is None:
        return f"missing field '{name}' (a list of {{'{shape.role_key}': ..., '{shape.content_key}': ...}} objects)"
    if not isinstance(messages, list):
        return f"field '{name}' must be a list of messages, not {type(messages).__name__}"
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            return f"{name}[{index}] must be an object with '{shape.role_key}' and '{shape.content_key}'"
        for key in (shape.role_key, shape.content_key):
            if key not in message:
                return f"{name}[{index}] is missing '{key}'"
    return None


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


RowLabel = Callable[[int], str]


def check_datasets(config: dict, inline: dict[str, DataSource]) -> list[DatasetCheck]:
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
            checks.append(check_dataset(where, path, entry, row_shape(entry, list_key), label))
    problems = [(check, text) for check in checks for text in check.problems]
    if problems:
        total = sum(check.problem_count for check in checks)
        check, first = problems[0]
        more = f" ({total} problems in all; the first {len(problems)} are in details)" if total > 1 else ""
        raise JobError(errors.DATASET_ERROR, f"{first}{more}", details=[text for _, text in problems])
    return checks


def check_eval_file(path: str, fmt: str) -> None:
    """The evaluation set's rows, when it is a local file."""
    if not Path(path).is_absolute():
        return
    check = check_dataset("evaluation.dataset", Path(path), {}, eval_row_shape(fmt))
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


def check_dataset(where: str, path: Path, entry: dict, shape: RowShape | None, label: RowLabel = _line_label) -> DatasetCheck:
    check = DatasetCheck(where)
    digest = hashlib.sha256()
    for file in dataset_files(path, entry):
        check.files.append(str(file))
        data = file.read_bytes()
        digest.update(file.name.encode() + b"\0" + hashlib.sha256(data).digest())
        kind = (entry.get("ds_type") or file.suffix.lstrip(".")).lower()
        where_file = f"{where} ({file.name})"
        if kind in ("json", "jsonl"):
            rows = _json_rows(data, where_file, check, label)
        elif kind == "csv":
            rows = _csv_rows(data, where_file, check)
        else:
            continue  # parquet, arrow, text: Axolotl's loader checks them
        for number, row in rows:
            check.rows += 1
            problem, empty = row_problem(row, shape)
            if problem:
                check.add_problem(f"{where_file}: {label(number)}: {problem}")
            check.empty_rows += empty
    check.digest = digest.hexdigest()
    return check


def _json_rows(data: bytes, where: str, check: DatasetCheck, label: RowLabel) -> Iterator[tuple[int, Any]]:
    text = _decode(data, where, check)
    if text is None:
        return
    if text.lstrip().startswith("["):
        try:
            document = json.loads(text)
        except json.JSONDecodeError as exc:
            check.add_problem(f"{where}: line {exc.lineno}: not valid JSON ({exc.msg})")
            return
        yield from ((number, row) for number, row in enumerate(document, start=1))
        return
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as exc:
            check.add_problem(f"{where}: {label(number)}: not valid JSON ({exc.msg} at column {exc.colno})")


def _csv_rows(data: bytes, where: str, check: DatasetCheck) -> Iterator[tuple[int, Any]]:
    text = _decode(data, where, check)
    if text is None:
        return
    reader = csv.DictReader(io.StringIO(text))
    for row in reader:
        yield reader.line_num, {k: v for k, v in row.items() if k is not None}


def _decode(data: bytes, where: str, check: DatasetCheck) -> str | None:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        check.add_problem(f"{where}: line {line}: not UTF-8 text")
        return None


# -- the cache key ----------------------------------------------------------------


def data_fingerprint(config: dict, checks: list[DatasetCheck]) -> str:
    """Content of the local datasets and tokenizer files, for the prepared-data cache.

    Axolotl keys its cache by dataset *paths* and the tokenizer *name*: an edited file
    at the same path would reuse stale tokens. The worker adds this content digest
    to the cache directory; Axolotl's own hash covers the config options.
    """
    digest = hashlib.sha256()
    for check in sorted(checks, key=lambda c: c.where):
        digest.update(f"{check.where}={check.digest}\n".encode())
    for key in ("tokenizer_config", "base_model"):
        directory = Path(str(config.get(key) or ""))
        if directory.is_absolute() and directory.is_dir():
            for pattern in TOKENIZER_FILES:
                for file in sorted(directory.glob(pattern)):
                    digest.update(file.name.encode() + b"\0" + hashlib.sha256(file.read_bytes()).digest())
            break
    return digest.hexdigest()[:16]
