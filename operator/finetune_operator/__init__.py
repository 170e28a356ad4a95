"""finetune_operator: the Kubernetes operator that runs FineTuneJobs.

Layers (enforced by import-linter, see the `[tool.importlinter]` contracts in pyproject.toml):

- `handlers` — kopf glue: thin adapters from kopf causes to `reconcile` calls; startup settings.
- `reconcile` — one level-based, idempotent reconcile cycle; talks to Kubernetes only through
  the small `k8s` wrapper and to trainers only through `progress`.
- pure modules — `api` (typed spec/status, constants), `builders` (spec → desired children),
  `status` (observed children → status), `settings`, `crdgen` (typed model → CRD). They never
  import kopf or the Kubernetes client, and nothing here imports torch.
"""

__version__ = "0.1.0"
