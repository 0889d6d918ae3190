"""Check that the image and the tests run the same engine.

The Dockerfile's base image tag (axolotlai/axolotl:<axolotl>-py<python>-cu<cuda>-<torch>)
must name the Axolotl and torch versions pinned in builder/constraints.txt (what the
tests install), be pinned by digest, and match docker-bake.hcl; builder/requirements.txt
(what the image installs on top) must pin the same versions as the constraints.

    python builder/check_versions.py
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TAG = re.compile(r"^axolotlai/axolotl:(?P<axolotl>[\d.]+)-py(?P<python>[\d.]+)-cu(?P<cuda>\d+)-(?P<torch>[\d.]+)@sha256:[0-9a-f]{64}$")


def pins(path: Path) -> dict[str, str]:
    found = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        match = re.match(r"^([A-Za-z0-9_.\-\[\]]+)==([^\s;#]+)", line.strip())
        if match:
            found[match.group(1).lower().replace("_", "-")] = match.group(2)
    return found


def base_image(path: Path, pattern: str) -> str:
    match = re.search(pattern, path.read_text(encoding="utf-8"), re.M)
    if not match:
        raise SystemExit(f"{path.name}: no base image found")
    return match.group(1)


def problems() -> list[str]:
    found = []
    image = base_image(ROOT / "Dockerfile", r"^ARG BASE_IMAGE=(\S+)$")
    bake = base_image(ROOT / "docker-bake.hcl", r'variable "BASE_IMAGE" \{\s*default = "([^"]+)"')
    if image != bake:
        found.append(f"Dockerfile's BASE_IMAGE {image} differs from docker-bake.hcl's {bake}")
    tag = TAG.match(image)
    constraints = pins(ROOT / "builder" / "constraints.txt")
    if not tag:
        found.append(f"base image {image} is not axolotlai/axolotl:<axolotl>-py<python>-cu<cuda>-<torch>@sha256:<digest>")
    else:
        for package in ("axolotl", "torch"):
            if tag[package] != constraints.get(package):
                found.append(f"the image has {package} {tag[package]}, the tests run {package} {constraints.get(package)}")
    axolotl_pin = pins(ROOT / "builder" / "requirements-axolotl.txt").get("axolotl")
    if axolotl_pin != constraints.get("axolotl"):
        found.append(f"requirements-axolotl.txt pins axolotl {axolotl_pin}, constraints.txt {constraints.get('axolotl')}")
    for package, version in pins(ROOT / "builder" / "requirements.txt").items():
        if constraints.get(package) != version:
            found.append(f"requirements.txt pins {package}=={version}, the tests run {constraints.get(package)}")
    return found


if __name__ == "__main__":
    issues = problems()
    for issue in issues:
        print(f"version mismatch: {issue}", file=sys.stderr)
    if not issues:
        print("versions: the image's Axolotl and torch, and every runtime pin, match what the tests run")
    sys.exit(1 if issues else 0)
