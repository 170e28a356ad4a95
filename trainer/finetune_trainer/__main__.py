"""`python -m finetune_trainer` (what torchrun runs): same as the `finetune-trainer` command."""

import sys

from finetune_trainer.cli import main

sys.exit(main())
