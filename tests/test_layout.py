"""The code's shape: no import circles, every child module exists, and a run directory
written before the package was reorganised still resumes."""

from __future__ import annotations

import ast
import importlib.machinery
import importlib.util
import json
import re
import tarfile
from pathlib import Path

import pytest

from conftest import collect
from finetune_worker.checks.validation import validate_job
from finetune_worker.contract.settings import REPO_ROOT, WorkerSettings
from finetune_worker.host.hardware import CPU_ONLY
from finetune_worker.host.rundir import args_digest

PACKAGE = REPO_ROOT / "src" / "finetune_worker"
OLD_RUN = Path(__file__).parent / "data" / "run-written-before-the-layout-move.tar.gz"
# The job that wrote OLD_RUN with release 0.1.0 (commit b7eca5c): killed after its
# checkpoint at step 4 of 12. Its config.yaml names the progress plugin by its old path.
OLD_JOB = {
    "user_id": "tester", "model_id": "tiny-llama-facts", "run_id": "written-before-the-move",
    "args": {
        "base_model": "examples/tiny-llama", "datasets": [{"path": "examples/tiny_alpaca.jsonl", "type": "alpaca", "ds_type": "json"}],
        "adapter": "lora", "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "lora_target_linear": True, "sequence_len": 256,
        "micro_batch_size": 4, "gradient_accumulation_steps": 1, "max_steps": 12, "learning_rate": 0.002, "lr_scheduler": "cosine",
        "warmup_steps": 2, "logging_steps": 1, "save_steps": 4, "save_total_limit": 1, "val_set_size": 0,
    },
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """The package's modules this file imports at module level (not inside functions)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                found.add(candidate if importlib.util.find_spec(base) and _is_module(candidate) else base)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {module for module in found if module.startswith("finetune_worker")}


def _is_module(dotted: str) -> bool:
    try:
        return importlib.util.find_spec(dotted) is not None
    except ModuleNotFoundError:
        return False


def test_no_module_imports_one_that_imports_it_back():
    graph = {_module_name(path): _imports(path) for path in PACKAGE.rglob("*.py")}
    cycles = []

    def visit(module: str, trail: list[str]) -> None:
        for target in sorted(graph.get(module, ())):
            if target in trail:
                cycles.append(trail[trail.index(target):] + [target])
            elif target in graph and len(trail) < 40:
                visit(target, [*trail, target])

    for module in sorted(graph):
        visit(module, [module])
    assert not cycles, "import circles: " + "; ".join(" -> ".join(cycle) for cycle in cycles[:5])


def layer_order() -> list[str]:
    """The folders in the order CONTRIBUTING.md lists them ("## Layers"); the package's
    top-level modules (`pipeline.py`) take the place of `pipeline.py` there."""
    text = (REPO_ROOT / "CONTRIBUTING.md").read_text(encoding="utf-8")
    section = text.split("## Layers", 1)[1].split("\n## ", 1)[0]
    found = re.findall(r"^\d+\. `([a-z_]+)(?:/|\.py)`", section, flags=re.M)
    return ["(top)" if name == "pipeline" else name for name in found]


def _folder(module: str) -> str:
    """The layer of a dotted module of the package: its folder, or (top) for a top-level module."""
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and (PACKAGE / parts[1]).is_dir()) else "(top)"


def _all_imports(path: Path) -> list[tuple[int, str]]:
    """Every import of the package in this file, at module level or inside a function: (line, module)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("finetune_worker"):
            found += [(node.lineno, node.module)] + [(node.lineno, f"{node.module}.{a.name}") for a in node.names if node.module == "finetune_worker"]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("finetune_worker")]
    return found


def test_the_folders_form_the_stack_contributing_lists():
    order = layer_order()
    folders = sorted(p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists())
    assert sorted(set(order) - {"(top)"}) == folders, "CONTRIBUTING.md's layers must list every folder of the package"
    against = []
    for path in sorted(PACKAGE.rglob("*.py")):
        own = _folder(_module_name(path))
        for line, module in _all_imports(path):
            if order.index(_folder(module)) > order.index(own):
                against.append(f"{path.relative_to(PACKAGE)}:{line} ({own}) imports {module} ({_folder(module)})")
    assert against == [], "imports against the layers of CONTRIBUTING.md:\n" + "\n".join(against)


def test_the_layer_check_sees_imports_inside_functions(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("def f():\n    from finetune_worker.pipeline import run_job\n    import finetune_worker.entry.cli\n")
    assert [module for _, module in _all_imports(sample)] == ["finetune_worker.pipeline", "finetune_worker.entry.cli"]
    assert [_folder(m) for _, m in _all_imports(sample)] == ["(top)", "entry"]


def test_every_child_module_the_plan_names_exists():
    from finetune_worker.plan import children

    modules = [value for name, value in vars(children).items() if name.endswith("_MODULE")]
    assert len(modules) >= 6
    assert [module for module in modules if not _module_file_exists(module)] == []


def _module_file_exists(dotted: str) -> bool:
    """Found as `python -m` would find it, without importing its packages (Axolotl's
    package __init__ sets up logging on the test's captured stderr)."""
    search = None
    for part in dotted.split("."):
        spec = importlib.machinery.PathFinder.find_spec(part, search)
        if spec is None:
            return False
        search = spec.submodule_search_locations
    return True


def test_the_progress_plugin_keeps_its_old_dotted_path():
    """A config.yaml written before the move names it so (Pod users rerun `axolotl train` on it)."""
    old = "finetune_worker.progress_plugin.ProgressPlugin"
    module, _, cls = old.rpartition(".")
    from finetune_worker.plan.config import PROGRESS_PLUGIN

    assert PROGRESS_PLUGIN != old and getattr(importlib.import_module(module), cls) is _load(PROGRESS_PLUGIN)


def _load(dotted: str):
    module, _, cls = dotted.rpartition(".")
    return getattr(importlib.import_module(module), cls)


@pytest.mark.training
def test_a_run_written_before_the_move_resumes_from_its_checkpoint(env, volume):
    runs = volume / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    with tarfile.open(OLD_RUN) as archive:
        archive.extractall(runs, filter="data")
    run_dir = runs / "tester" / "written-before-the-move"
    assert "finetune_worker.progress_plugin.ProgressPlugin" in (run_dir / "config.yaml").read_text()
    record = json.loads((run_dir / "job.json").read_text())
    assert record["run_id"] == OLD_JOB["run_id"] and record["args"] == OLD_JOB["args"]
    # The digest covers the args as validated, where `examples/` became an absolute path
    # in the checkout that wrote the run (/tmp/oldrel): the same release in this checkout
    # would have written this one.
    here = validate_job(OLD_JOB, WorkerSettings.from_env(env), CPU_ONLY).args
    there = json.loads(json.dumps(here).replace(str(REPO_ROOT), "/tmp/oldrel"))
    assert record["args_sha256"] == args_digest(there)
    record["args_sha256"] = args_digest(here)
    (run_dir / "job.json").write_text(json.dumps(record))

    evs = collect(OLD_JOB, env)
    assert evs[-1]["type"] == "result", evs[-1]
    resumed = [e for e in evs if e["type"] == "status" and e.get("resumed_from_step")]
    assert resumed and resumed[0]["resumed_from_step"] == 4
    progress = [e for e in evs if e["type"] == "progress"]
    assert progress and progress[0]["step"] > 4 and progress[-1]["step"] == 12
    assert evs[-1]["metrics"]["total_steps"] == 12
