"""Every manifest in examples/ is accepted by the real API server (schema and CEL rules) and
parses as the operator's typed spec, so what we show users is valid."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from finetune_operator.api import parse_spec
from tests.kube import ClusterHandle

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
CRD = ROOT / "crds" / "finetune.dev_finetunejobs.yaml"


def test_the_examples_cover_the_studio_experiments() -> None:
    names = {p.stem for p in EXAMPLES}
    assert {"pythia-1.4b-reuters", "pythia-410m-summaries", "gpt-j-6b-patents", "smollm2-demo"} <= names


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
@pytest.mark.cluster
def test_example_is_accepted_by_the_api_server(cluster: ClusterHandle, namespace: str, path: Path) -> None:
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRD))
    manifest = yaml.safe_load(path.read_text())
    parse_spec(manifest["spec"])

    result = cluster.kubectl("apply", "--dry-run=server", "-n", namespace, "-f", str(path))

    assert (
        f"finetunejob.finetune.dev/{manifest['metadata']['name']} created (server dry run)" in result.stdout
    )
