"""The end of a child process that imported torch and transformers."""

from __future__ import annotations

import argparse
import atexit
import json
import os
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn


def spec_child(module: str, work: Callable[[dict], dict], argv: list[str] | None = None) -> int:
    """The main of a child run as `python -m MODULE SPEC --out FILE`: `work` turns the
    JSON spec into the one JSON object the worker reads back (evaluation, generate)."""
    parser = argparse.ArgumentParser(prog=f"python -m {module}")
    parser.add_argument("spec", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    options = parser.parse_args(argv)
    result = work(json.loads(options.spec.read_text(encoding="utf-8")))
    options.out.write_text(json.dumps(result), encoding="utf-8")
    return 0


def exit_without_teardown(code: int) -> NoReturn:
    """Exit as the interpreter would, minus freeing torch's and transformers' modules
    one by one (about 2 s after a training, paid by every job): threads are joined,
    atexit handlers run (logging, W&B), output is flushed, then the process ends."""
    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
