"""Packing modes read from token shards, what each does to the loss (real tiny models of every
family, sdpa and eager attention, and the trainer's document-causal sdpa), the collator's batches
and the loop's order of them."""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from finetune_trainer.attention import DOCUMENT_SDPA, use_document_attention
from finetune_trainer.config import DatasetSpec
from finetune_trainer.data import IGNORE, Collator, ShardSettings, plan_data, token_dataset
from finetune_trainer.evaluation import evaluate_model
from finetune_trainer.loop import step_indices, steps_per_epoch
from finetune_trainer.packing import TokenDataset
from tests.trainer.factories import FAMILIES, make_tokenizer, reference_document, tiny_config

WORDS = [
    "the",
    "market",
    "rose",
    "and",
    "the",
    "shares",
    "fell",
    "while",
    "the",
    "bank",
    "said",
    "profit",
    "for",
    "the",
    "year",
    "was",
    "higher",
]


def _sdpa_families() -> list[str]:
    """The families transformers implements sdpa for (not GPT-J nor CodeGen in this version)."""
    from transformers import AutoModelForCausalLM

    return [
        family
        for family in FAMILIES
        if AutoModelForCausalLM._model_mapping[type(tiny_config(family, 384))]._supports_sdpa
    ]


SDPA_FAMILIES = _sdpa_families()
ATTENTION_CASES = [
    pytest.param(family, attention, id=f"{family}-{attention}")
    for family in FAMILIES
    for attention in ("sdpa", "eager")
    if attention == "eager" or family in SDPA_FAMILIES
]
# what the trainer uses for packingStrategy: documents on sdpa (finetune_trainer.attention)
DOCUMENT_CASES = [
    *ATTENTION_CASES,
    *(pytest.param(f, DOCUMENT_SDPA, id=f"{f}-{DOCUMENT_SDPA}") for f in SDPA_FAMILIES),
]


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return make_tokenizer()


def _corpus(path: Path, n: int, fmt: str = "text") -> str:
    rows = []
    for i in range(n):
        text = " ".join(WORDS[(i * 3 + k) % len(WORDS)] for k in range(1 + (i * 11) % 29))
        if fmt == "text":
            rows.append({"text": text})
        else:
            rows.append({"prompt": f"q{i} said", "completion": text})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return f"file://{path}"


def _dataset(
    tmp_path: Path, tokenizer: Any, *, n: int = 60, length: int = 48, fmt: str = "text", **spec: Any
) -> tuple[TokenDataset, DatasetSpec]:
    uri = _corpus(tmp_path / "data" / "c.jsonl", n, fmt)
    dataset_spec = DatasetSpec(train=[uri], eval=[uri], format=fmt, **spec)  # type: ignore[arg-type]
    plan = plan_data(dataset_spec, seed=0)
    settings = ShardSettings(local_root=tmp_path / "cache", remote_uri=None, workers=1)
    return token_dataset(
        plan, dataset_spec, tokenizer, split="train", length=length, settings=settings
    ), dataset_spec


@pytest.mark.parametrize("fmt", ["text", "prompt-completion"])
@pytest.mark.parametrize("packing", [True, False], ids=["concatenate", "none"])
def test_sequences_equal_an_independent_packing(
    tmp_path: Path, tokenizer: Any, fmt: str, packing: bool
) -> None:
    dataset, spec = _dataset(tmp_path, tokenizer, fmt=fmt, packing=packing)
    path = Path((spec.train or [])[0][len("file://") :])
    documents = [
        reference_document(json.loads(line), spec, tokenizer) for line in path.read_text().splitlines()
    ]
    expected = _reference_sequences(documents, length=48, packing=packing)
    got = [(dataset[i]["input_ids"].tolist(), dataset[i]["labels"].tolist()) for i in range(len(dataset))]
    assert got == expected
    assert dataset.trained_tokens() == sum(
        sum(1 for x in labels[1:] if x != IGNORE) for _, labels in expected
    )


def _reference_sequences(
    documents: list[tuple[list[int], list[int]]], *, length: int, packing: bool
) -> list[tuple[list[int], list[int]]]:
    """Lists of ints, the plain way: packed, the documents concatenated and cut every `length`
    tokens; else each document cut alone. Pieces without a trained target are dropped."""
    if packing:
        ids = [t for d, _ in documents for t in d]
        labels = [t for _, d in documents for t in d]
        pieces = [(ids[i : i + length], labels[i : i + length]) for i in range(0, len(ids), length)]
    else:
        pieces = [
            (d[i : i + length], m[i : i + length]) for d, m in documents for i in range(0, len(d), length)
        ]
    return [(i, m) for i, m in pieces if any(x != IGNORE for x in m[1:])]


