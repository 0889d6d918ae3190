"""Check that the image and the tests run the same stack.

- The Dockerfile's base image tag (axolotlai/axolotl:<axolotl>-py<python>-cu<cuda>-<torch>,
  optionally @sha256:<digest>) names the Axolotl, Python and torch versions that the tests
  run (builder/constraints.txt, builder/setup_venv.sh), and matches docker-bake.hcl.
- Axolotl pins transformers, peft, trl, accelerate (and more) exactly; the constraints
  must hold those very versions, so the image (Axolotl's own install) and the tests agree.
- builder/requirements.txt (what the image installs on top) pins what the constraints pin,
  and so does builder/requirements-llama-cpp.txt (the GGUF converter's source).

    python builder/check_versions.py
"""

from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TAG = re.compile(
    r"^axolotlai/axolotl:(?P<axolotl>[\d.]+)-py(?P<python>[\d.]+)-cu(?P<cuda>\d+)-(?P<torch>[\d.]+)(@sha256:[0-9a-f]{64})?$"
)
# Axolotl's exact pins that decide what trains: they must be the tests' versions too.
ENGINE = ("torch", "transformers", "peft", "trl", "accelerate", "datasets", "pydantic", "liger-kernel", "bitsandbytes", "tokenizers")


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(path: Path) -> dict[str, str]:
    found = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        match = re.match(r"^([A-Za-z0-9_.\-\[\]]+)==([^\s;#]+)", line.strip())
        if match:
            found[normalise(match.group(1))] = match.group(2)
    return found


def base_image(path: Path, pattern: str) -> str:
    match = re.search(pattern, path.read_text(encoding="utf-8"), re.M)
    if not match:
        raise SystemExit(f"{path.name}: no base image found")
    return match.group(1)


def venv_python() -> str:
    match = re.search(r"^WANT=([\d.]+)$", (ROOT / "builder" / "setup_venv.sh").read_text(encoding="utf-8"), re.M)
    return match.group(1) if match else "?"


def axolotl_exact_pins() -> dict[str, str]:
    """What the installed Axolotl pins with ==, for its own platform (markers ignored)."""
    found = {}
    for requirement in metadata.requires("axolotl") or []:
        if "extra ==" in requirement:
            continue
        match = re.match(r"^([A-Za-z0-9_.\-]+)\s*==\s*([^\s;,]+)", requirement)
        if match:
            found[normalise(match.group(1))] = match.group(2)
    return found


def image_problems(constraints: dict[str, str]) -> list[str]:
    found = []
    image = base_image(ROOT / "Dockerfile", r"^ARG BASE_IMAGE=(\S+)$")
    bake = base_image(ROOT / "docker-bake.hcl", r'variable "BASE_IMAGE" \{\s*default = "([^"]+)"')
    if image != bake:
        found.append(f"Dockerfile's BASE_IMAGE {image} differs from docker-bake.hcl's {bake}")
    tag = TAG.match(image)
    if not tag:
        return [*found, f"base image {image} is not axolotlai/axolotl:<axolotl>-py<python>-cu<cuda>-<torch>[@sha256:<digest>]"]
    for package in ("axolotl", "torch"):
        if tag[package] != constraints.get(package):
            found.append(f"the image has {package} {tag[package]}, the tests run {package} {constraints.get(package)}")
    if tag["python"] != venv_python():
        found.append(f"the image has Python {tag['python']}, builder/setup_venv.sh makes a Python {venv_python()} venv")
    return found


def problems() -> list[str]:
    constraints = pins(ROOT / "builder" / "constraints.txt")
    found = image_problems(constraints)
    axolotl_pin = pins(ROOT / "builder" / "requirements-axolotl.txt").get("axolotl")
    if axolotl_pin != constraints.get("axolotl"):
        found.append(f"requirements-axolotl.txt pins axolotl {axolotl_pin}, constraints.txt {constraints.get('axolotl')}")
    llama_cpp_pin = pins(ROOT / "builder" / "requirements-llama-cpp.txt").get("llama-cpp-python")
    if llama_cpp_pin != constraints.get("llama-cpp-python"):
        found.append(f"requirements-llama-cpp.txt pins llama-cpp-python {llama_cpp_pin}, constraints.txt {constraints.get('llama-cpp-python')}")
    for package, version in pins(ROOT / "builder" / "requirements.txt").items():
        if constraints.get(package) != version:
            found.append(f"requirements.txt pins {package}=={version}, the tests run {constraints.get(package)}")
    installed = metadata.version("axolotl")
    if installed != constraints.get("axolotl"):
        found.append(f"this venv has axolotl {installed}, constraints.txt pins {constraints.get('axolotl')}: run make install")
    for package, version in axolotl_exact_pins().items():
        if package in constraints and constraints[package] != version:
            found.append(f"axolotl {installed} pins {package}=={version}, constraints.txt has {constraints[package]}")
    for package in ENGINE:
        if package not in constraints:
            found.append(f"constraints.txt does not pin {package}")
    if sys.version_info[:2] != tuple(int(p) for p in venv_python().split(".")):
        found.append(f"this check runs on Python {sys.version_info.major}.{sys.version_info.minor}, the stack is Python {venv_python()}")
    return found


if __name__ == "__main__":
    issues = problems()
    for issue in issues:
        print(f"version mismatch: {issue}", file=sys.stderr)
    if not issues:
        print("versions: the image's Axolotl, Python and torch, Axolotl's engine pins and every runtime pin match what the tests run")
    sys.exit(1 if issues else 0)
