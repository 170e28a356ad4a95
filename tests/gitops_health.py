"""GitOps health as the tools compute it: Argo CD's Lua check and Flux's kstatus library.

- `health(obj)`: docs/gitops/argocd-health.lua run by a real Lua interpreter (lupa), with the
  object as the Lua table `obj`, as Argo CD evaluates it.
- `kstatus(*objects)`: `status.Compute` from sigs.k8s.io/cli-utils/pkg/kstatus/status, the code
  Flux's kustomize-controller runs, through dev/kstatus (built and cached by
  `finetune_dev.binaries` on first use, never skipped).

Imported by tests/unit/test_gitops.py, tests/integration/test_gitops_kstatus.py and
tests/e2e/test_demo.py; holds no fixtures and no tests.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lupa import LuaRuntime

from finetune_dev import binaries

ARGOCD_SCRIPT = (Path(__file__).resolve().parents[1] / "docs" / "gitops" / "argocd-health.lua").read_text()


def health(obj: Mapping[str, Any]) -> tuple[str, str]:
    """(status, message) of Argo CD's health check for `obj`."""
    lua = LuaRuntime(unpack_returned_tuples=True)
    lua.globals().obj = lua.table_from(obj, recursive=True)
    result = lua.execute(ARGOCD_SCRIPT)
    return str(result["status"]), str(result["message"])


def kstatus(*objects: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(status, message) that kstatus computes for each object, in order."""
    program = binaries.build(binaries.KSTATUS) / "kstatus"
    result = subprocess.run(
        [str(program)], input=json.dumps(objects), capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return [(r["status"], r["message"]) for r in json.loads(result.stdout)]