def test_document_blocks_restart_positions_and_mask_each_first_token(tmp_path: Path, tokenizer: Any) -> None:
    plain, _ = _dataset(tmp_path / "a", tokenizer)
    docs, _ = _dataset(tmp_path / "b", tokenizer, packing_strategy="documents")
    assert len(docs) == len(plain)
    eos = tokenizer.eos_token_id
    for i in range(len(docs)):
        item, reference = docs[i], plain[i]
        assert item["input_ids"].tolist() == reference["input_ids"].tolist()
        ids, positions, labels = item["input_ids"], item["position_ids"], item["labels"]
        starts = [0] + [t + 1 for t in range(len(ids) - 1) if ids[t] == eos]
        assert [t for t in range(len(ids)) if positions[t] == 0] == starts
        assert all(labels[t] == IGNORE for t in starts)
        assert all(labels[t] == ids[t] for t in range(len(ids)) if t not in starts)


def _load(folder: Path, attention: str) -> Any:
    from transformers import AutoModelForCausalLM

    loaded = "sdpa" if attention == DOCUMENT_SDPA else attention
    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation=loaded, dtype=torch.float32)
    model.config.use_cache = False
    if attention == DOCUMENT_SDPA:
        use_document_attention(model)
    return model.eval()


@pytest.mark.parametrize(("family", "attention"), DOCUMENT_CASES)
def test_a_document_aware_block_has_the_loss_of_its_documents_alone(
    tmp_path: Path, tokenizer: Any, model_dir: Callable[[str], Path], family: str, attention: str
) -> None:
    dataset, _ = _dataset(tmp_path, tokenizer, n=30, length=96, packing_strategy="documents")
    model = _load(model_dir(family), attention)
    batch = Collator(tokenizer.pad_token_id, mode="documents")([dataset[0], dataset[1]])
    assert "attention_mask" not in batch
    with torch.no_grad():
        packed = float(model(**batch).loss)
        # every document piece of both blocks, evaluated alone: sum of losses over their targets
        loss_sum, targets = 0.0, 0
        for row in range(2):
            positions = batch["position_ids"][row].tolist()
            starts = [t for t, p in enumerate(positions) if p == 0] + [len(positions)]
            for a, b in itertools.pairwise(starts):
                labels = batch["labels"][row, a:b]
                count = int((labels[1:] != IGNORE).sum())
                if count == 0:
                    continue
                out = model(input_ids=batch["input_ids"][row, a:b][None], labels=labels[None])
                loss_sum += float(out.loss) * count
                targets += count
    assert packed == pytest.approx(loss_sum / targets, abs=1e-5)
    # and plain packing (attending across documents) is measurably different: the test can fail
    plain = Collator(tokenizer.pad_token_id, mode="concatenate")([dataset[0], dataset[1]])
    with torch.no_grad():
        across = float(model(**plain).loss)
    assert abs(across - packed) > 1e-4


