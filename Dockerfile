# Image for running phases on a cluster (KubeRay RayJob, or any container runtime).
# torch 2.13.0 from PyPI is the CUDA build on Linux x86_64, so the same image serves GPU workers.
# Build: docker build -t phases:0.1.0 .
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 \
    RAY_USAGE_STATS_ENABLED=0 \
    MLFLOW_DISABLE_TELEMETRY=true \
    PYTHONUNBUFFERED=1

WORKDIR /app
RUN pip install torch==2.13.0 "ray[tune,default]==2.60.0"
COPY pyproject.toml README.md ./
COPY phases ./phases
COPY analysis ./analysis
COPY search_spaces ./search_spaces
COPY cluster ./cluster
RUN pip install -e .
