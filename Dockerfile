# syntax=docker/dockerfile:1.7
# dia2-worker: Dia2 on RunPod serverless, with the weights baked into the image.
#
#   docker build -t dia2-worker --build-arg MODEL=nari-labs/Dia2-2B --build-arg MODEL_REVISION=<commit> .
#   docker build -t dia2-worker:demo --build-arg DEMO=1 .           # tiny random models, no download
#   (gated or private repos: add --secret id=hf_token,env=HF_TOKEN)
#   torch.compile's artifacts for the endpoint's GPU kind: see the compile-cache stages at the end.
#
# The command is the queue worker; SERVE_MODE=http makes it the OpenAI-compatible speech server for a
# load-balancing endpoint (PORT, default 8000; /ping also on PORT_HEALTH when that differs).
#
# Layers, largest and least often changed first: the Python environment (torch with its CUDA libraries),
# then the baked weights, then our code (small, changes most), then torch.compile's artifacts (if any).

ARG PYTHON_IMAGE=python:3.12-slim-bookworm

# --- the Python environment: pinned requirements in a venv that the runtime stage copies whole
FROM ${PYTHON_IMAGE} AS deps
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
COPY requirements.txt /tmp/requirements.txt
RUN pip install --no-compile -r /tmp/requirements.txt \
    && find /opt/venv -name "__pycache__" -prune -exec rm -rf {} + \
    && python -m compileall -q -j 0 /opt/venv/lib

# --- the weights: downloaded and converted once into the serving layout (bf16, engine order, manifest)
FROM deps AS weights
ARG MODEL=nari-labs/Dia2-2B
ARG MODEL_REVISION=main
ARG MIMI=kyutai/mimi
ARG MIMI_REVISION=main
ARG DTYPE=bfloat16
# Speech recognition for voice prefixes sent without words (DIR/asr); the original runtime uses Whisper large-v3.
# Pin ASR_REVISION to a commit of the repo: the bake records the one it resolved in manifest.json.
ARG ASR=Systran/faster-whisper-large-v3
ARG ASR_REVISION=main
ARG DEMO=0
WORKDIR /build
# Only the bake's import closure (tests/test_dockerfile.py checks it against the code): a change to the
# worker's other files (handler, runner, jobs, storage, CLIs) leaves this stage cached. When it does rerun,
# the bake is byte-identical (fixed modes and mtimes), so the runtime's weights layer keeps its digest.
COPY bake_weights.py ./
COPY dia2_worker/__init__.py dia2_worker/audio.py dia2_worker/batch.py dia2_worker/checkpoint.py \
     dia2_worker/config.py dia2_worker/encoders.py dia2_worker/engine.py dia2_worker/env.py \
     dia2_worker/generation.py dia2_worker/graphs.py dia2_worker/model.py dia2_worker/output.py \
     dia2_worker/params.py dia2_worker/random_asr.py dia2_worker/random_model.py dia2_worker/sampling.py \
     dia2_worker/shapes.py dia2_worker/text.py dia2_worker/timing.py ./dia2_worker/
COPY dia2_worker/mimi/__init__.py dia2_worker/mimi/codec.py dia2_worker/mimi/config.py \
     dia2_worker/mimi/conv.py dia2_worker/mimi/quantizer.py dia2_worker/mimi/rows.py \
     dia2_worker/mimi/streaming.py dia2_worker/mimi/transformer.py dia2_worker/mimi/weights.py ./dia2_worker/mimi/
ENV HF_HOME=/cache/huggingface
RUN --mount=type=secret,id=hf_token,env=HF_TOKEN --mount=type=cache,target=/cache/huggingface \
    if [ "$DEMO" = "1" ]; then \
        python bake_weights.py --demo --out /models/dia2; \
    else \
        python bake_weights.py --model "$MODEL" --revision "$MODEL_REVISION" --mimi "$MIMI" \
            --mimi-revision "$MIMI_REVISION" --asr "$ASR" --asr-revision "$ASR_REVISION" --dtype "$DTYPE" \
            --out /models/dia2; \
    fi \
    && python bake_weights.py --verify /models/dia2

# --- the runtime: venv, weights, code; nothing from the build stages' caches. g++: torch.compile builds its
# kernels with a C/C++ compiler (Inductor's CPU code, Triton's launchers), and Inductor checks for it even when
# everything comes from the compile cache.
FROM ${PYTHON_IMAGE} AS runtime
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates g++ \
    && rm -rf /var/lib/apt/lists/*
COPY --from=deps /opt/venv /opt/venv
COPY --from=weights /models/dia2 /models/dia2
WORKDIR /app
COPY handler.py test_input.json ./
COPY dia2_worker ./dia2_worker
RUN python -m compileall -q dia2_worker handler.py
ENV PATH=/opt/venv/bin:$PATH \
    MODEL_DIR=/models/dia2 \
    HF_HUB_OFFLINE=1 \
    PYTHONUNBUFFERED=1 \
    RUNPOD_LOG_LEVEL=INFO \
    OMP_WAIT_POLICY=PASSIVE
EXPOSE 8000
CMD ["python", "-u", "handler.py"]

# --- torch.compile's artifacts: the worker's start run with compile on (python -m dia2_worker.precompile),
# keeping what it compiled in /models/dia2/compile-cache/<device key>/. A worker that finds a cache for its
# device kind turns compile on (TORCH_COMPILE=auto) and compiles nothing at start; without one it runs
# uncompiled. Compiled code is device-specific (GPU model, CUDA, torch): the cache must be made on the kind of
# GPU the endpoint runs. RUN steps of `docker build` see no GPU, so for a GPU image make it with the image on
# such a machine, then build again with it as the `compile-cache` context (which replaces the stage below):
#   docker run --rm --gpus all -v "$PWD/compile-cache:/models/dia2/compile-cache" dia2-worker \
#       python -m dia2_worker.precompile --model-dir /models/dia2
#   docker build -t dia2-worker --build-context compile-cache=./compile-cache --build-arg MODEL=... .
# --build-arg COMPILE_CACHE=1 makes it here instead, on the build machine's CPU: for images that serve on a CPU.
FROM runtime AS compiled
ARG COMPILE_CACHE=0
RUN mkdir -p /compile-cache \
    && if [ "$COMPILE_CACHE" = "1" ]; then \
        python -m dia2_worker.precompile --model-dir /models/dia2 \
        && cp -a /models/dia2/compile-cache/. /compile-cache/; \
    fi

FROM scratch AS compile-cache
COPY --from=compiled /compile-cache /

# --- the image: the runtime, and the compile cache in its own small layer (empty when none was made)
FROM runtime AS image
COPY --from=compile-cache / /models/dia2/compile-cache/
