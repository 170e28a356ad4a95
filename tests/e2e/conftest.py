"""End-to-end tier: the product as a user runs it, on the real local cluster.

Boundary: everything real — the Helm chart installs the operator, which runs on the process node
under the chart's ServiceAccount; FineTuneJobs are applied with kubectl; the trainer runs real
torch in the training pods; models, data and checkpoints live in the versitygw S3 server.
"""
