# vqtok: the VQ-VAE image tokenizer service, with its bundled checkpoint.
#
#   CPU image (the default; never installs CUDA packages):
#     docker build -t vqtok:cpu .
#   CUDA image (torch from PyPI, whose wheels bring the CUDA libraries; needs an NVIDIA driver
#   and the NVIDIA Container Toolkit on the host, and `docker run --gpus all`):
#     docker build --build-arg TORCH_FLAVOR=cuda -t vqtok:cuda .
#
# Build arguments:
#   BASE_IMAGE       Python 3.11 image for both stages (default python:3.11-slim). Anything with
#                    `python` (3.11), venv and useradd works; scripts/docker-smoke.sh passes a local
#                    Debian-built one on machines that reach no image registry.
#   TORCH_FLAVOR     cpu | cuda.
#   TORCH_INDEX_URL  where torch==2.13.0 comes from. Empty: cpu -> the PyTorch CPU index,
#                    cuda -> PyPI (its Linux torch is the CUDA build). E.g.
#                    https://download.pytorch.org/whl/cu126 for a CUDA build that older drivers run.
#   PIP_FIND_LINKS   extra place pip looks for wheels (pip reads it from the environment; the smoke
#                    test serves the host's torch wheel through it). Build stages only.
#   PORT             the port the image listens on and exposes (default 8000).
#
# The server takes every setting from VQTOK_* environment variables (README.md, Deployment, lists
# them), and its port from PORT or VQTOK_PORT: the CMD is exec form, with no shell to expand
# variables, so nothing is set on the command line.

ARG BASE_IMAGE=python:3.11-slim

# ---------------------------------------------------------------------------------------------
# The dependency list alone, out of pyproject.toml: edits elsewhere in that file (tool settings,
# version) then leave the dependency layers below cached.
FROM ${BASE_IMAGE} AS requirements
WORKDIR /src
COPY pyproject.toml ./
RUN python -c "import tomllib; deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; open('requirements.txt', 'w').write('\n'.join(deps) + '\n')"

# ---------------------------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS deps

ARG TORCH_FLAVOR=cpu
ARG TORCH_INDEX_URL=""
ARG PIP_FIND_LINKS=""

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /src

# 1. torch, first and alone, from the index of the chosen flavour. The CPU image then checks that
#    its torch is the CPU build and that no CUDA package (nvidia-*, triton) came along.
RUN set -eu; \
    case "$TORCH_FLAVOR" in \
      cpu) index="${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}"; want_cuda=0 ;; \
      cuda) index="${TORCH_INDEX_URL:-https://pypi.org/simple}"; want_cuda=1 ;; \
      *) echo "TORCH_FLAVOR must be cpu or cuda, not '$TORCH_FLAVOR'" >&2; exit 1 ;; \
    esac; \
    pip install --index-url "$index" torch==2.13.0; \
    python -c "import sys, torch; cuda = torch.version.cuda; print('torch', torch.__version__, 'cuda', cuda); sys.exit(0 if (cuda is not None) == bool($want_cuda) else 'torch build does not match TORCH_FLAVOR=$TORCH_FLAVOR')"; \
    if [ "$want_cuda" = 0 ]; then \
      python -c "import sys, importlib.metadata as md; bad = sorted(d.metadata['Name'] for d in md.distributions() if d.metadata['Name'].lower().startswith(('nvidia-', 'triton'))); sys.exit('CUDA packages in the CPU image: %s' % bad if bad else 0)"; \
    fi

# 2. The project's other dependencies, held to the versions in deploy/constraints.txt (a layer
#    that survives edits to the code).
COPY --from=requirements /src/requirements.txt ./
COPY deploy/constraints.txt ./
RUN pip install -r requirements.txt -c constraints.txt

# ---------------------------------------------------------------------------------------------
# 3. The project as a wheel, with the bundled checkpoint as package data. It is installed in the
#    runtime stage on top of the dependencies, so a code change rebuilds a few MB, not the venv.
FROM deps AS builder
COPY pyproject.toml README.md ./
COPY model ./model
COPY service ./service
COPY src ./src
RUN pip wheel --no-deps --wheel-dir /dist .

# ---------------------------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS runtime

ARG PORT=8000

LABEL org.opencontainers.image.title="vqtok" \
      org.opencontainers.image.description="VQ-VAE image tokenizer: images to discrete token grids and back, over HTTP" \
      org.opencontainers.image.licenses="Apache-2.0"

# The server binds every interface inside the container and listens on $PORT (VQTOK_PORT, when
# set, wins over it). VQTOK_CHECKPOINT is unset, so the bundled checkpoint serves unless a mounted
# one is named. NVIDIA_DRIVER_CAPABILITIES is read only by the NVIDIA Container Toolkit (CUDA
# image on a GPU host).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    VQTOK_HOST=0.0.0.0 \
    PORT=${PORT} \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

RUN useradd --system --uid 10001 --user-group --create-home --home-dir /home/vqtok \
        --shell /usr/sbin/nologin vqtok \
    && mkdir -p /checkpoints \
    && chown vqtok:vqtok /checkpoints

COPY --from=deps /opt/venv /opt/venv
COPY --from=builder /dist /tmp/dist
RUN pip install --no-cache-dir --no-deps --no-index /tmp/dist/vqtok-*.whl \
    && rm -rf /tmp/dist \
    && python -c "import importlib.resources as r; w = r.files('vqtok.model.weights') / 'default'; assert (w / 'model.safetensors').is_file() and (w / 'config.json').is_file(), 'the bundled checkpoint model/weights/default is missing'" \
    && vqtok --help >/dev/null

USER 10001:10001
WORKDIR /home/vqtok
EXPOSE ${PORT}

# /ready answers 200 once the model is loaded and warmed up, 503 before. The slim image has no
# curl, so the probe is Python's urllib, on the port the server listens on (VQTOK_PORT, else PORT).
# The start period covers loading the checkpoint and the warm-up batch on a slow CPU.
HEALTHCHECK --interval=10s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request as u\ntry:\n    r = u.urlopen('http://127.0.0.1:%s/ready' % (os.environ.get('VQTOK_PORT') or os.environ.get('PORT') or '8000'), timeout=4)\nexcept Exception as e:\n    sys.exit('not ready: %s' % e)\nsys.exit(0 if r.status == 200 else 'not ready: HTTP %d' % r.status)"]

CMD ["vqtok", "serve"]
