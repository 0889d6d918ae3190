# finetune-worker: a RunPod serverless worker (and Pod image) that fine-tunes LLMs with Axolotl.
#
# The base is the official Axolotl image for Python 3.12, pinned by tag (add @sha256:<digest>
# once read from the registry: docs/operating.md "The image" says how). Its Axolotl, Python and torch
# versions must match the ones the tests run against (builder/constraints.txt,
# builder/setup_venv.sh); builder/check_versions.py checks that in CI.
ARG BASE_IMAGE=axolotlai/axolotl:0.21.0-py3.12-cu130-2.13.0

# llama.cpp for `export:` (GGUF): its converter and llama-quantize, from the pinned,
# hash-checked llama-cpp-python sdist (builder/requirements-llama-cpp.txt), built on the
# same base so the binary matches its libc; only /opt/llama.cpp goes into the image.
FROM ${BASE_IMAGE} AS llama-cpp
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential cmake \
    && rm -rf /var/lib/apt/lists/*
COPY builder/requirements-llama-cpp.txt builder/install_llama_cpp.py /tmp/builder/
RUN python /tmp/builder/install_llama_cpp.py /opt/llama.cpp --quantize

FROM ${BASE_IMAGE}

# Optional: a Hub model id to bake into the image (for example NousResearch/Llama-3.2-1B),
# so that workers without a network volume start without downloading it.
ARG PREBAKE_MODEL=""

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

ENV PYTHONUNBUFFERED=1 \
    AXOLOTL_DO_NOT_TRACK=1 \
    RUNPOD_LOG_LEVEL=INFO \
    BASE_VOLUME=/runpod-volume \
    FINETUNE_PREBAKED_HF_CACHE=/opt/prebaked-hf-cache \
    FINETUNE_LLAMA_CPP_DIR=/opt/llama.cpp

# Never /workspace: RunPod mounts a Pod's volume there, which would hide the app.
WORKDIR /app

COPY --from=llama-cpp /opt/llama.cpp /opt/llama.cpp
COPY builder/requirements.txt builder/requirements.txt
RUN python -m pip install --no-cache-dir -r builder/requirements.txt

COPY pyproject.toml README.md test_input.json ./
COPY examples examples
COPY src src
RUN python -m pip install --no-cache-dir --no-deps -e . \
    && python -c "import finetune_worker.entry.worker, axolotl, runpod"

# The model is fetched anonymously: a gated model needs a build secret
# (docker buildx build --secret id=hf_token,env=HF_TOKEN), never a build argument.
RUN --mount=type=secret,id=hf_token,required=false \
    if [ -n "$PREBAKE_MODEL" ]; then \
      HF_TOKEN="$(cat /run/secrets/hf_token 2>/dev/null || true)" \
      HF_HUB_CACHE="$FINETUNE_PREBAKED_HF_CACHE" \
      hf download "$PREBAKE_MODEL" --exclude "original/*" "*.pth" "*.gguf"; \
    fi

CMD ["python", "-u", "src/handler.py"]
