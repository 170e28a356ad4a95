"""Data formats, loss masking, packing without truncation, and the preflight's error reports."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from finetune_trainer.config import DatasetSpec
from finetune_trainer.data import IGNORE, Example, load_raw, read_sources, to_sequences, tokenize
from finetune_trainer.errors import InvalidData
from tests.trainer.factories import make_tokenizer, write_jsonl


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return make_tokenizer()


def _spec(**kw: Any) -> DatasetSpec:
    return DatasetSpec(train=["file:///unused"], **kw)


def _records(data: list[dict[str, Any]]) -> list[Any]:
    from finetune_trainer.data import Record

    return [Record(f"mem:{i + 1}", d) for i, d in enumerate(data)]


def test_text_trains_on_every_token_and_ends_with_eos(tokenizer: Any) -> None:
    (example,) = tokenize(_records([{"text": "the market rose"}]), _spec(), tokenizer)
    assert example.input_ids[-1] == tokenizer.eos_token_id
    assert example.labels == example.input_ids


def test_prompt_completion_masks_the_prompt_only(tokenizer: Any) -> None:
    spec = _spec(format="prompt-completion")
    (example,) = tokenize(_records([{"prompt": "what is oil", "completion": " a price"}]), spec, tokenizer)
    prompt_len = len(tokenizer("what is oil")["input_ids"])
    assert example.labels[:prompt_len] == [IGNORE] * prompt_len
    trained = example.labels[prompt_len:]
    assert trained == example.input_ids[prompt_len:] and len(trained) >= 2  # completion + EOS
    assert trained[-1] == tokenizer.eos_token_id


def test_prompt_completion_train_on_inputs(tokenizer: Any) -> None:
    spec = _spec(format="prompt-completion", train_on_inputs=True)
    (example,) = tokenize(_records([{"prompt": "what is oil", "completion": " a price"}]), spec, tokenizer)
    assert example.labels == example.input_ids


def test_chat_trains_only_on_assistant_turns(tokenizer: Any) -> None:
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "profit rose"},
        {"role": "user", "content": "and oil"},
        {"role": "assistant", "content": "oil fell"},
    ]
    (example,) = tokenize(_records([{"messages": messages}]), _spec(format="chat"), tokenizer)
    trained = tokenizer.decode([t for t, label in zip(example.input_ids, example.labels, strict=True) if label != IGNORE])
    assert "profit rose" in trained and "oil fell" in trained
    assert "hello" not in trained and "be brief" not in trained and "and oil" not in trained
    assert trained.count("<|im_end|>") == 2  # each assistant turn learns to end itself
    assert any(label == IGNORE for label in example.labels)


def test_packing_keeps_every_token_and_separates_documents(tokenizer: Any) -> None:
    examples = tokenize(_records([{"text": "the market rose " * 5}, {"text": "oil fell"}]), _spec(), tokenizer)
    total = sum(len(e.input_ids) for e in examples)
    blocks = to_sequences(examples, length=8, packing=True)
    assert sum(len(b.input_ids) for b in blocks) == total  # no silent truncation
    assert all(len(b.input_ids) == 8 for b in blocks[:-1])
    flat = [t for b in blocks for t in b.input_ids]
    assert flat.count(tokenizer.eos_token_id) == 2


def test_without_packing_long_records_are_split_not_truncated() -> None:
    example = Example(list(range(20)), list(range(20)))
    sequences = to_sequences([example], length=8, packing=False)
    assert [len(s.input_ids) for s in sequences] == [8, 8, 4]


def test_sequences_without_trained_tokens_are_dropped() -> None:
    masked = Example([1, 2, 3, 4], [IGNORE] * 4)
    assert to_sequences([masked], length=8, packing=False) == []


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
    with pytest.raises(InvalidData) as info:
        read_sources([f"file://{path}"], _spec(format="prompt-completion"), )
    text = str(info.value)
    assert "4 bad record(s)" in text
    for line, words in [(2, "invalid JSON"), (3, "missing field 'completion'"), (5, "empty"), (6, "must be a string")]:
        assert f"train.jsonl:{line}: " in text and words in text


def test_preflight_rejects_chat_without_assistant_turn(tmp_path: Path) -> None:
    uri = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(InvalidData, match=r"chat.jsonl:1: no non-empty assistant message"):
        read_sources([uri], _spec(format="chat"))


def test_globs_and_txt_files(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "one.txt").write_text("the market rose")
    (tmp_path / "a" / "two.txt").write_text("oil fell")
    (tmp_path / "a" / "skip.md").write_text("no")
    records, _ = read_sources([f"file://{tmp_path}/a/*.txt"], _spec())
    assert [r.data["text"] for r in records] == ["the market rose", "oil fell"]
    records, _ = read_sources([f"file://{tmp_path}/**/*.txt"], _spec())
    assert len(records) == 2


def test_no_matching_files_is_invalid_data(tmp_path: Path) -> None:
    with pytest.raises(InvalidData, match="no files match"):
        read_sources([f"file://{tmp_path}/missing-*.jsonl"], _spec())


def test_holdout_is_deterministic_and_disjoint(tmp_path: Path) -> None:
    uri = write_jsonl(tmp_path / "t.jsonl", [{"text": f"doc {i}"} for i in range(20)])
    spec = DatasetSpec(train=[uri], eval_size=5)
    first, second = load_raw(spec, seed=1), load_raw(spec, seed=1)
    assert [r.source for r in first.eval] == [r.source for r in second.eval]
    assert len(first.eval) == 5 and len(first.train) == 15
    assert not {r.source for r in first.eval} & {r.source for r in first.train}
    with pytest.raises(InvalidData, match="evalSize"):
        load_raw(DatasetSpec(train=[uri], eval_size=20), seed=1)


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
def test_eval_sources(spec: dict[str, Any], need_train: bool, expected: tuple[int, int], tmp_path: Path) -> None:
    """dataset.eval, else a registered dataset's eval/ files, else records held out of train."""
    train = write_jsonl(tmp_path / "reg" / "news" / "train" / "t.jsonl", [{"text": f"t {i}"} for i in range(10)])
    write_jsonl(tmp_path / "reg" / "news" / "eval" / "e.jsonl", [{"text": "registered eval"}])
    evaluation = write_jsonl(tmp_path / "e.jsonl", [{"text": f"e {i}"} for i in range(3)])
    uris = {"T": train, "E": evaluation}
    fields = {k: [uris[u] for u in v] if isinstance(v, list) else v for k, v in spec.items()}
    raw = load_raw(
        DatasetSpec.model_validate(fields), seed=1, need_train=need_train, datasets_uri=f"file://{tmp_path}/reg/"
    )
    assert (len(raw.train), len(raw.eval)) == expected
