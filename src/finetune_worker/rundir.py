"""The run directory on the volume: created once, never wiped by the worker."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import yaml

from .plan import RunPaths


def prepare_run_dir(paths: RunPaths) -> None:
    paths.run_dir.mkdir(parents=True, exist_ok=True)
    paths.output_dir.mkdir(exist_ok=True)


def write_atomic(path: Path, text: str) -> None:
    """Write via a temporary file and rename, so readers never see half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_config(paths: RunPaths, config: dict[str, Any]) -> None:
    write_atomic(paths.config_file, yaml.safe_dump(config, sort_keys=False, allow_unicode=True))


def write_json(path: Path, value: Any) -> None:
    write_atomic(path, json.dumps(value, indent=2, default=str) + "\n")


def append_event(paths: RunPaths, event: dict) -> None:
    if paths.run_dir.is_dir():
        with open(paths.events_file, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(event, default=str) + "\n")


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, ValueError):
        return None
