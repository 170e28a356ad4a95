# The two commands of the README. Both install what they need (dev/setup.sh) and are safe to re-run.
.PHONY: demo test setup cluster-down

setup:
	./dev/setup.sh

# Sets everything up and runs the main job on the local cluster.
demo: setup
	.venv/bin/finetune-dev up
	.venv/bin/python -m finetune_dev.smoke

# Runs the whole test suite: lint, types, import layers, unit, trainer, integration.
test: setup
	.venv/bin/python -m pytest

cluster-down:
	.venv/bin/finetune-dev down
