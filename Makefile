# The two commands of the README. Both install what they need (dev/setup.sh) and are safe to re-run.
.PHONY: demo test setup generate cluster-down

setup:
	./dev/setup.sh

# Sets everything up and runs the main job on the local cluster.
demo: setup
	.venv/bin/finetune-dev up
	.venv/bin/python -m finetune_dev.demo

# Runs the whole test suite: lint, types, import layers, unit, trainer, integration.
test: setup
	.venv/bin/python -m pytest

cluster-down:
	.venv/bin/finetune-dev down

# Regenerates what is derived from the typed code: the CRD (also into the chart) and the chart's
# RBAC rules. Tests fail when these are stale.
generate: setup
	.venv/bin/python -m finetune_operator.crdgen --write
	cp crds/finetune.dev_finetunejobs.yaml helm/finetune-operator/crds/
	{ echo '# Generated from finetune_operator.rbac (python -m finetune_operator.rbac); tests/integration/test_helm.py'; \
	  echo '# checks it matches. The operator needs exactly these rights, no more.'; \
	  .venv/bin/python -c 'import yaml; from finetune_operator.rbac import cluster_role; print(yaml.safe_dump(cluster_role()["rules"], sort_keys=False), end="")'; \
	} > helm/finetune-operator/files/rbac-rules.yaml
