"""Dataset format detection, record and token counts, what a rejection says, and upload keys
(pure; the streaming command itself runs in tests/trainer/test_sources.py)."""

from __future__ import annotations

import re
from typing import Any

import pytest

from finetune_cli import datasets
from finetune_trainer.data import BadRecords, PreflightReport
from finetune_trainer.errors import InvalidData
from finetune_trainer.sources import FirstRecord


def _first(kind: str, *fields: str) -> FirstRecord:
    """What `sources.first_record` gives for a file of `kind` whose first record has `fields`."""
    where = {"jsonl": "a.jsonl:1", "parquet": "a.parquet:row 1", "txt": "a.txt"}[kind]
    return FirstRecord(kind, where, fields)


@pytest.mark.parametrize(
    ("first", "fmt"),
    [
        pytest.param(_first("txt"), "text", id="txt-file"),
        pytest.param(_first("jsonl", "text"), "text", id="text-records"),
        pytest.param(_first("jsonl", "prompt", "completion"), "prompt-completion", id="prompt-completion"),
        pytest.param(_first("jsonl", "messages"), "chat", id="chat"),
        pytest.param(_first("parquet", "id", "text"), "text", id="parquet-text-column"),
        pytest.param(
            _first("parquet", "prompt", "completion", "text"), "prompt-completion", id="parquet-pairs"
        ),
    ],
)
def test_detect_format(first: FirstRecord, fmt: str) -> None:
    assert datasets.detect_format(first) == fmt


@pytest.mark.parametrize(
    ("first", "message"),
    [
        pytest.param(
            _first("jsonl", "body"), "a.jsonl:1: cannot tell the format from the fields ['body']", id="jsonl"
        ),
        pytest.param(
            _first("parquet", "body", "id"),
            "a.parquet:row 1: cannot tell the format from the columns ['body', 'id']",
            id="parquet",
        ),
        pytest.param(
            _first("jsonl", "prompt"), "fields ['prompt']: a registered dataset has a 'text' field", id="half"
        ),
    ],
)
def test_detect_format_says_what_is_wrong(first: FirstRecord, message: str) -> None:
    with pytest.raises(datasets.DatasetError, match=re.escape(message)):
        datasets.detect_format(first)


def _report(records: dict[str, int], tokens: dict[str, int] | None) -> PreflightReport:
    return PreflightReport(records, tokens)


def test_summarize_counts_records_and_tokens_per_split() -> None:
    files: list[tuple[str, datasets.Split, int]] = [
        ("file:///d/train-1.jsonl", "train", 10),
        ("file:///d/train-2.jsonl", "train", 5),
        ("file:///d/eval.jsonl", "eval", 5),
    ]
    report = _report(
        {"file:///d/train-1.jsonl": 2, "file:///d/train-2.jsonl": 1, "file:///d/eval.jsonl": 1},
        {"file:///d/train-1.jsonl": 20, "file:///d/train-2.jsonl": 7, "file:///d/eval.jsonl": 4},
    )
    summary = datasets.summarize(
        "reuters",
        "text",
        files,
        report,
        tokenizer="pythia-70m (tokenizer.json)",
        created="2026-11-29T06:00:00Z",
    )
    assert (summary.format, summary.train_records, summary.eval_records) == ("text", 3, 1)
    assert (summary.tokens("train"), summary.tokens("eval")) == (27, 4)
    metadata = summary.to_metadata()
    assert (metadata["trainRecords"], metadata["trainTokens"], metadata["evalTokens"]) == (3, 27, 4)
    assert datasets.DatasetSummary.from_metadata(metadata) == summary


def test_without_a_tokenizer_no_token_count_is_made_up() -> None:
    report = _report({"t.jsonl": 4}, None)
    summary = datasets.summarize(
        "x", "chat", [("t.jsonl", "train", 9)], report, tokenizer="tokens not counted: …"
    )
    assert summary.tokens("train") is None and not summary.counted_tokens
    assert summary.to_metadata()["trainTokens"] is None


def test_metadata_written_before_token_counts_still_reads() -> None:
    old = {
        "name": "n",
        "format": "text",
        "files": [{"source": "a", "split": "train", "records": 2, "bytes": 9}],
    }
    assert datasets.DatasetSummary.from_metadata(old).train_records == 2


def test_a_rejection_counts_every_bad_record_and_shows_the_first() -> None:
    shown = [f"t.jsonl:{i}: field 'text' is empty" for i in range(1, 21)]
    error = datasets.rejection(BadRecords(31, shown))
    assert str(error) == "31 record(s) the trainer would reject (11 more not shown); fix them and retry"
    assert error.details == shown
    other = datasets.rejection(InvalidData("t.jsonl.gz: named .gz but is not gzip data"))
    assert str(other) == "t.jsonl.gz: named .gz but is not gzip data"


@pytest.mark.parametrize(
    ("files", "message"),
    [
        pytest.param([], "--paths matched nothing", id="no-files"),
        pytest.param([("e.jsonl", "eval")], "no training files", id="eval-only"),
    ],
)
def test_unusable_file_sets(files: list[Any], message: str) -> None:
    with pytest.raises(datasets.DatasetError, match=message):
        datasets.check_file_set(files)


def test_files_of_different_formats_are_named() -> None:
    with pytest.raises(datasets.DatasetError, match="different formats") as caught:
        datasets.choose_format({"a.jsonl": "text", "b.jsonl": "prompt-completion"})
    assert caught.value.details == ["a.jsonl: text", "b.jsonl: prompt-completion"]


def test_upload_keys_are_unique_per_split() -> None:
    taken: set[str] = set()
    keys = [
        datasets.upload_key("d", "train", "s3://a/x/train.jsonl", taken),
        datasets.upload_key("d", "train", "s3://a/y/train.jsonl", taken),
        datasets.upload_key("d", "eval", "s3://a/y/train.jsonl", taken),
    ]
    assert keys == ["d/train/train.jsonl", "d/train/train-2.jsonl", "d/eval/train.jsonl"]
