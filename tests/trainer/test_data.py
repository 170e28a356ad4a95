"""Data formats and loss masking, sequences without truncation, the held-out eval set and the
preflight's error reports — all read the one way the trainer reads (`plan_data`, token shards,
`token_dataset`), and compared with an independent computation from the tokenizer itself."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from finetune_trainer.config import DatasetSpec
from finetune_trainer.data import IGNORE, ShardSettings, plan_data, preflight, shards_for, token_dataset
from finetune_trainer.errors import InvalidData
from finetune_trainer.shards import TokenStore
from finetune_trainer.sources import list_files
from tests.trainer.factories import make_tokenizer, reference_document, write_jsonl


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return make_tokenizer()


def shard_documents(
    tmp_path: Path, records: list[dict[str, Any]], spec: DatasetSpec, tokenizer: Any
) -> list[tuple[list[int], list[int]]]:
    """The (ids, labels) of every document, as the token shards hold them."""
    uri = write_jsonl(tmp_path / "data" / "records.jsonl", records)
    shard_set = shards_for(
        list_files([uri]),
        spec,
        tokenizer,
        ShardSettings(local_root=tmp_path / "shards", remote_uri=None, workers=1),
    )
    store = TokenStore(shard_set)
    out = []
    for d in range(store.documents):
        ids, mask = store.span(int(store.doc_starts[d]), int(store.doc_starts[d + 1]))
        labels = ids if mask is None else np.where(mask, ids, IGNORE)
        out.append((ids.tolist(), labels.tolist()))
    return out


def _spec(**kw: Any) -> DatasetSpec:
    return DatasetSpec(train=["file:///unused"], **kw)


def test_text_trains_on_every_token_and_ends_with_eos(tmp_path: Path, tokenizer: Any) -> None:
    record = {"text": "the market rose"}
    ((ids, labels),) = shard_documents(tmp_path, [record], _spec(), tokenizer)
    assert ids[-1] == tokenizer.eos_token_id
    assert labels == ids
    assert (ids, labels) == reference_document(record, _spec(), tokenizer)


def test_prompt_completion_masks_the_prompt_only(tmp_path: Path, tokenizer: Any) -> None:
    spec = _spec(format="prompt-completion")
    ((ids, labels),) = shard_documents(
        tmp_path, [{"prompt": "what is oil", "completion": " a price"}], spec, tokenizer
    )
    prompt_len = len(tokenizer("what is oil")["input_ids"])
    assert labels[:prompt_len] == [IGNORE] * prompt_len
    trained = labels[prompt_len:]
    assert trained == ids[prompt_len:] and len(trained) >= 2  # completion + EOS
    assert trained[-1] == tokenizer.eos_token_id


def test_prompt_completion_train_on_inputs(tmp_path: Path, tokenizer: Any) -> None:
    spec = _spec(format="prompt-completion", train_on_inputs=True)
    ((ids, labels),) = shard_documents(
        tmp_path, [{"prompt": "what is oil", "completion": " a price"}], spec, tokenizer
    )
    assert labels == ids


def test_chat_trains_only_on_assistant_turns(tmp_path: Path, tokenizer: Any) -> None:
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "profit rose"},
        {"role": "user", "content": "and oil"},
        {"role": "assistant", "content": "oil fell"},
    ]
    ((ids, labels),) = shard_documents(tmp_path, [{"messages": messages}], _spec(format="chat"), tokenizer)
    trained = tokenizer.decode([t for t, label in zip(ids, labels, strict=True) if label != IGNORE])
    assert "profit rose" in trained and "oil fell" in trained
    assert "hello" not in trained and "be brief" not in trained and "and oil" not in trained
    assert trained.count("<|im_end|>") == 2  # each assistant turn learns to end itself
    assert any(label == IGNORE for label in labels)


@pytest.mark.parametrize("packing", [True, False], ids=["packed", "one-document-per-sequence"])
def test_sequences_keep_every_token_and_split_long_documents(
    tmp_path: Path, tokenizer: Any, packing: bool
) -> None:
    uri = write_jsonl(tmp_path / "t.jsonl", [{"text": "the market rose " * 5}, {"text": "oil fell"}])
    spec = DatasetSpec(train=[uri], eval=[uri], packing=packing)
    dataset = token_dataset(
        plan_data(spec, seed=0),
        spec,
        tokenizer,
        split="train",
        length=8,
        settings=ShardSettings(local_root=tmp_path / "shards", remote_uri=None, workers=1),
    )
    lengths = [len(dataset[i]["input_ids"]) for i in range(len(dataset))]
    documents = [
        len(reference_document(r, spec, tokenizer)[0])
        for r in ({"text": "the market rose " * 5}, {"text": "oil fell"})
    ]
    if packing:
        assert sum(lengths) == sum(documents)  # no silent truncation
        assert lengths[:-1] == [8] * (len(lengths) - 1)
    else:  # each document split into pieces of at most 8, never joined; a one-token piece has no target
        pieces = [n for d in documents for n in [8] * (d // 8) + ([d % 8] if d % 8 else [])]
        assert lengths == [n for n in pieces if n > 1]
    flat = [t for i in range(len(dataset)) for t in dataset[i]["input_ids"].tolist()]
    ends_kept = 2 if packing else sum(1 for d in documents if (d % 8 or 8) > 1)  # EOS ends each last piece
    assert flat.count(tokenizer.eos_token_id) == ends_kept


def test_sequences_without_trained_tokens_are_dropped_and_an_empty_set_is_an_error(
    tmp_path: Path, tokenizer: Any
) -> None:
    """Without packing a document is cut into pieces; a piece of prompt tokens only carries no
    loss and is dropped, and a set in which no piece is left is an error naming the settings."""
    uri = write_jsonl(
        tmp_path / "t.jsonl", [{"prompt": "what is the price of oil today", "completion": " a"}]
    )
    spec = DatasetSpec(train=[uri], eval=[uri], format="prompt-completion", packing=False)
    settings = ShardSettings(local_root=tmp_path / "shards", remote_uri=None, workers=1)
    ids, _ = reference_document(
        {"prompt": "what is the price of oil today", "completion": " a"}, spec, tokenizer
    )
    # sequences of 1 token have no target (a label is predicted from the token before it)
    with pytest.raises(
        InvalidData,
        match=r"the train set has no trained tokens .* carries no loss \(dataset.format, trainOnInputs\)",
    ):
        token_dataset(plan_data(spec, seed=0), spec, tokenizer, split="train", length=1, settings=settings)
    kept = token_dataset(plan_data(spec, seed=0), spec, tokenizer, split="train", length=4, settings=settings)
    assert 0 < len(kept) < -(-len(ids) // 4)  # the prompt-only pieces are dropped


def test_preflight_reports_every_bad_record_with_its_line(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_text(
        '{"prompt": "a", "completion": "b"}\n'
        "not json\n"
        '{"prompt": "a"}\n'
        "\n"
        '{"prompt": "a", "completion": ""}\n'
        '{"prompt": 3, "completion": "b"}\n'
    )
    spec = DatasetSpec(train=[f"file://{path}"], format="prompt-completion")
    with pytest.raises(InvalidData) as info:
        preflight(plan_data(spec, seed=0).train_files, spec)
    text = str(info.value)
    assert "4 bad record(s)" in text
    for line, words in [
        (2, "invalid JSON"),
        (3, "missing field 'completion'"),
        (5, "empty"),
        (6, "must be a string"),
    ]:
        assert f"train.jsonl:{line}: " in text and words in text


def test_preflight_rejects_chat_without_assistant_turn(tmp_path: Path) -> None:
    uri = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    spec = DatasetSpec(train=[uri], format="chat")
    with pytest.raises(InvalidData, match=r"chat.jsonl:1: no non-empty assistant message"):
        preflight(plan_data(spec, seed=0).train_files, spec)


def test_preflight_counts_the_tokens_the_shards_hold(tmp_path: Path, tokenizer: Any) -> None:
    records = [{"prompt": f"question {i}", "completion": " the answer " * (1 + i % 4)} for i in range(30)]
    spec = DatasetSpec(train=[write_jsonl(tmp_path / "a.jsonl", records)], format="prompt-completion")
    report = preflight(plan_data(spec, seed=0).train_files, spec, tokenizer=tokenizer)
    assert report.total == 30
    assert report.total_tokens == sum(len(reference_document(r, spec, tokenizer)[0]) for r in records)


def test_globs_and_txt_files(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "one.txt").write_text("the market rose")
    (tmp_path / "a" / "two.txt").write_text("oil fell")
    (tmp_path / "a" / "skip.md").write_text("no")
    files = plan_data(DatasetSpec(train=[f"file://{tmp_path}/a/*.txt"]), seed=0).train_files
    assert [f.key.rsplit("/", 1)[-1] for f in files] == ["one.txt", "two.txt"]
    assert preflight(files, _spec()).total == 2
    assert len(plan_data(DatasetSpec(train=[f"file://{tmp_path}/**/*.txt"]), seed=0).train_files) == 2


def test_no_matching_files_is_invalid_data(tmp_path: Path) -> None:
    with pytest.raises(InvalidData, match=r"missing-\*\.jsonl: no files match"):
        plan_data(DatasetSpec(train=[f"file://{tmp_path}/missing-*.jsonl"]), seed=0)


def _split_texts(
    tmp_path: Path,
    spec: DatasetSpec,
    tokenizer: Any,
    split: str,
    *,
    need_train: bool = True,
    datasets_uri: str | None = None,
) -> list[str]:
    plan = plan_data(spec, seed=1, need_train=need_train, datasets_uri=datasets_uri)
    dataset = token_dataset(
        plan,
        spec,
        tokenizer,
        split=split,
        length=10_000,
        settings=ShardSettings(local_root=tmp_path / "shards", remote_uri=None, workers=1),
    )
    store = dataset.store
    return [
        tokenizer.decode(store.span(int(store.doc_starts[d]), int(store.doc_starts[d + 1]))[0][:-1].tolist())
        for d in dataset.doc_ids.tolist()
    ]


def test_holdout_is_deterministic_and_disjoint(tmp_path: Path, tokenizer: Any) -> None:
    uri = write_jsonl(tmp_path / "t.jsonl", [{"text": f"doc {i}"} for i in range(20)])
    spec = DatasetSpec(train=[uri], eval_size=5, packing=False)
    first = _split_texts(tmp_path, spec, tokenizer, "eval")
    assert first == _split_texts(tmp_path, spec, tokenizer, "eval")
    train = _split_texts(tmp_path, spec, tokenizer, "train")
    assert len(first) == 5 and len(train) == 15
    assert not set(first) & set(train) and set(first) | set(train) == {f"doc {i}" for i in range(20)}
    with pytest.raises(InvalidData, match="evalSize"):
        _split_texts(tmp_path, DatasetSpec(train=[uri], eval_size=20), tokenizer, "eval")


@pytest.mark.parametrize(
    ("spec", "need_train", "expected"),
    [
        pytest.param({"eval": ["E"]}, False, (0, 3), id="eval-files-only"),
        pytest.param({"train": ["T"], "eval": ["E"]}, False, (0, 3), id="evaluate-skips-train"),
        pytest.param({"train": ["T"], "eval": ["E"]}, True, (10, 3), id="train-reads-both"),
        pytest.param({"train": ["T"], "evalSize": 4}, False, (6, 4), id="evaluate-holds-out-of-train"),
        pytest.param({"name": "news", "eval": ["E"]}, True, (10, 3), id="eval-overrides-registered-eval"),
    ],
)
def test_eval_sources(
    spec: dict[str, Any], need_train: bool, expected: tuple[int, int], tmp_path: Path, tokenizer: Any
) -> None:
    """dataset.eval, else a registered dataset's eval/ files, else records held out of train."""
    train = write_jsonl(
        tmp_path / "reg" / "news" / "train" / "t.jsonl", [{"text": f"t {i}"} for i in range(10)]
    )
    write_jsonl(tmp_path / "reg" / "news" / "eval" / "e.jsonl", [{"text": "registered eval"}])
    evaluation = write_jsonl(tmp_path / "e.jsonl", [{"text": f"e {i}"} for i in range(3)])
    uris = {"T": train, "E": evaluation}
    fields = {k: [uris[u] for u in v] if isinstance(v, list) else v for k, v in spec.items()}
    dataset_spec = DatasetSpec.model_validate({**fields, "packing": False})
    registry = f"file://{tmp_path}/reg/"
    evaluated = _split_texts(
        tmp_path, dataset_spec, tokenizer, "eval", need_train=need_train, datasets_uri=registry
    )
    plan = plan_data(dataset_spec, seed=1, need_train=need_train, datasets_uri=registry)
    trained = (
        0
        if not plan.train_files
        else len(
            _split_texts(
                tmp_path, dataset_spec, tokenizer, "train", need_train=need_train, datasets_uri=registry
            )
        )
    )
    assert (trained, len(evaluated)) == expected
    assert "registered eval" not in evaluated
