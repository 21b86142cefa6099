# The image both cluster configs run (cluster/ray-cluster.yaml, cluster/rayjob.yaml): Debian 12 with
# Python 3.11 (FFCV 1.0.2 and the pins need it), and the project with its runtime venv, built by the
# same scripts/setup.sh --runtime from the same pinned requirements.txt as a laptop's (no browser, no
# test packages). torch comes from PyPI as its CUDA build; the NVIDIA driver comes from the host.
#
#   docker build -t REGISTRY/cnn-pipeline:$(git rev-parse --short HEAD) .
FROM python:3.11.7-slim-bookworm

WORKDIR /app
COPY . .
RUN bash scripts/setup.sh --runtime && rm -rf /var/lib/apt/lists/* /root/.cache/pip
ENV PATH=/app/.venv/bin:$PATH