@pytest.mark.parametrize("family", SDPA_FAMILIES)
def test_document_causal_sdpa_trains_like_the_masked_sdpa_one_call_per_document(
    tmp_path: Path,
    tokenizer: Any,
    model_dir: Callable[[str], Path],
    family: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The loss and every gradient equal sdpa through transformers' block-diagonal mask, and each
    layer makes one causal sdpa call per document, none masked."""
    from finetune_trainer import attention

    dataset, _ = _dataset(tmp_path, tokenizer, n=30, length=96, packing_strategy="documents")
    batch = Collator(tokenizer.pad_token_id, mode="documents")([dataset[i] for i in range(3)])
    positions = batch["position_ids"]
    documents = int((positions[:, 1:] != positions[:, :-1] + 1).sum()) + len(positions)
    assert documents > 2 * len(positions)  # several documents a row: the split is exercised
    reference, ours = _load(model_dir(family), "sdpa"), _load(model_dir(family), DOCUMENT_SDPA)
    assert ours.config._attn_implementation == DOCUMENT_SDPA
    calls: list[tuple[int, bool]] = []  # (query length, masked) of each sdpa call of ours
    real = attention.sdpa_attention_forward

    def counted(module: Any, query: Any, key: Any, value: Any, mask: Any, **kwargs: Any) -> Any:
        calls.append((query.shape[2], mask is not None))
        return real(module, query, key, value, mask, **kwargs)

    expected = reference(**batch).loss
    expected.backward()
    monkeypatch.setattr(attention, "sdpa_attention_forward", counted)
    loss = ours(**batch).loss
    loss.backward()
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)
    for (name, mine), theirs in zip(ours.named_parameters(), reference.parameters(), strict=True):
        assert torch.allclose(mine.grad, theirs.grad, atol=1e-6), name
    assert len(calls) == ours.config.num_hidden_layers * documents
    assert not any(masked for _, masked in calls)


def test_what_the_document_split_cannot_honour_goes_to_the_masked_sdpa(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No position ids, a sliding window, a non-causal call or an argument the split does not
    know: the call goes to sdpa with transformers' mask, as it is."""
    from types import SimpleNamespace

    from finetune_trainer import attention

    torch.manual_seed(0)
    query, key, value = (torch.randn(2, 2, 6, 4) for _ in range(3))
    positions = torch.tensor([[0, 1, 2, 0, 1, 2], [0, 1, 2, 3, 4, 5]])
    same_document = torch.stack([torch.tensor([0, 0, 0, 1, 1, 1]), torch.zeros(6, dtype=torch.long)])
    mask = (same_document[:, :, None] == same_document[:, None, :]) & torch.ones(
        6, 6, dtype=torch.bool
    ).tril()
    mask = mask[:, None]
    module = SimpleNamespace(is_causal=True)
    masked = attention.sdpa_attention_forward(module, query, key, value, mask)[0]
    split = attention.document_causal_sdpa(module, query, key, value, mask, position_ids=positions)[0]
    assert torch.allclose(split, masked, atol=1e-6)

    seen: list[Any] = []
    monkeypatch.setattr(
        attention, "sdpa_attention_forward", lambda m, q, k, v, given, **kw: seen.append(given) or (q, None)
    )
    for kwargs in (
        {"position_ids": None},
        {"position_ids": positions, "sliding_window": 2},
        {"position_ids": positions, "is_causal": False},
        {"position_ids": positions, "a_future_argument": 1},
    ):
        seen.clear()
        attention.document_causal_sdpa(module, query, key, value, mask, **kwargs)
        assert len(seen) == 1 and seen[0] is mask, kwargs


@pytest.mark.parametrize(("family", "attention"), ATTENTION_CASES)
def test_padding_free_batches_have_the_padded_loss(
    tmp_path: Path, tokenizer: Any, model_dir: Callable[[str], Path], family: str, attention: str
) -> None:
    dataset, _ = _dataset(tmp_path, tokenizer, n=12, length=64, packing=False)
    model = _load(model_dir(family), attention)
    items = [dataset[i] for i in range(6)]
    assert len({len(i["input_ids"]) for i in items}) > 2  # varied lengths: padding matters
    free = Collator(tokenizer.pad_token_id, mode="none")(items)
    padded = Collator(tokenizer.pad_token_id, mode="none", padded=True)(items)
    assert free["input_ids"].shape == (1, sum(len(i["input_ids"]) for i in items))
    assert padded["input_ids"].numel() > free["input_ids"].numel()
    with torch.no_grad():
        loss_free = float(model(**free).loss)
        loss_padded = float(model(**padded).loss)
    assert loss_free == pytest.approx(loss_padded, abs=1e-6)


def test_evaluation_without_max_batches_reads_the_whole_eval_set(
    tmp_path: Path, tokenizer: Any, model_dir: Callable[[str], Path]
) -> None:
    dataset, _ = _dataset(tmp_path, tokenizer, n=40, length=32, packing_strategy="documents")
    model = _load(model_dir("llama"), "sdpa")
    result = evaluate_model(
        model,
        dataset,
        collator=Collator(tokenizer.pad_token_id, mode="documents"),
        micro_batch=3,
        max_batches=None,
        device=torch.device("cpu"),
    )
    assert result.tokens == dataset.trained_tokens()
    capped = evaluate_model(
        model,
        dataset,
        collator=Collator(tokenizer.pad_token_id, mode="documents"),
        micro_batch=3,
        max_batches=2,
        device=torch.device("cpu"),
    )
    assert capped.tokens < result.tokens


@pytest.mark.parametrize("grouped", [False, True], ids=["random", "length-grouped"])
def test_global_batches_take_every_sequence_once_per_epoch_reshuffled_and_pure(grouped: bool) -> None:
    """The loop's order: a pure function of (seed, step), so a resumed run reads what an
    uninterrupted one would; each epoch a new permutation of all sequences."""
    n, batch = 1003, 8
    lengths = torch.from_numpy(np.random.default_rng(0).integers(1, 513, n)) if grouped else None
    per_epoch = steps_per_epoch(n, batch)

    def epoch(e: int, seed: int = 7) -> list[list[int]]:
        return [
            step_indices(s, dataset_size=n, batch_size=batch, seed=seed, lengths=lengths)
            for s in range(e * per_epoch, (e + 1) * per_epoch)
        ]

    first, second = epoch(0), epoch(1)
    for batches in (first, second):
        assert sorted(i for b in batches for i in b) == list(range(n))
        assert sorted(len(b) for b in batches) == [n % batch] + [batch] * (per_epoch - 1)
    assert first != second and epoch(0) == first and epoch(0, seed=8) != first
    assert step_indices(per_epoch + 5, dataset_size=n, batch_size=batch, seed=7, lengths=lengths) == second[5]


def test_length_grouped_batches_waste_little_on_padding() -> None:
    n, batch = 4000, 8
    lengths = torch.from_numpy(np.random.default_rng(1).integers(1, 513, n))

    def padded_over_real(grouping: torch.Tensor | None) -> float:
        steps = [
            lengths[step_indices(s, dataset_size=n, batch_size=batch, seed=3, lengths=grouping)]
            for s in range(steps_per_epoch(n, batch))
        ]
        return sum(int(b.max()) * len(b) for b in steps) / int(lengths.sum())

    assert padded_over_real(None) > 1.5  # random batches of 8: the longest of 8 sets the width
    assert padded_over_real(lengths) < 1.05
    first = lengths[step_indices(0, dataset_size=n, batch_size=batch, seed=3, lengths=lengths)]
    assert first.tolist() == sorted(first.tolist(), reverse=True)  # micro-batches cut from it match


def test_holdout_from_shards_is_deterministic_and_disjoint(tmp_path: Path, tokenizer: Any) -> None:
    uri = _corpus(tmp_path / "data" / "c.jsonl", 50)
    spec = DatasetSpec(train=[uri], eval_size=7)
    settings = ShardSettings(local_root=tmp_path / "cache", remote_uri=None, workers=1)
    splits = {}
    for seed in (1, 1, 2):
        plan = plan_data(spec, seed=seed)
        train = token_dataset(plan, spec, tokenizer, split="train", length=32, settings=settings)
        held = token_dataset(plan, spec, tokenizer, split="eval", length=32, settings=settings)
        assert not set(train.doc_ids.tolist()) & set(held.doc_ids.tolist())
        assert train.documents + held.documents == 50 and held.documents == 7
        splits.setdefault(seed, []).append(held.doc_ids.tolist())
    assert splits[1][0] == splits[1][1] != splits[2][0]


def test_document_aware_packing_trains_end_to_end_and_writes_its_shards_once(
    model_dir: Callable[[str], Path], text_data: dict[str, str], tmp_path: Path
) -> None:
    from tests.trainer.conftest import base_config, run_trainer

    config = base_config(
        model_dir("llama"), text_data, tmp_path / "run", dataset={"packingStrategy": "documents"}
    )
    code, summary = run_trainer(config, tmp_path)
    assert code == 0, summary
    assert summary["evaluations"][-1]["loss"] < summary["evaluations"][0]["loss"]
    manifests = sorted((tmp_path / "run" / "tokens").glob("*/manifest.json"))
    assert len(manifests) == 2  # train and eval files: one shard set each, in the run folder
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["dataset"]["trainRecords"] == 48 and run["dataset"]["evalRecords"] == 8


def test_document_strategy_without_packing_is_refused_naming_the_field() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="packingStrategy: documents needs packing: true"):
        DatasetSpec.model_validate(
            {"train": ["file:///d.jsonl"], "packing": False, "packingStrategy": "documents"}
        )


