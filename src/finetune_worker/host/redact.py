"""The one redaction point: every event, log line and error passes through here.

Known secret values (the job's credentials, the worker's own tokens) are replaced
wherever they appear, and anything shaped like a Hugging Face, W&B or RunPod key
(or a JWT, like a user token) is masked too, so a token that reaches a log by
some unexpected path is still caught.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from finetune_worker.contract.settings import SECRET_ENV_VARS

MASK = "***"
MIN_SECRET_LENGTH = 6

TOKEN_PATTERNS = [
    re.compile(r"hf_[A-Za-z0-9]{8,}"),  # Hugging Face user and org tokens
    re.compile(r"api_org_[A-Za-z0-9]{8,}"),  # legacy Hugging Face org tokens
    re.compile(r"rpa_[A-Za-z0-9]{8,}"),  # RunPod API keys
    re.compile(r"(?i)(wandb[_-]?api[_-]?key\s*[=:]\s*)\S+"),
    re.compile(r"(?i)(authorization:\s*bearer\s+)\S+"),
    re.compile(r"eyJ[A-Za-z0-9_-]{4,}\.eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*"),  # a JWT (credentials.user_token)
]

class Redactor:
    def __init__(self, secrets: Iterable[str] = ()):
        self._secrets: set[str] = set()
        self.add(*secrets)

    def add(self, *secrets: str | None) -> None:
        for secret in secrets:
            if isinstance(secret, str) and len(secret.strip()) >= MIN_SECRET_LENGTH:
                self._secrets.add(secret.strip())

    def text(self, value: str) -> str:
        # Longest first, so a secret that contains another is masked whole.
        for secret in sorted(self._secrets, key=len, reverse=True):
            value = value.replace(secret, MASK)
        for pattern in TOKEN_PATTERNS:
            value = pattern.sub(lambda m: (m.group(1) if m.groups() else "") + MASK, value)
        return value

    def value(self, value: Any) -> Any:
        """Redact every string inside a JSON-like value (keys included)."""
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, dict):
            return {self.value(k): self.value(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [self.value(v) for v in value]
        return value


def secrets_in_raw_input(raw: Any) -> list[str]:
    """Every string under `credentials`, even when the input is otherwise invalid."""
    if not isinstance(raw, dict):
        return []
    found: list[str] = []
    stack = [raw.get("credentials")]  # no recursion: the input may nest arbitrarily deep
    while stack:
        node = stack.pop()
        if isinstance(node, str):
            found.append(node)
        elif isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    _credential_options(raw.get("args"), found)
    return found


# Option names that hold credentials in an Axolotl config (refused in args, see
# options.Kind.CREDENTIAL), masked wherever they show up even so.
CREDENTIAL_OPTION_NAMES = ("api_key", "secret", "token")


def _credential_options(node: Any, found: list[str]) -> None:
    stack = [node]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            for key, value in node.items():
                if isinstance(value, str) and str(key).lower().endswith(CREDENTIAL_OPTION_NAMES):
                    found.append(value)
                else:
                    stack.append(value)
        elif isinstance(node, list):
            stack.extend(node)


def redact_file(path: Path, redactor: Redactor) -> None:
    """Rewrite a log a library wrote itself (Axolotl's debug.log) with secrets masked."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return
    cleaned = redactor.text(text)
    if cleaned != text:
        partial = path.with_name(path.name + ".redacting")
        partial.write_text(cleaned, encoding="utf-8")
        partial.replace(path)


def secrets_in_env(env: dict[str, str]) -> list[str]:
    return [env[name] for name in SECRET_ENV_VARS if env.get(name)]
