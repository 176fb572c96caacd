# liftoff images. The entrypoint is the launcher, configured by TAKEOFF_* variables:
#
#   GPU:  docker build -t liftoff .
#         docker run --gpus all -e TAKEOFF_MODEL_NAME=meta-llama/Llama-3.1-8B-Instruct \
#           -e TAKEOFF_ACCESS_TOKEN=hf_... -e TAKEOFF_DEVICE=cuda -e TAKEOFF_TENSOR_PARALLEL=2 \
#           -p 3000:3000 -p 3001:3001 liftoff
#   CPU:  docker build --target cpu -t liftoff-cpu .
#         docker run -p 3000:3000 -p 3001:3001 liftoff-cpu      # serves the default model
#
# CUDA 13.0 matches the driver the project's GPU machines run (newer PTX would not load).

ARG CUDA_VERSION=13.0.1
ARG UBUNTU=ubuntu24.04

# ---- build: the CUDA binary -------------------------------------------------------------------
FROM nvidia/cuda:${CUDA_VERSION}-devel-${UBUNTU} AS build-cuda
RUN apt-get update && apt-get install -y --no-install-recommends curl ca-certificates build-essential pkg-config \
    && rm -rf /var/lib/apt/lists/*
RUN curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal --default-toolchain stable
ENV PATH=/root/.cargo/bin:$PATH
# sm_80 (A100) and sm_90 (H100/H200); candle reads CUDA_COMPUTE_CAP.
ARG CUDA_COMPUTE_CAP=90
ENV CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP}
WORKDIR /src
COPY . .
RUN cargo build --release --features cuda -p liftoff && cp target/release/liftoff /liftoff

# ---- build: the CPU binary --------------------------------------------------------------------
FROM rust:1-bookworm AS build-cpu
WORKDIR /src
COPY . .
RUN cargo build --release -p liftoff && cp target/release/liftoff /liftoff

# ---- CPU image: serves the default model (fetched at build time) ------------------------------
FROM debian:bookworm-slim AS cpu
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-pip ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build-cpu /liftoff /usr/local/bin/liftoff
COPY scripts/docker-entrypoint.sh scripts/fetch_default_model.sh /usr/local/bin/
# The management port must be reachable through `-p 3001:3001`; set TAKEOFF_MANAGEMENT_API_KEY
# to guard it.
ENV LIFTOFF_CACHE=/models TAKEOFF_DEVICE=cpu TAKEOFF_MANAGEMENT_HOST=0.0.0.0
RUN PIP_BREAK_SYSTEM_PACKAGES=1 fetch_default_model.sh
EXPOSE 3000 3001
ENTRYPOINT ["docker-entrypoint.sh"]

# ---- GPU image (the default target) -----------------------------------------------------------
FROM nvidia/cuda:${CUDA_VERSION}-runtime-${UBUNTU} AS cuda
RUN apt-get update && apt-get install -y --no-install-recommends libnccl2 python3 python3-pip ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build-cuda /liftoff /usr/local/bin/liftoff
COPY scripts/docker-entrypoint.sh scripts/fetch_default_model.sh /usr/local/bin/
ENV LIFTOFF_CACHE=/models TAKEOFF_DEVICE=cuda TAKEOFF_MANAGEMENT_HOST=0.0.0.0
EXPOSE 3000 3001
ENTRYPOINT ["docker-entrypoint.sh"]
