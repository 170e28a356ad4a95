"""`init`: prepare a namespace for jobs — its storage credentials Secret, from the user's keys.

The operator gives every job's pods the keys of the Secret named by its `storage.credentialsSecret`
(published in the defaults ConfigMap), looked up in the job's own namespace. `init` creates or
updates that Secret in the target namespace from the user's own S3 keys (environment, or
`--profile` / ~/.aws). The keys go only into the Secret; nothing prints them. Called through
`parser`.
"""

from __future__ import annotations

from finetune_cli import storage
from finetune_cli.app import App
from finetune_cli.errors import CliError

MANAGED_BY = {"app.kubernetes.io/managed-by": "kubectl-finetune"}


def cmd_init(app: App) -> None:
    found = app.defaults
    name = app.args.secret_name or found.credentials_secret
    if not name:
        raise CliError(
            f"which Secret? the operator names no credentials Secret ({found.source})",
            hint="pass --secret-name NAME (and set spec.storage.credentialsSecret.name: NAME in your jobs), "
            "or install the chart with storage.credentialsSecret",
        )
    keys = storage.own_keys(profile=app.args.profile)
    state = app.core.put_secret(name, keys, MANAGED_BY)
    result = {
        "namespace": app.namespace,
        "secret": name,
        "state": state,
        "runsUri": found.runs_uri,
        "datasetsUri": found.datasets_uri,
        "endpoint": found.endpoint,
    }
    if app.data(result):
        return
    app.say(f"namespace {app.namespace} is ready for jobs: Secret {name} {state} from your S3 keys")
    if found.runs_uri:
        app.say(
            f"runs go to {found.runs_uri}{app.namespace}/<job>/"
            + (f" on {found.endpoint}" if found.endpoint else "")
        )
    app.say(
        "next: kubectl finetune add dataset --name N --paths FILE…  then: kubectl finetune experiment add"
    )
