"""`version`: the plugin's version, and the operator's and the cluster's when they can be read.

The operator's version comes from the defaults ConfigMap the chart publishes (its appVersion).
Called through `parser`.
"""

from __future__ import annotations

from finetune_cli import __version__
from finetune_cli.app import App
from finetune_cli.errors import CliError


def cmd_version(app: App) -> None:
    result: dict[str, str | None] = {"plugin": __version__, "operator": None, "kubernetes": None}
    try:
        result["kubernetes"] = app.core.server_version()
        result["operator"] = app.defaults.operator_version
    except CliError:  # no kubeconfig: the plugin's version is still an answer
        pass
    if app.data(result):
        return
    app.say(f"kubectl-finetune {__version__}")
    app.say(f"operator   {result['operator'] or '- (' + app.defaults.source + ')'}")
    app.say(f"kubernetes {result['kubernetes'] or '-'}")