def test_group_by_length_is_on_without_packing_and_refused_with_it() -> None:
    from pydantic import ValidationError

    train = ["file:///d.jsonl"]
    assert DatasetSpec.model_validate({"train": train, "packing": False}).grouped_by_length
    assert not DatasetSpec.model_validate(
        {"train": train, "packing": False, "groupByLength": False}
    ).grouped_by_length
    assert not DatasetSpec.model_validate({"train": train}).grouped_by_length
    with pytest.raises(ValidationError, match="groupByLength: true needs packing: false"):
        DatasetSpec.model_validate({"train": train, "groupByLength": True})


@pytest.mark.parametrize(
    ("attention", "one_row"),
    [
        ("sdpa", False),
        ("eager", False),
        ("flex_attention", False),
        ("flash_attention_2", True),
        (None, False),
    ],
)
def test_unpacked_batches_are_one_row_only_with_a_variable_length_attention_kernel(
    tmp_path: Path, tokenizer: Any, attention: str | None, one_row: bool
) -> None:
    from finetune_trainer.packing import collator_for

    dataset, _ = _dataset(tmp_path, tokenizer, n=12, length=64, packing=False)
    items = [dataset[i] for i in range(4)]
    batch = collator_for(tokenizer.pad_token_id, "none", attention)(items)
    assert batch["input_ids"].shape[0] == (1 if one_row else 4)
    assert ("attention_mask" in batch) is not one_row
