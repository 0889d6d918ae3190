"""The prepared-data cache key: the content of the datasets and the tokenizer files."""

from __future__ import annotations

import hashlib
from pathlib import Path

from finetune_worker.data.download import Cancel
from finetune_worker.data.files import DatasetCheck, _Chunks

TOKENIZER_FILES = ("tokenizer*", "special_tokens_map.json", "vocab*", "merges.txt", "*.model", "chat_template*")


# -- the cache key ----------------------------------------------------------------


def data_fingerprint(config: dict, checks: list[DatasetCheck], cancel: Cancel = None) -> str:
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
                    digest.update(file.name.encode() + b"\0" + _file_sha256(file, cancel))
            break
    return digest.hexdigest()[:16]


def _file_sha256(file: Path, cancel: Cancel = None) -> bytes:
    with open(file, "rb") as handle:
        chunks = _Chunks(handle, cancel)
        chunks.drain()
    return chunks.sha.digest()
