"""`axolotl train CONFIG`, started before CONFIG exists: import first, train on "go".

The worker starts this child as soon as it knows the job's environment (run
directory, secrets), so Axolotl's imports (seconds of CPU) overlap the worker's own
validation, data checks and Hub check instead of following them. A line "go" on
stdin starts the training, in the config's directory, exactly as
`python -m axolotl.cli.train CONFIG` would; end of input (the job failed a check,
or needs no training) ends it quietly.
"""

from __future__ import annotations

import importlib
import os
import sys
import time
from pathlib import Path

from finetune_worker.data.preflight import warm_packer
from finetune_worker.host.children import told_to_go
from finetune_worker.host.fastexit import exit_without_teardown


def preload() -> None:
    """Import what `axolotl train` imports before it reads the config: the modules
    behind its own lazy names, so the list follows Axolotl's version."""
    train_cli = importlib.import_module("axolotl.cli.train")
    for module in dict.fromkeys(train_cli._LAZY_IMPORTS.values()):
        importlib.import_module(module)
    warm_packer()  # the progress plugin's lengths record packs the train split before the first step


def main(argv: list[str]) -> int:
    config = Path(argv[0])
    started = time.monotonic()
    preload()
    if not told_to_go(started):
        return 0
    os.chdir(config.parent)
    import fire
    from axolotl.cli.train import do_cli

    # What `python -m axolotl.cli.train CONFIG` runs; its argument parsers read sys.argv.
    sys.argv = ["axolotl.cli.train", str(config)]
    fire.Fire(do_cli, command=[str(config)])
    return 0


if __name__ == "__main__":
    exit_without_teardown(main(sys.argv[1:]))  # a failure raises past this and exits as usual
