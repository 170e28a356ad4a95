"""finetune_trainer: the training side of finetune-operator.

Importing this package must stay cheap: no torch, no transformers, no kopf. The configuration
contract (`finetune_trainer.config`) and the shared constants (`finetune_trainer.contract`) are
imported by the operator and the CLI, which never install the machine-learning stack.
"""

__version__ = "0.1.0"
