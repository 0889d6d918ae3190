"""Axolotl's own config schema, asked the questions the worker needs answered.

Axolotl is imported lazily (it pulls in torch and transformers). A config is checked
the way `axolotl train` checks it: its plugins are registered in Axolotl's plugin
manager (which adds their options and validators), then it is validated. The plugin
manager is a process-wide singleton, so registration happens inside
`registered_plugins`, which gives the manager back exactly as it found it.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import importlib
import importlib.util
import os
import pkgutil
import sys
import tempfile
import threading
import warnings
from functools import cache, lru_cache
from typing import TYPE_CHECKING, Any

from finetune_worker.contract.errors import Problem
from finetune_worker.contract.job import format_loc, suggest

if TYPE_CHECKING:
    from finetune_worker.host.hardware import Hardware

INTEGRATIONS_PACKAGE = "axolotl.integrations."
_IMPORTED = False


@contextlib.contextmanager
def _quiet_fds():
    """Hold back what the first Axolotl import prints (torchao, bitsandbytes and
    torch notices on stderr); show it only if the import fails."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            sink.seek(0)
            sys.stderr.write(sink.read().decode(errors="replace"))
            raise
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


def import_axolotl() -> None:
    """Import the parts of Axolotl the checks use, once, quietly."""
    global _IMPORTED
    if _IMPORTED:
        return
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    with _quiet_fds(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        importlib.import_module("axolotl.utils.config")
        importlib.import_module("axolotl.utils.data.wrappers")
    _IMPORTED = True


def _field_names(model: Any) -> set[str]:
    names: set[str] = set()
    for name, info in model.model_fields.items():
        names.add(name)
        if info.alias:
            names.add(info.alias)
        choices = getattr(info.validation_alias, "choices", None) or ()
        names.update(c for c in choices if isinstance(c, str))
        if isinstance(info.validation_alias, str):
            names.add(info.validation_alias)
    return names


def load_plugin_class(plugin: str) -> Any:
    module_name, class_name = plugin.rsplit(".", 1)
    return getattr(importlib.import_module(module_name), class_name)


_REGISTRY_LOCK = threading.RLock()


@contextlib.contextmanager
def registered_plugins(plugins: tuple[str, ...] = ()):
    """Axolotl's plugin manager holding exactly `plugins` (in order), as `axolotl train`
    registers a config's plugins before validating it; afterwards the manager holds
    what it held before, so one job's plugins never reach the next job's checks.

    Only the registration is done: the plugins' `register(cfg)` hooks are not run,
    because they act on the process (Liger sets LIGER_KERNEL_IMPL, NeMo Gym clones
    and starts servers), which belongs to the training child. A plugin that cannot
    be loaded raises here (Axolotl's own `register` would log it and carry on), and so
    does a name that `plugin_problem` refuses: loading a plugin instantiates it.
    """
    import_axolotl()
    from axolotl.integrations.base import PluginManager, load_plugin

    for plugin in plugins:
        message = plugin_problem(plugin)
        if message:
            raise ValueError(f"plugin {plugin!r} cannot be registered: {message}")
    with _REGISTRY_LOCK:
        manager = PluginManager.get_instance()
        saved_plugins, saved_cfg = manager.plugins, manager.cfg
        manager.plugins = collections.OrderedDict()
        try:
            for plugin in plugins:
                manager.plugins[plugin] = load_plugin(plugin)
            yield manager
        finally:
            manager.plugins = saved_plugins
            manager.cfg = saved_cfg


def input_config_model(plugins: tuple[str, ...] = ()) -> Any:
    """AxolotlInputConfig as Axolotl builds it with `plugins` registered (their input args merged in)."""
    import_axolotl()
    from axolotl.integrations.config import merge_input_args

    with registered_plugins(plugins):
        return merge_input_args()[1]


@cache
def known_keys(plugins: tuple[str, ...] = ()) -> frozenset[str]:
    return frozenset(_field_names(input_config_model(plugins)))


@lru_cache(maxsize=1)
def builtin_dataset_types() -> tuple[str, ...]:
    """The `type:` names Axolotl resolves for SFT datasets."""
    import_axolotl()
    import axolotl.prompt_strategies as strategies
    from axolotl.utils.data.wrappers import DATASET_HANDLERS

    modules = [m.name for m in pkgutil.iter_modules(strategies.__path__) if not m.name.startswith("_")]
    skip = {"base", "user_defined", "jinja_template_analyzer"}
    return tuple(sorted(set(DATASET_HANDLERS) | {"messages"} | (set(modules) - skip)))


def _strategy_module_exists(name: str) -> bool:
    try:
        return importlib.util.find_spec(f"axolotl.prompt_strategies.{name}") is not None
    except (ImportError, ValueError):
        return False


def dataset_type_problem(type_name: str) -> str | None:
    """None when Axolotl can load this SFT dataset type, else a message with a hint."""
    base = type_name.split(":", 1)[0]
    if base in builtin_dataset_types():
        return None
    parts = base.split(".")
    if parts[-1] == "load" or parts[-1].startswith("load_"):
        parts = parts[:-1]
    if parts and all(p.isidentifier() for p in parts) and _strategy_module_exists(".".join(parts)):
        return None
    return f"unknown type '{type_name}'{suggest(base, list(builtin_dataset_types()))}"


@lru_cache(maxsize=1)
def bundled_integrations() -> tuple[str, ...]:
    import_axolotl()
    import axolotl.integrations as integrations

    return tuple(sorted(m.name for m in pkgutil.iter_modules(integrations.__path__) if m.ispkg))


def integration_name(plugin: Any) -> str | None:
    """`liger` for axolotl.integrations.liger.LigerPlugin (or .liger.plugin.LigerPlugin)."""
    parts = str(plugin).split(".")
    return parts[2] if len(parts) > 3 and parts[:2] == ["axolotl", "integrations"] else None


def plugin_problem(plugin: Any) -> str | None:
    if not isinstance(plugin, str) or not plugin.startswith(INTEGRATIONS_PACKAGE) or "." not in plugin[len(INTEGRATIONS_PACKAGE):]:
        names = ", ".join(bundled_integrations())
        return f"only Axolotl's bundled integrations are allowed (axolotl.integrations.<name>.<Class>; names: {names})"
    module_name, class_name = plugin.rsplit(".", 1)
    try:
        found = importlib.util.find_spec(module_name) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        integration = module_name[len(INTEGRATIONS_PACKAGE):].split(".")[0]
        return f"no such integration '{integration}'{suggest(integration, list(bundled_integrations()))}"
    try:
        plugin_class = load_plugin_class(plugin)
    except (ImportError, AttributeError) as exc:
        return f"cannot load plugin class '{class_name}': {exc.__class__.__name__}"
    from axolotl.integrations.base import BasePlugin

    # Registering a plugin calls the named object: it must be a plugin class, not any callable of the module.
    if not (isinstance(plugin_class, type) and issubclass(plugin_class, BasePlugin)):
        return f"'{class_name}' in {module_name} is not an Axolotl plugin class"
    return None


def capabilities(hardware: Hardware, processes: int | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(capabilities, env_capabilities) as `axolotl train` computes them on `hardware`
    (axolotl.cli.config.gpu_capabilities) for the training child: its validators refuse
    what this GPU cannot do (fp8 before Hopper, SageAttention outside sm_80..sm_120).

    Without a GPU they are what Axolotl computes where CUDA is unavailable: no bf16,
    fp8 or tf32 and no compute capability. `n_gpu` is Axolotl's WORLD_SIZE, the number
    of training processes (one per GPU unless the job asks for fewer)."""
    import torch

    cc = hardware.compute_capability if hardware.has_gpu else None
    if processes is None:
        processes = hardware.gpu_count if hardware.gpu_count > 1 else 1
    gpu = {
        "bf16": bool(hardware.has_gpu and hardware.bf16),
        "fp8": bool(cc and cc >= (9, 0)),
        "tf32": bool(cc and cc >= (8, 0)),
        "n_gpu": processes,
        "compute_capability": f"sm_{cc[0]}{cc[1]}" if cc else None,
    }
    return gpu, {"torch_version": str(torch.__version__).split("+", maxsplit=1)[0]}


def schema_problems(
    args: dict[str, Any], plugins: tuple[str, ...] = (), hardware: Hardware | None = None, processes: int | None = None
) -> list[Problem]:
    """Run Axolotl's own validation (the one `axolotl train` runs) over `args`, with
    `plugins` registered first, as `axolotl train` registers the config's plugins,
    and, given the `hardware`, with the capabilities `axolotl train` would pass there.

    Axolotl merges the plugins' options and validators only when `args` lists plugins
    (`cfg.plugins`), as in the training child."""
    import_axolotl()
    from axolotl.utils.config import validate_config
    from axolotl.utils.dict import DictDefault
    from pydantic import ValidationError

    gpu, env = capabilities(hardware, processes) if hardware is not None else (None, None)
    problems: list[Problem] = []
    try:
        with registered_plugins(plugins):
            validate_config(DictDefault(copy.deepcopy(args)), capabilities=gpu, env_capabilities=env)
    except ValidationError as exc:
        for error in exc.errors():
            message = error["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
            if error["type"] == "missing":
                message = "required field is missing"
            problems.append(Problem(format_loc(("args", *error["loc"])), message))
    except Exception as exc:  # noqa: BLE001 - Axolotl's validators crash on some inputs (e.g. a null base_model_config)
        problems.append(Problem("args", f"Axolotl's config validation failed: {type(exc).__name__}: {exc}"))
    return problems


def planned_config_problems(config: dict[str, Any], hardware: Hardware | None = None, processes: int | None = None) -> list[Problem]:
    """Axolotl's check of the planned config, its plugins registered as `axolotl train`
    registers them (the last one is the worker's progress plugin, not Axolotl's), with
    the capabilities of `hardware` as `axolotl train` passes them."""
    return schema_problems(config, tuple(config["plugins"][:-1]), hardware, processes)
