"""`finetune-operator` / `python -m finetune_operator`: run the operator (kopf, standalone).

Watches all namespaces unless FINETUNE_NAMESPACES (comma-separated) is set. The liveness
endpoint (kopf's) is served on FINETUNE_LIVENESS_ENDPOINT (default http://0.0.0.0:8081/healthz),
metrics on FINETUNE_METRICS_PORT (default 8080, see finetune_operator.metrics); `Settings`
reads them.
"""

from __future__ import annotations

import os

import kopf

from finetune_operator.settings import Settings


def main() -> None:
    import finetune_operator.handlers  # noqa: F401  (registers the handlers)

    settings = Settings.from_env(os.environ)
    kopf.configure(verbose=settings.log_verbose)
    kopf.run(
        standalone=True,
        clusterwide=not settings.namespaces,
        namespaces=list(settings.namespaces),
        liveness_endpoint=settings.liveness_endpoint or None,
    )


if __name__ == "__main__":
    main()
