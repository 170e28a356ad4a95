#!/usr/bin/env bash
# Builds both product images in the background of dev/setup.sh (also runnable by hand):
# installs the Debian tools when missing (buildah, podman, mmdebstrap, runc), makes the base
# image, waits for setup's wheelhouse, builds both targets (python -m finetune_dev.images).
# Everything is cached under ~/.cache/finetune-dev/images ($FINETUNE_DEV_CACHE), outside the
# checkout: a warm run is a layer-cache hit. One build at a time (build.lock, held throughout);
# the log is images/logs/build.log and images/build.status gets "<exit code> <checkout>" at
# the end: tests/integration/test_images.py waits on the lock and fails with the log's tail.
#   usage: dev/images.sh PYTHON [WHEELS_READY_FILE SETUP_PID]
set -uo pipefail
cd "$(dirname "$0")/.."
python=$1 ready=${2:-} setup_pid=${3:-}
dir=${FINETUNE_DEV_CACHE:-$HOME/.cache/finetune-dev}/images
mkdir -p "$dir/logs"
exec 9>"$dir/build.lock"
flock 9
exec >"$dir/logs/build.log" 2>&1 </dev/null
rm -f "$dir/build.status"
start=$(date +%s)

build() {
  local missing=() tool
  for tool in buildah podman mmdebstrap runc; do command -v "$tool" >/dev/null || missing+=("$tool"); done
  if [ "${#missing[@]}" -gt 0 ]; then
    echo "images: installing ${missing[*]} (Debian packages)"
    apt-get -o DPkg::Lock::Timeout=600 update -q || return
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -q --no-install-recommends \
      "${missing[@]}" || return
    echo "images: tools installed after $(( $(date +%s) - start )) s"
  fi
  PYTHONPATH=dev "$python" -m finetune_dev.images --base-only || return
  if [ -n "$ready" ]; then
    while [ ! -e "$ready" ]; do
      kill -0 "$setup_pid" 2>/dev/null || { echo "images: setup stopped before the wheelhouse was filled"; return 1; }
      sleep 2
    done
    rm -f "$ready"
    echo "images: wheelhouse ready after $(( $(date +%s) - start )) s"
  fi
  PYTHONPATH=dev "$python" -m finetune_dev.images
}

build
code=$?
echo "images: finished with exit $code after $(( $(date +%s) - start )) s"
printf '%s %s\n' "$code" "$PWD" >"$dir/build.status"
exit "$code"
