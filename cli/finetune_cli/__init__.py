"""finetune_cli: `kubectl finetune`, the fine-tuning studio as a kubectl plugin.

Layers (enforced by import-linter):

- `main` and `shell` — argument parsing, the interactive shell, printing; the only modules that
  call both the pure ones and the I/O wrappers.
- I/O wrappers — `kube` (FineTuneJobs through the Kubernetes API, current KUBECONFIG) and
  `storage` (the dataset registry in S3, boto3 with AWS_* variables), `plot` (matplotlib).
- pure modules — `catalog` (models, memory estimates, hyper-parameter rows), `datasets`
  (format detection, record counts), `experiments` (templates, manifests, selection), `views`
  (rows and tables of jobs, evaluations, checkpoints, comparisons).

Nothing here imports torch or transformers: the CLI installs with the operator's dependencies.
"""

__version__ = "0.1.0"
