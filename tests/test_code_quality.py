"""Lint, type checks and import-layer contracts run as part of the test suite.

Each runs the real tool on the repository and fails with the tool's own report.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def _run(*cmd: str) -> None:
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout}\n{result.stderr}"


def test_ruff_lint_is_clean() -> None:
    _run(str(BIN / "ruff"), "check", "operator", "trainer", "dev", "cli", "tests", "bench")


def test_ruff_format_is_applied() -> None:
    _run(str(BIN / "ruff"), "format", "--check", "operator", "trainer", "dev", "cli", "tests", "bench")


def test_mypy_type_checks() -> None:
    """One run over every package: each module is analysed once, however many packages import it."""
    _run(
        str(BIN / "mypy"),
        "dev/finetune_dev",
        "operator/finetune_operator",
        "trainer/finetune_trainer",
        "cli/finetune_cli",
    )


def test_import_layers_hold() -> None:
    _run(str(BIN / "lint-imports"))


def test_cli_imports_without_the_ml_stack() -> None:
    """`kubectl finetune` installs with the operator's dependencies: loading every CLI module
    must not import torch or transformers (import-linter sees static imports; this sees run time)."""
    script = (
        "import sys, finetune_cli.main, finetune_cli.shell, finetune_cli.plot;"
        "loaded = sorted(m for m in ('torch', 'transformers', 'kopf') if m in sys.modules);"
        "assert not loaded, loaded"
    )
    _run(sys.executable, "-c", script)
