# swissroll-diffusion API image. The same file builds the training image with --build-arg EXTRAS=train.
#
#   docker build -t swissroll-diffusion:latest .
#   docker build -t swissroll-diffusion:train --build-arg EXTRAS=train .
#   docker build -t swissroll-diffusion:cpu --build-arg TORCH_INDEX_URL=<CPU wheel index> .   (smaller, no CUDA)
#
# No CUDA base image: the torch wheel from PyPI bundles its CUDA runtime; the host needs only the NVIDIA driver
# and the NVIDIA container toolkit. Checked offline by tests/deploy/test_dockerfile.py.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --home-dir /app --no-create-home --shell /usr/sbin/nologin app

WORKDIR /app

# 1. Dependencies only, from pyproject.toml: this layer is rebuilt when pyproject.toml changes, not when code does.
#    TORCH_INDEX_URL (optional) installs the pinned torch from another index first, e.g. a CPU-only build.
COPY pyproject.toml /tmp/src/pyproject.toml
ARG TORCH_INDEX_URL=
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('/tmp/src/pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && if [ -n "$TORCH_INDEX_URL" ]; then pip install --index-url "$TORCH_INDEX_URL" "$(grep '^torch' /tmp/requirements.txt)"; fi \
    && pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# 1b. Optional extras (comma-separated names from [project.optional-dependencies]), e.g. EXTRAS=train.
ARG EXTRAS=
RUN if [ -n "$EXTRAS" ]; then \
        python -c "import sys, tomllib; o = tomllib.load(open('/tmp/src/pyproject.toml', 'rb'))['project']['optional-dependencies']; print('\n'.join(d for e in sys.argv[1].split(',') for d in o[e.strip()] if not d.startswith('swissroll-diffusion')))" "$EXTRAS" \
            > /tmp/extras.txt \
        && pip install -r /tmp/extras.txt && rm /tmp/extras.txt; \
    fi

# 2. The code (dependencies are already there) and the committed models (every checkpoints/*.pt; the service serves
# each under its file stem), readable by the app user. A mounted directory over /app/checkpoints replaces them.
COPY README.md /tmp/src/README.md
COPY diffusion /tmp/src/diffusion
COPY service /tmp/src/service
COPY training /tmp/src/training
RUN pip install --no-deps /tmp/src && rm -rf /tmp/src
COPY checkpoints/*.pt /app/checkpoints/
RUN chmod 0755 /app/checkpoints && chmod 0444 /app/checkpoints/*.pt

# Same values the launcher sets with mallopt (service/__main__.py); the env form also covers child processes.
ENV MALLOC_MMAP_THRESHOLD_=268435456 \
    MALLOC_TRIM_THRESHOLD_=268435456 \
    SWISSROLL_HOST=0.0.0.0 \
    SWISSROLL_PORT=8000 \
    SWISSROLL_MODELS_DIR=/app/checkpoints

USER 10001:10001
EXPOSE 8000

# Ready = model loaded and warmed up. urllib raises on 503, so the exit code is 1 until then. Keep
# SWISSROLL_PORT at 8000 inside the container and remap the host port instead (docker -p, compose ports).
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=4)"]

# uvicorn finishes in-flight requests for SWISSROLL_DRAIN_S (default 20 s) after SIGTERM: stop with a longer
# timeout than that (docker stop -t 30, docker run --stop-timeout 30, compose stop_grace_period: 30s).
STOPSIGNAL SIGTERM
CMD ["swissroll-serve"]
