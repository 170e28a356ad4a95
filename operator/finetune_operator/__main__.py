"""`finetune-operator` / `python -m finetune_operator`: run the operator (kopf, standalone).

Watches all namespaces unless FINETUNE_NAMESPACES (comma-separated) is set. The liveness
endpoint (kopf's) is served on FINETUNE_LIVENESS_ENDPOINT (default http://0.0.0.0:8081/healthz),
metrics on FINETUNE_METRICS_PORT (default 8080, see finetune_operator.metrics).
"""

from __future__ import annotations

import os

import kopf


def main() -> None:
    import finetune_operator.handlers  # noqa: F401  (registers the handlers)

    kopf.configure(verbose=os.environ.get("FINETUNE_LOG_VERBOSE") == "1")
    namespaces = [ns for ns in os.environ.get("FINETUNE_NAMESPACES", "").split(",") if ns]
    kopf.run(
        standalone=True,
        clusterwide=not namespaces,
        namespaces=namespaces,
        liveness_endpoint=os.environ.get("FINETUNE_LIVENESS_ENDPOINT", "http://0.0.0.0:8081/healthz") or None,
    )


if __name__ == "__main__":
    main()
