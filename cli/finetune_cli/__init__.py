"""finetune_cli: `kubectl finetune`, the fine-tuning studio as a kubectl plugin.

Layers (enforced by import-linter):

- `main` (entry point, error printing) → `parser` (argparse) → `commands/` (one module per
  command group, each `cmd_*` taking an `App`) → `app` (options, console, lazily opened cluster
  and registry, printing).
- I/O wrappers — `kube` (FineTuneJobs through the Kubernetes API, current KUBECONFIG),
  `storage` (the dataset registry in S3, boto3 with AWS_* variables), `plot` (matplotlib);
  `shell`, the interactive loop.
- pure modules — `views` (how tables look), `reading` (what a FineTuneJob object says),
  `catalog` (models, memory estimates, hyper-parameter rows), `datasets` (format detection,
  record counts), `experiments` (templates, manifests, selection), `errors`.

Nothing here imports torch or transformers: the CLI installs with the operator's dependencies.
"""

__version__ = "0.1.0"
