#!/usr/bin/env python3
"""Every config option name that a released Axolotl version ever had.

The worker drops an option of an earlier Axolotl release with a warning and refuses
a typo with a did-you-mean; this script builds the list that tells the two apart
(src/finetune_worker/checks/axolotl_option_history.json).

For every release of axolotl on the package index (`pip index versions`), the
wheel (or, for releases without one, the sdist) is downloaded into --cache and read
in place: nothing is installed, imported or built. Axolotl's pydantic config
schema is read with `ast`:

* the roots are `AxolotlInputConfig` (axolotl/utils/schemas/config.py from 0.8,
  axolotl/utils/config/models/input/v0_4_1 before) and the input-argument models
  that the bundled plugins name in `get_input_args` (axolotl/integrations/*);
* a model's fields are its annotated class attributes and those of its bases
  (mixins included), with the names `Field(alias=...)` and `validation_alias`
  (a string or `AliasChoices`) add;
* a field whose type names other models nests them: `<parent>.<field>`, walked the
  way the worker walks the live schema (checks/options.py `schema_options`). Entries of
  `datasets`, `test_datasets` and `pretraining_dataset` share the `datasets.`
  namespace (`datasets.path`, `datasets.type.field_system`); top-level names are
  kept as they are.

Output (--out): {"generated_by", "versions", "skipped", "options": {name: {"first",
"last"[, "absent_in"]}}}; `absent_in` lists the releases between first and last that
lack the name. Run it with Python 3.12 (stdlib only; pip is run as a subprocess):

    python builder/axolotl_option_history.py --cache /tmp/axolotl-wheels \
        --max-version 0.21.0 --out src/finetune_worker/checks/axolotl_option_history.json
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import html.parser
import json
import os
import re
import subprocess
import sys
import tarfile
import time
import urllib.parse
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

PROJECT = "axolotl"
PYTHON_VERSION = "3.12"
DATASET_LIST_KEYS = ("datasets", "test_datasets", "pretraining_dataset")
ROOT_CLASS = "AxolotlInputConfig"
# Where the root schema class may live (searched in this order; any other module of
# axolotl/utils/ defining it is found too).
ROOT_MODULES = ("axolotl.utils.schemas.config", "axolotl.utils.config.models.input.v0_4_1")
_VERSION_RE = re.compile(r"^(\d+(?:\.\d+)*)(?:\.post(\d+))?$")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def version_key(version: str) -> tuple:
    match = _VERSION_RE.match(version)
    if not match:
        raise ValueError(f"not a final release version: {version}")
    release = tuple(int(part) for part in match.group(1).split("."))
    release += (0,) * (4 - len(release))
    return (*release, int(match.group(2) or -1))


# -- the package index ----------------------------------------------------------------


def pip(python: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [python, "-m", "pip", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
    )


def released_versions(python: str) -> list[str]:
    """Final releases on the index, oldest first (pip leaves out yanked and pre-releases).

    `--python-version 3.12` keeps the releases that need Python 3.12 (0.20+) in the list
    whichever interpreter runs pip."""
    result = pip(python, "index", "versions", PROJECT, "--python-version", PYTHON_VERSION)
    match = re.search(r"Available versions:\s*(.+)", result.stdout)
    if result.returncode or not match:
        raise SystemExit(f"pip index versions {PROJECT} failed:\n{result.stdout}{result.stderr}")
    versions = [v.strip() for v in match.group(1).split(",") if _VERSION_RE.match(v.strip())]
    return sorted(versions, key=version_key)


def index_url(python: str) -> str:
    """The index pip downloads from (PIP_INDEX_URL or pip's configuration), else PyPI."""
    if os.environ.get("PIP_INDEX_URL"):
        return os.environ["PIP_INDEX_URL"].rstrip("/")
    result = pip(python, "config", "list", timeout=60)
    found = {}
    for line in result.stdout.splitlines():
        key, _, value = line.partition("=")
        if key.endswith(".index-url"):
            found[key.split(".", 1)[0]] = value.strip().strip("'\"")
    for scope in (":env:", "download", "global"):
        if found.get(scope):
            return found[scope].rstrip("/")
    return "https://pypi.org/simple"


class _Anchors(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.links: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        if tag == "a":
            attributes = dict(attrs)
            if attributes.get("href"):
                self.links.append((attributes["href"], attributes))


def sdist_links(index: str) -> dict[str, tuple[str, str | None]]:
    """{file name: (url, sha256)} of the project's page on a PEP 691/503 simple index."""
    page = f"{index}/{PROJECT}/"
    request = urllib.request.Request(page, headers={"Accept": "application/vnd.pypi.simple.v1+json, text/html;q=0.1"})
    with urllib.request.urlopen(request, timeout=120) as response:
        body = response.read()
        content_type = response.headers.get("Content-Type", "")
    links = {}
    if "json" in content_type:
        for entry in json.loads(body)["files"]:
            url = urllib.parse.urljoin(page, entry["url"])
            links[entry["filename"]] = (url, entry.get("hashes", {}).get("sha256"))
        return links
    parser = _Anchors()
    parser.feed(body.decode("utf-8", "replace"))
    for href, _ in parser.links:
        url, _, fragment = urllib.parse.urljoin(page, href).partition("#")
        sha = fragment.split("=", 1)[1] if fragment.startswith("sha256=") else None
        links[urllib.parse.unquote(url.rsplit("/", 1)[-1])] = (url, sha)
    return links


def cached_archive(cache: Path, version: str) -> Path | None:
    for name in (f"{PROJECT}-{version}-py3-none-any.whl", f"{PROJECT}-{version}.tar.gz"):
        if (cache / name).is_file():
            return cache / name
    wheels = sorted(cache.glob(f"{PROJECT}-{version}-*.whl"))
    return wheels[0] if wheels else None


def fetch(python: str, cache: Path, version: str, links: dict | None, sdist_via_pip: bool) -> Path:
    """The release's wheel (pip download), else its sdist, in `cache`."""
    if found := cached_archive(cache, version):
        return found
    has_wheel = links is None or any(n.startswith(f"{PROJECT}-{version}-") and n.endswith(".whl") for n in links)
    if has_wheel:
        result = pip(
            python,
            "download",
            "--no-deps",
            "--python-version",
            PYTHON_VERSION,
            "--only-binary=:all:",
            "--dest",
            str(cache),
            f"{PROJECT}=={version}",
        )
        if found := cached_archive(cache, version):
            return found
        if links is not None:
            raise RuntimeError(f"pip download of the {version} wheel failed: {result.stderr.strip()[-400:]}")
    sdist = f"{PROJECT}-{version}.tar.gz"
    if links is not None and sdist in links and not sdist_via_pip:
        # Read straight from the index: `pip download` of an sdist runs its build backend
        # (setup.py) to prepare metadata, which takes minutes and executes the release's code.
        url, sha = links[sdist]
        with urllib.request.urlopen(url, timeout=300) as response:
            data = response.read()
        if sha and hashlib.sha256(data).hexdigest() != sha:
            raise RuntimeError(f"{sdist}: sha256 does not match the index")
        (cache / f"{sdist}.part").write_bytes(data)
        (cache / f"{sdist}.part").rename(cache / sdist)
        return cache / sdist
    result = pip(python, "download", "--no-deps", "--no-binary=:all:", "--dest", str(cache), f"{PROJECT}=={version}")
    if found := cached_archive(cache, version):
        return found
    raise RuntimeError(f"no archive of {PROJECT} {version}: {result.stderr.strip()[-400:]}")


def read_sources(archive: Path) -> dict[str, bytes]:
    """{'axolotl/…/x.py': source} of the package inside a wheel or an sdist, read in memory."""
    files: dict[str, bytes] = {}

    def keep(name: str) -> str | None:
        parts = name.split("/")
        if archive.name.endswith(".tar.gz"):
            parts = parts[1:]  # axolotl-<version>/
        if parts[:1] == ["src"]:
            parts = parts[1:]
        if parts[:1] == [PROJECT] and name.endswith(".py"):
            return "/".join(parts)
        return None

    if archive.suffix == ".whl":
        with zipfile.ZipFile(archive) as zf:
            for name in zf.namelist():
                if path := keep(name):
                    files[path] = zf.read(name)
    else:
        with tarfile.open(archive, "r:gz") as tf:
            for member in tf.getmembers():
                if member.isfile() and (path := keep(member.name)):
                    files[path] = tf.extractfile(member).read()
    return files


# -- the static schema walk -------------------------------------------------------------


@dataclass
class Module:
    name: str
    package: str  # the package relative imports start from
    classes: dict[str, ast.ClassDef] = field(default_factory=dict)
    assigns: dict[str, ast.expr] = field(default_factory=dict)
    from_imports: dict[str, tuple[str, str]] = field(default_factory=dict)
    imports: dict[str, str] = field(default_factory=dict)
    star_imports: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ClassRef:
    module: str
    name: str


class Package:
    """One release's axolotl package, parsed lazily module by module."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.paths: dict[str, str] = {}
        self.files = files
        for path in files:
            parts = path[:-3].split("/")
            if parts[-1] == "__init__":
                parts = parts[:-1]
            self.paths[".".join(parts)] = path
        self.modules: dict[str, Module | None] = {}
        self.parse_failures: dict[str, str] = {}
        self._is_model: dict[ClassRef, bool] = {}
        self._fields: dict[ClassRef, list] = {}

    def module(self, name: str) -> Module | None:
        if name in self.modules:
            return self.modules[name]
        self.modules[name] = None
        path = self.paths.get(name)
        if path is None:
            return None
        try:
            tree = ast.parse(self.files[path], filename=path)
        except SyntaxError as exc:
            self.parse_failures[path] = f"{type(exc).__name__}: {exc}"
            return None
        is_package = path.endswith("/__init__.py")
        mod = Module(name, name if is_package else name.rpartition(".")[0])
        self._collect(mod, tree.body)
        self.modules[name] = mod
        return mod

    def _collect(self, mod: Module, body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, ast.ClassDef):
                mod.classes[node.name] = node
            elif isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
                mod.assigns[node.targets[0].id] = node.value
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value is not None:
                mod.assigns[node.target.id] = node.value
            elif isinstance(node, getattr(ast, "TypeAlias", ())):  # `type X = ...` (3.12)
                mod.assigns[node.name.id] = node.value
            elif isinstance(node, ast.ImportFrom):
                source = self._absolute(mod, node.module, node.level)
                for alias in node.names:
                    if alias.name == "*":
                        mod.star_imports.append(source)
                    else:
                        mod.from_imports[alias.asname or alias.name] = (source, alias.name)
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.asname:
                        mod.imports[alias.asname] = alias.name
                    else:
                        head = alias.name.split(".")[0]
                        mod.imports[head] = head
            elif isinstance(node, (ast.If, ast.Try)):
                # `if TYPE_CHECKING:` / `try: import … except ImportError:` blocks
                self._collect(mod, node.body)
                for handler in getattr(node, "handlers", []):
                    self._collect(mod, handler.body)
                self._collect(mod, node.orelse)

    @staticmethod
    def _absolute(mod: Module, name: str | None, level: int) -> str:
        if not level:
            return name or ""
        base = mod.package.split(".")
        base = base[: len(base) - (level - 1)]
        return ".".join(base + ([name] if name else []))

    # -- name resolution: a ClassRef, ("expr", module, node), ("module", name) or None

    def resolve_name(self, mod: Module, name: str, depth: int = 0):
        if depth > 30:
            return None
        if name in mod.classes:
            return ClassRef(mod.name, name)
        if name in mod.assigns:
            return ("expr", mod, mod.assigns[name])
        if name in mod.from_imports:
            source, attr = mod.from_imports[name]
            if (target := self.module(source)) is not None and (found := self.resolve_name(target, attr, depth + 1)):
                return found
            if f"{source}.{attr}" in self.paths:
                return ("module", f"{source}.{attr}")
            return None
        if name in mod.imports:
            return ("module", mod.imports[name])
        for source in mod.star_imports:
            if (target := self.module(source)) is not None and (found := self.resolve_name(target, name, depth + 1)):
                return found
        return None

    def resolve_expr(self, mod: Module, node: ast.expr, depth: int = 0):
        if isinstance(node, ast.Name):
            return self.resolve_name(mod, node.id, depth)
        if isinstance(node, ast.Attribute):
            base = self.resolve_expr(mod, node.value, depth + 1)
            if isinstance(base, tuple) and base[0] == "module":
                if (target := self.module(base[1])) is not None and (found := self.resolve_name(target, node.attr, depth + 1)):
                    return found
                if f"{base[1]}.{node.attr}" in self.paths:
                    return ("module", f"{base[1]}.{node.attr}")
        return None

    def classdef(self, ref: ClassRef) -> ast.ClassDef:
        return self.modules[ref.module].classes[ref.name]

    def bases(self, ref: ClassRef) -> list[tuple[ClassRef | None, ast.expr]]:
        mod = self.modules[ref.module]
        found = []
        for base in self.classdef(ref).bases:
            target = self.resolve_expr(mod, base)
            found.append((target if isinstance(target, ClassRef) else None, base))
        return found

    def is_model(self, ref: ClassRef, seen: frozenset = frozenset()) -> bool:
        """Subclasses pydantic's BaseModel, directly or through the package's own classes."""
        if ref in self._is_model:
            return self._is_model[ref]
        result = False
        for target, node in self.bases(ref):
            if target is None:
                last = node.attr if isinstance(node, ast.Attribute) else getattr(node, "id", None)
                if last == "BaseModel":
                    result = True
            elif target not in seen and self.is_model(target, seen | {ref}):
                result = True
        self._is_model[ref] = result
        return result

    def fields(self, ref: ClassRef, seen: frozenset = frozenset()) -> list[tuple[str, set[str], Module, ast.expr]]:
        """(field, accepted names, defining module, annotation) of a class and its bases,
        the nearest definition of a name winning (as pydantic resolves it)."""
        if ref in self._fields:
            return self._fields[ref]
        merged: dict[str, tuple] = {}
        for target, _ in reversed(self.bases(ref)):
            if target is not None and target not in seen:
                for entry in self.fields(target, seen | {ref}):
                    merged[entry[0]] = entry
        mod = self.modules[ref.module]
        for stmt in self.classdef(ref).body:
            if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
                continue
            name = stmt.target.id
            if name.startswith("_") or _is_classvar(stmt.annotation):
                continue
            merged.pop(name, None)
            merged[name] = (name, {name} | _aliases(stmt), mod, stmt.annotation)
        self._fields[ref] = list(merged.values())
        return self._fields[ref]

    def nested_models(self, mod: Module, annotation: ast.expr, depth: int = 0) -> list[ClassRef]:
        """The package's models a field's type names (through unions, containers,
        Annotated, conlist(...), string forward references and type aliases)."""
        found: list[ClassRef] = []
        if depth > 10:
            return found

        def visit(node: ast.AST) -> None:
            if isinstance(node, ast.Subscript):
                head = node.value.attr if isinstance(node.value, ast.Attribute) else getattr(node.value, "id", "")
                if head == "Literal":
                    return
                visit(node.value)
                visit(node.slice)
                return
            if isinstance(node, ast.Call):
                func = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
                if func in ("Field", "AliasChoices", "AliasPath"):
                    return
                for arg in node.args:
                    visit(arg)
                return
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                try:
                    visit(ast.parse(node.value, mode="eval").body)
                except SyntaxError:
                    pass
                return
            if isinstance(node, (ast.Name, ast.Attribute)):
                target = self.resolve_expr(mod, node)
                if isinstance(target, ClassRef):
                    if self.is_model(target) and target not in found:
                        found.append(target)
                elif isinstance(target, tuple) and target[0] == "expr":
                    for ref in self.nested_models(target[1], target[2], depth + 1):
                        if ref not in found:
                            found.append(ref)
                return
            for child in ast.iter_child_nodes(node):
                visit(child)

        visit(annotation)
        return found


def _call_name(node: ast.AST) -> str:
    if isinstance(node, ast.Call):
        return node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
    return ""


def _is_classvar(annotation: ast.expr) -> bool:
    node = annotation.value if isinstance(annotation, ast.Subscript) else annotation
    if isinstance(annotation, ast.Constant) and isinstance(annotation.value, str):
        return annotation.value.startswith(("ClassVar", "typing.ClassVar"))
    return (isinstance(node, ast.Name) and node.id == "ClassVar") or (isinstance(node, ast.Attribute) and node.attr == "ClassVar")


def _aliases(stmt: ast.AnnAssign) -> set[str]:
    """The names `Field(alias=...)` / `validation_alias=` (a string or AliasChoices of
    strings) add, in the default value or in Annotated[...] metadata."""
    names: set[str] = set()
    calls = [stmt.value] if stmt.value is not None else []
    calls += [node for node in ast.walk(stmt.annotation) if _call_name(node) == "Field"]
    for call in calls:
        if _call_name(call) != "Field":
            continue
        for keyword in call.keywords:
            value = keyword.value
            if keyword.arg == "alias" and isinstance(value, ast.Constant) and isinstance(value.value, str):
                names.add(value.value)
            elif keyword.arg == "validation_alias":
                if isinstance(value, ast.Constant) and isinstance(value.value, str):
                    names.add(value.value)
                elif _call_name(value) == "AliasChoices":
                    names.update(a.value for a in value.args if isinstance(a, ast.Constant) and isinstance(a.value, str))
    return names


def _canonical(path: str) -> str:
    """Entries of every dataset list share the `datasets.` namespace (nested paths only)."""
    head, _, rest = path.partition(".")
    return f"datasets.{rest}" if head in DATASET_LIST_KEYS and rest else path


@dataclass
class Scan:
    options: set[str]
    roots: list[str]
    parse_failures: dict[str, str]
    problems: list[str]


def scan(files: dict[str, bytes]) -> Scan | None:
    """The option names of one release; None when it has no pydantic config schema."""
    package = Package(files)
    roots: list[ClassRef] = []
    problems: list[str] = []
    candidates = list(ROOT_MODULES) + sorted(
        name
        for name, path in package.paths.items()
        if name.startswith(f"{PROJECT}.utils.") and name not in ROOT_MODULES and f"class {ROOT_CLASS}".encode() in files[path]
    )
    for name in candidates:
        mod = package.module(name)
        if mod is not None and ROOT_CLASS in mod.classes:
            roots.append(ClassRef(name, ROOT_CLASS))
            break  # the first one in ROOT_MODULES order is the one axolotl uses
    if not roots or not package.is_model(roots[0]):
        return None

    # The plugins' input arguments: the dotted class names their get_input_args return.
    for name in sorted(package.paths):
        if not name.startswith(f"{PROJECT}.integrations.") or name.count(".") < 2:
            continue
        mod_tree = _tree(package, name)
        if mod_tree is None:
            continue
        for node in ast.walk(mod_tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == "get_input_args":
                for ret in ast.walk(node):
                    if isinstance(ret, ast.Return) and isinstance(ret.value, ast.Constant) and isinstance(ret.value.value, str):
                        target_module, _, class_name = ret.value.value.rpartition(".")
                        target = package.module(target_module)
                        ref = package.resolve_name(target, class_name) if target else None
                        if isinstance(ref, ClassRef) and package.is_model(ref):
                            if ref not in roots:
                                roots.append(ref)
                        else:
                            problems.append(f"{name}: get_input_args names {ret.value.value!r}, not found as a model")

    options: set[str] = set()

    def walk(ref: ClassRef, prefix: str, seen: frozenset) -> None:
        for name, names, mod, annotation in package.fields(ref):
            canonical = _canonical(prefix + name)
            for alias in names:
                options.add(_canonical(prefix + alias))
            for nested in package.nested_models(mod, annotation):
                if nested not in seen:
                    walk(nested, canonical + ".", seen | {nested})

    for root in roots:
        walk(root, "", frozenset({root}))
    return Scan(options, [f"{r.module}.{r.name}" for r in roots], package.parse_failures, problems)


def _tree(package: Package, name: str) -> ast.Module | None:
    path = package.paths[name]
    try:
        return ast.parse(package.files[path], filename=path)
    except SyntaxError as exc:
        package.parse_failures[path] = f"{type(exc).__name__}: {exc}"
        return None


# -- the history ------------------------------------------------------------------------


def _dump(history: dict) -> str:
    """JSON with one line per option (readable diffs when a release is added)."""
    head = {k: v for k, v in history.items() if k != "options"}
    text = json.dumps(head, indent=1)[:-2] + ',\n "options": {\n'
    lines = [f"  {json.dumps(name)}: {json.dumps(entry)}" for name, entry in history["options"].items()]
    return text + ",\n".join(lines) + "\n }\n}\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, default=Path("/tmp/axolotl-wheels"), help="download folder (reused)")
    parser.add_argument("--out", type=Path, required=True, help="the JSON file to write")
    parser.add_argument("--max-version", help="leave out releases after this one")
    parser.add_argument("--versions", nargs="+", help="scan only these releases")
    parser.add_argument("--python", default=sys.executable, help="the interpreter whose pip is used")
    parser.add_argument(
        "--sdist-via-pip",
        action="store_true",
        help="download sdists with pip too (slow: pip runs each sdist's build backend to read its metadata)",
    )
    args = parser.parse_args(argv)
    started = time.monotonic()
    args.cache.mkdir(parents=True, exist_ok=True)

    versions = sorted(args.versions, key=version_key) if args.versions else released_versions(args.python)
    if args.max_version:
        versions = [v for v in versions if version_key(v) <= version_key(args.max_version)]
    links = None
    if not all(cached_archive(args.cache, v) for v in versions):
        try:
            links = sdist_links(index_url(args.python))
        except (OSError, ValueError, KeyError) as exc:
            log(f"cannot read the index page ({exc}); using pip for every download")

    per_version: dict[str, set[str]] = {}
    skipped: dict[str, str] = {}
    for version in versions:
        t0 = time.monotonic()
        archive = fetch(args.python, args.cache, version, links, args.sdist_via_pip)
        files = read_sources(archive)
        result = scan(files) if files else None
        if result is None:
            skipped[version] = (
                f"{archive.name} holds no {PROJECT} package" if not files else f"{archive.name} has no pydantic {ROOT_CLASS}"
            )
            log(f"{version}: skipped, {skipped[version]}")
            continue
        per_version[version] = result.options
        for path, error in result.parse_failures.items():
            log(f"{version}: cannot parse {path}: {error}")
        for problem in result.problems:
            log(f"{version}: {problem}")
        log(
            f"{version}: {len(result.options)} names from {archive.name} "
            f"({len(result.roots)} roots, {time.monotonic() - t0:.1f}s)"
        )

    covered = sorted(per_version, key=version_key)
    options = {}
    for name in sorted(set().union(*per_version.values()) if per_version else ()):
        present = [v for v in covered if name in per_version[v]]
        entry = {"first": present[0], "last": present[-1]}
        span = covered[covered.index(present[0]) : covered.index(present[-1]) + 1]
        if absent := [v for v in span if name not in per_version[v]]:
            entry["absent_in"] = absent
        options[name] = entry
    history = {
        "generated_by": "builder/axolotl_option_history.py (static ast scan of the released wheels/sdists; "
        "nothing installed or imported)",
        "versions": covered,
        "skipped": skipped,
        "options": options,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(_dump(history))
    log(
        f"{len(options)} names over {len(covered)} releases ({covered[0] if covered else '-'}"
        f"..{covered[-1] if covered else '-'}) in {time.monotonic() - started:.1f}s -> {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
