"""hf:// models through the real huggingface_hub client against a local Hub (finetune_dev.hub).

The local server speaks the Hub's HTTP API (model info by revision, file tree, resolve
downloads with commit and etag headers) and is reached through HF_ENDPOINT, as a mirror is.
Repositories in both forms the catalog families ship — only `pytorch_model.bin` (GPT-J, CodeGen,
Cerebras-GPT) and sharded safetensors with an index (Llama, Pythia) — load as the same weights;
.bin weights are converted to safetensors once; a gated repository needs HF_TOKEN (from the
Secret named in spec.hub.tokenSecret), and the token is never printed.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from finetune_dev.hub import HubRepo, HubServer, serve_hub
from finetune_trainer import contract
from finetune_trainer.config import ModelSpec
from finetune_trainer.errors import InvalidInput
from finetune_trainer.models import fetch_model, load_model
from tests.trainer.conftest import base_config, run_trainer
from tests.trainer.factories import FAMILIES

TOKEN = "hf_local_test_token_0123456789"
FAMILY_REPOS = {family: f"tiny/{family}-bin" for family in FAMILIES}


def bin_only_folder(source: Path, target: Path, *, shards: int = 1) -> Path:
    """`source` (a safetensors model folder) rewritten as the old Hub form: pytorch_model.bin,
    or `shards` pytorch_model-0000i-of-0000n.bin files with their index. Tied tensors keep
    sharing storage, as torch.save writes them."""
    import torch
    from transformers import AutoModelForCausalLM

    shutil.copytree(
        source, target, ignore=shutil.ignore_patterns("*.safetensors", "*.safetensors.index.json")
    )
    state = AutoModelForCausalLM.from_pretrained(source).state_dict()
    if shards == 1:
        torch.save(state, target / "pytorch_model.bin")
        return target
    keys = list(state)
    weight_map = {}
    for i in range(shards):
        name = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = keys[i::shards]
        torch.save({k: state[k] for k in part}, target / name)
        weight_map.update(dict.fromkeys(part, name))
    (target / "pytorch_model.bin.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    return target


def sharded_safetensors_folder(source: Path, target: Path) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(source).save_pretrained(target, max_shard_size="20KB")
    AutoTokenizer.from_pretrained(source).save_pretrained(target)
    assert (target / "model.safetensors.index.json").exists()
    return target


@pytest.fixture(scope="module")
def repos(tmp_path_factory: pytest.TempPathFactory, model_dir: Callable[[str], Path]) -> dict[str, HubRepo]:
    made = tmp_path_factory.mktemp("hub-repos")
    out = {
        repo: HubRepo.from_folder(repo, bin_only_folder(model_dir(family), made / repo.replace("/", "_")))
        for family, repo in FAMILY_REPOS.items()
    }
    out["tiny/llama-sharded"] = HubRepo.from_folder(
        "tiny/llama-sharded",
        sharded_safetensors_folder(model_dir("llama"), made / "llama-sharded"),
        revisions=("main", "v1.0"),
    )
    out["tiny/gpt2-bin-shards"] = HubRepo.from_folder(
        "tiny/gpt2-bin-shards", bin_only_folder(model_dir("gpt2"), made / "gpt2-bin-shards", shards=3)
    )
    out["gated/llama"] = HubRepo.from_folder(
        "gated/llama", sharded_safetensors_folder(model_dir("llama"), made / "gated"), token=TOKEN
    )
    return out


@pytest.fixture
def hub(repos: dict[str, HubRepo], monkeypatch: pytest.MonkeyPatch) -> Iterator[HubServer]:
    with serve_hub(list(repos.values())) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
        monkeypatch.delenv("HF_TOKEN", raising=False)
        monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
        yield server


def logits(folder: Path) -> Any:
    import torch

    model = load_model(folder, init="pretrained", dropout=None, seed=0).eval()
    with torch.no_grad():
        return model(torch.arange(12).reshape(1, 12)).logits


def fetch(uri: str, tmp_path: Path, revision: str | None = None) -> Path:
    return fetch_model(ModelSpec(uri=uri, revision=revision), cache_dir=tmp_path / "cache")


@pytest.mark.parametrize("family", list(FAMILIES), ids=list(FAMILIES))
def test_pytorch_bin_repository_is_converted_to_safetensors_with_the_same_weights(
    family: str, hub: HubServer, tmp_path: Path, model_dir: Callable[[str], Path]
) -> None:
    import torch

    folder = fetch(f"hf://{FAMILY_REPOS[family]}", tmp_path)

    assert sorted(p.name for p in folder.glob("*.safetensors")) == ["model.safetensors"]
    assert not list(folder.glob("*.bin")), "the .bin weights are dropped once converted"
    assert "pytorch_model.bin" in hub.downloads(FAMILY_REPOS[family])
    torch.testing.assert_close(logits(folder), logits(model_dir(family)), rtol=0, atol=0)


def test_sharded_bin_repository_becomes_sharded_safetensors_with_an_index(
    hub: HubServer, tmp_path: Path, model_dir: Callable[[str], Path]
) -> None:
    import torch

    from finetune_trainer.models import convert_bin_to_safetensors

    folder = fetch("hf://tiny/gpt2-bin-shards", tmp_path)
    torch.testing.assert_close(logits(folder), logits(model_dir("gpt2")), rtol=0, atol=0)

    # The same input, converted with a small shard limit: several outputs and a complete index.
    small = bin_only_folder(model_dir("gpt2"), tmp_path / "small", shards=3)
    convert_bin_to_safetensors(small, shard_bytes=16 * 1024)
    index = json.loads((small / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in small.glob("*.safetensors"))
    assert len(shards) > 1 and set(index["weight_map"].values()) == set(shards)
    assert not (small / "pytorch_model.bin.index.json").exists()
    torch.testing.assert_close(logits(small), logits(model_dir("gpt2")), rtol=0, atol=0)


def test_sharded_safetensors_at_a_pinned_commit_is_fetched_once(
    hub: HubServer, repos: dict[str, HubRepo], tmp_path: Path, model_dir: Callable[[str], Path]
) -> None:
    import torch

    repo = repos["tiny/llama-sharded"]
    folder = fetch("hf://tiny/llama-sharded", tmp_path, revision="v1.0")
    weights = {p.name for p in folder.glob("*.safetensors")}
    assert len(weights) > 1 and (folder / "model.safetensors.index.json").exists()
    assert set(hub.downloads(repo.repo_id)) >= weights | {"config.json", "tokenizer.json"}
    torch.testing.assert_close(logits(folder), logits(model_dir("llama")), rtol=0, atol=0)
    marker = json.loads((folder / ".finetune-complete").read_text())
    assert marker["commit"] == repo.commit

    # Pinned to the commit: the cached folder, without asking the Hub anything.
    before = len(hub.requests)
    assert fetch("hf://tiny/llama-sharded", tmp_path, revision=repo.commit) == folder
    assert len(hub.requests) == before
    # By branch (here the default one): one look-up of the commit it points at, no download.
    assert fetch("hf://tiny/llama-sharded", tmp_path) == folder
    assert [r.path for r in hub.requests[before:]] == ["/api/models/tiny/llama-sharded"]


def test_unknown_revision_names_the_field(hub: HubServer, tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match=r"model\.revision: 'no-such-tag' is not a branch, tag or commit"):
        fetch("hf://tiny/llama-sharded", tmp_path, revision="no-such-tag")


def test_unknown_repository_names_the_field(hub: HubServer, tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match=r"model\.uri: hf://tiny/missing does not exist"):
        fetch("hf://tiny/missing", tmp_path)


def test_gated_repository_needs_the_token(
    hub: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(InvalidInput, match=r"gated and no token was given.*spec\.hub\.tokenSecret"):
        fetch("hf://gated/llama", tmp_path)

    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    with pytest.raises(InvalidInput, match="the token was refused") as refused:
        fetch("hf://gated/llama", tmp_path)
    assert "hf_wrong" not in str(refused.value)

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with caplog.at_level(logging.DEBUG):
        folder = fetch("hf://gated/llama", tmp_path)
    assert (folder / "model.safetensors.index.json").exists()
    served = [r for r in hub.requests if r.status == 200 and "gated/llama" in r.path]
    assert served and all(r.authorized for r in served)
    assert TOKEN not in caplog.text


def test_training_run_from_a_gated_bin_repository_never_prints_the_token(
    hub: HubServer,
    repos: dict[str, HubRepo],
    tmp_path: Path,
    text_data: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The real trainer entry point, model hf:// at a pinned commit, token from the environment."""
    gated = HubRepo(repo_id="gated/codegen", files=repos[FAMILY_REPOS["codegen"]].files, token=TOKEN)
    with serve_hub([gated]) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        config = base_config(
            tmp_path,
            text_data,
            tmp_path / "run",
            model={"uri": "hf://gated/codegen", "revision": gated.commit},
            hyperparameters={"maxSteps": 2},
            evaluation={"everySteps": 2, "logEverySteps": 1},
            checkpoints={"everySteps": 2, "keepLast": 1, "outputUri": f"file://{tmp_path}/run/"},
        )
        with caplog.at_level(logging.DEBUG):
            code, summary = run_trainer(config, tmp_path)
    assert code == 0, summary
    assert "pytorch_model.bin" in server.downloads("gated/codegen")
    assert (tmp_path / "run" / "final" / "config.json").exists()
    out, err = capfd.readouterr()
    for text in (out, err, caplog.text, json.dumps(summary), (tmp_path / "run" / "run.json").read_text()):
        assert TOKEN not in text
    # nor in any file the run wrote: run folder (metrics, checkpoints, final/) and local cache
    written = [
        f
        for folder in (tmp_path / "run", Path(os.environ[contract.ENV_CACHE_DIR]))
        for f in folder.rglob("*")
    ]
    assert any(f.name == "metrics.jsonl" for f in written)
    for path in written:
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path
