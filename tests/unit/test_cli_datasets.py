"""Dataset format detection, validation with the trainer's preflight, and upload keys (pure)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from finetune_cli import datasets


def _jsonl(*records: Any) -> bytes:
    return "\n".join(json.dumps(r) for r in records).encode()


@pytest.mark.parametrize(
    ("name", "content", "fmt"),
    [
        pytest.param("a.txt", b"plain text", "text", id="txt-file"),
        pytest.param("a.jsonl", _jsonl({"text": "x"}), "text", id="text-records"),
        pytest.param(
            "a.jsonl", _jsonl({"prompt": "q", "completion": "a"}), "prompt-completion", id="prompt-completion"
        ),
        pytest.param("a.jsonl", _jsonl({"messages": [{"role": "user", "content": "hi"}]}), "chat", id="chat"),
        pytest.param("a.jsonl", b"\n\n" + _jsonl({"text": "x"}), "text", id="leading-blank-lines"),
    ],
)
def test_detect_format(name: str, content: bytes, fmt: str) -> None:
    assert datasets.detect_format(name, content) == fmt


@pytest.mark.parametrize(
    ("content", "message"),
    [
        pytest.param(b"{not json", "a.jsonl:1: invalid JSON", id="bad-json"),
        pytest.param(b"[1, 2]", "a.jsonl:1: a record must be a JSON object", id="not-an-object"),
        pytest.param(_jsonl({"body": "x"}), "cannot tell the format from the fields", id="unknown-fields"),
        pytest.param(b"\n", "a.jsonl: no records", id="empty"),
    ],
)
def test_detect_format_says_what_is_wrong(content: bytes, message: str) -> None:
    with pytest.raises(datasets.DatasetError, match=message):
        datasets.detect_format("a.jsonl", content)


def test_summarize_counts_records_per_split() -> None:
    summary = datasets.summarize(
        "reuters",
        [
            ("file:///d/train-1.jsonl", "train", _jsonl({"text": "a"}, {"text": "b"})),
            ("file:///d/train-2.jsonl", "train", _jsonl({"text": "c"})),
            ("file:///d/eval.jsonl", "eval", _jsonl({"text": "d"})),
        ],
        created="2026-11-29T06:00:00Z",
    )
    assert (summary.format, summary.train_records, summary.eval_records) == ("text", 3, 1)
    metadata = summary.to_metadata()
    assert metadata["trainRecords"] == 3
    assert datasets.DatasetSummary.from_metadata(metadata) == summary


def test_summarize_reports_every_bad_record_with_file_and_line() -> None:
    content = _jsonl({"text": "ok"}, {"text": ""}, {"text": 3})
    with pytest.raises(datasets.DatasetError) as caught:
        datasets.summarize("bad", [("file:///d/t.jsonl", "train", content)])
    assert "2 record(s) the trainer would reject" in str(caught.value)
    assert caught.value.details == [
        "file:///d/t.jsonl:2: field 'text' is empty",
        "file:///d/t.jsonl:3: field 'text' must be a string, got int",
    ]


@pytest.mark.parametrize(
    ("files", "message"),
    [
        pytest.param([], "--paths matched nothing", id="no-files"),
        pytest.param([("e.jsonl", "eval", _jsonl({"text": "x"}))], "no training files", id="eval-only"),
        pytest.param(
            [
                ("a.jsonl", "train", _jsonl({"text": "x"})),
                ("b.jsonl", "train", _jsonl({"prompt": "q", "completion": "a"})),
            ],
            "different formats",
            id="mixed-formats",
        ),
    ],
)
def test_summarize_rejects_unusable_file_sets(files: list[Any], message: str) -> None:
    with pytest.raises(datasets.DatasetError, match=message):
        datasets.summarize("x", files)


def test_summarize_with_an_explicit_format_checks_its_fields() -> None:
    with pytest.raises(datasets.DatasetError) as caught:
        datasets.summarize("x", [("a.jsonl", "train", _jsonl({"text": "x"}))], format="prompt-completion")
    assert "missing field 'prompt'" in caught.value.details[0]


def test_upload_keys_are_unique_per_split() -> None:
    taken: set[str] = set()
    keys = [
        datasets.upload_key("d", "train", "s3://a/x/train.jsonl", taken),
        datasets.upload_key("d", "train", "s3://a/y/train.jsonl", taken),
        datasets.upload_key("d", "eval", "s3://a/y/train.jsonl", taken),
    ]
    assert keys == ["d/train/train.jsonl", "d/train/train-2.jsonl", "d/eval/train.jsonl"]
