"""Fuzzing the trainer pod's own data preflight: the real entry point `finetune-trainer --check`
(`cli.main`, what an init step or a user runs before training) on a small valid config whose
train (and eval) files hold generated JSONL — random records, a truncated last line, wrong types,
huge fields, invalid UTF-8 (the `jsonl_files` of tests/unit/test_cli_fuzz.py, which fuzzes the
same preflight through `kubectl finetune add dataset`), blank lines, CRLF line ends, gzip and
zstd, and large files cut into several work units.

What a user sees, checked against a plain reading of the format rules (`_expected`, written
from the dataset.format documentation, not from the trainer's code): exit code 0 with the number
of valid records, or 3 (EXIT_INVALID_INPUT) with a termination message that names every bad
record as `file:line` (the first MAX_REPORTED_ERRORS of them, in file order, and their count) or
the file that holds no record — never exit code 1, never an exception out of `main`.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from finetune_trainer import contract
from finetune_trainer.data import MAX_REPORTED_ERRORS
from tests.unit.test_cli_fuzz import RECORD, jsonl_files

# The trainer tier's autouse environment fixture is function-scoped; it only sets variables that
# hold for every example (each example writes its own files and empties the termination log).
FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
FORMATS = ("text", "prompt-completion", "chat")
CHAT_ROLES = {"system", "user", "assistant", "tool"}
SUFFIXES = {"": lambda b: b, ".gz": gzip.compress, ".zst": lambda b: _zstd(b)}


def _zstd(content: bytes) -> bytes:
    import zstandard

    return zstandard.ZstdCompressor().compress(content)


TEXT = st.text(max_size=40)
NONBLANK = TEXT.filter(str.strip)
MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(sorted(CHAT_ROLES)), "content": TEXT})
ANSWER = st.fixed_dictionaries({"role": st.just("assistant"), "content": NONBLANK})
GOOD_RECORDS = {
    "text": st.fixed_dictionaries({"text": NONBLANK}, optional={"id": st.integers()}),
    "prompt-completion": st.fixed_dictionaries({"prompt": TEXT, "completion": NONBLANK}),
    "chat": st.tuples(st.lists(MESSAGE, max_size=3), ANSWER, st.lists(MESSAGE, max_size=2)).map(
        lambda t: {"messages": [*t[0], t[1], *t[2]]}
    ),
}


@st.composite
def near_valid_files(draw: st.DrawFn, fmt: str) -> bytes:
    """Valid records of `fmt` (raw UTF-8 or escaped), sometimes with one line broken: a random
    record, a record of another format, a truncated line, bytes that are not UTF-8."""
    ascii_only = draw(st.booleans())
    lines = [
        json.dumps(r, ensure_ascii=ascii_only).encode()
        for r in draw(st.lists(GOOD_RECORDS[fmt], min_size=1, max_size=8))
    ]
    if draw(st.integers(0, 2)) == 0:
        at = draw(st.integers(0, len(lines) - 1))
        fault = draw(st.sampled_from(["record", "format", "truncated", "utf-8"]))
        if fault == "record":
            lines[at] = json.dumps(draw(RECORD)).encode()
        elif fault == "format":
            other = draw(st.sampled_from([f for f in FORMATS if f != fmt]))
            lines[at] = json.dumps(draw(GOOD_RECORDS[other])).encode()
        elif fault == "truncated":
            lines[at] = lines[at][: draw(st.integers(0, len(lines[at]) - 1))]
        else:
            cut = draw(st.integers(0, len(lines[at])))
            lines[at] = (
                lines[at][:cut] + draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80"])) + lines[at][cut:]
            )
    return b"\n".join(lines)


@st.composite
def data_files(draw: st.DrawFn, fmt: str) -> bytes:
    """Random JSONL (`jsonl_files`) or near-valid records of `fmt`, as written by other tools:
    optionally CRLF line ends, a blank line between records and a final newline."""
    content = draw(st.one_of(jsonl_files(), near_valid_files(fmt)))
    if draw(st.booleans()):
        content = content.replace(b"\n", b"\r\n")
    if draw(st.integers(0, 3)) == 0:
        lines = content.split(b"\n")
        at = draw(st.integers(0, len(lines)))
        content = b"\n".join([*lines[:at], draw(st.sampled_from([b"", b"  ", b"\t\r"])), *lines[at:]])
    if draw(st.booleans()):
        content += b"\n"
    return content


# ---- the rules, read from the documentation ------------------------------------------------------
@dataclass(frozen=True)
class Expected:
    bad: list[str]  # `file:line` (or `file`) of every problem, in file order
    records: int  # valid records


def _record_problem(data: Any, fmt: str, train_on_inputs: bool) -> bool:
    """Whether a parsed line is not a usable record of `fmt` (default field names)."""
    if not isinstance(data, dict):
        return True

    def text(field: str, *, may_be_empty: bool = False) -> bool:
        value = data.get(field)
        return not isinstance(value, str) or (not may_be_empty and not value.strip())

    if fmt == "text":
        return text("text")
    if fmt == "prompt-completion":
        return text("prompt", may_be_empty=True) or text("completion")
    messages = data.get("messages")
    if not isinstance(messages, list) or not messages:
        return True
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            return True
        if message.get("role") not in CHAT_ROLES:
            return True
    return not train_on_inputs and not any(
        m["role"] == "assistant" and m["content"].strip() for m in messages
    )


def _expected(files: list[tuple[str, bytes]], fmt: str, train_on_inputs: bool) -> Expected:
    """JSONL: one JSON object per line (lines end at \\n), blank lines skipped; a file without
    any record is itself a problem, named by the file alone."""
    bad: list[str] = []
    records = 0
    for uri, content in files:
        lines = content.split(b"\n")
        if lines[-1] == b"":
            lines.pop()
        seen = False
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            seen = True
            try:
                data = json.loads(line)
            except ValueError:  # invalid JSON, or not UTF-8
                bad.append(f"{uri}:{number}")
                continue
            if _record_problem(data, fmt, train_on_inputs):
                bad.append(f"{uri}:{number}")
            else:
                records += 1
        if not seen:
            bad.append(uri)
    return Expected(bad, records)


# ---- the entry point ------------------------------------------------------------------------------
@dataclass(frozen=True)
class DataFile:
    split: str  # "train" or "eval"
    compression: str  # a key of SUFFIXES
    content: bytes  # uncompressed

    @property
    def name(self) -> str:
        return f"{self.split}.jsonl{self.compression}"


def _check(
    folder: Path, model: Path, files: list[DataFile], fmt: str, train_on_inputs: bool
) -> tuple[int, str, dict[str, Any] | None]:
    """Write the files and a small valid config naming them, run `finetune-trainer --check`;
    (exit code, stdout, termination message or None when none was written)."""
    from finetune_trainer.cli import main

    for file in files:
        (folder / file.name).write_bytes(SUFFIXES[file.compression](file.content))
    dataset: dict[str, Any] = {"format": fmt, "trainOnInputs": train_on_inputs}
    for split in ("train", "eval"):
        uris = [f"file://{folder}/{f.name}" for f in files if f.split == split]
        if uris:
            dataset[split] = uris
    config = {
        "model": {"uri": f"file://{model}"},
        "dataset": dataset,
        "hyperparameters": {"maxSteps": 4, "batchSize": 4, "microBatchSize": 4, "sequenceLength": 32},
        "checkpoints": {"outputUri": f"file://{folder}/run/"},
    }
    (folder / "config.json").write_text(json.dumps(config))
    termination = Path(os.environ["FINETUNE_TERMINATION_LOG"])
    termination.write_text("")  # a new container
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["--config", str(folder / "config.json"), "--check"])
    message = termination.read_text()
    assert not (folder / "run").exists(), "--check writes nothing into the run folder"
    return code, out.getvalue(), json.loads(message) if message else None


def _assert_verdict(
    folder: Path, model: Path, files: list[DataFile], fmt: str, train_on_inputs: bool
) -> None:
    code, out, summary = _check(folder, model, files, fmt, train_on_inputs)
    located = [(f"file://{folder}/{f.name}", f.content) for f in files]
    expected = _expected(located, fmt, train_on_inputs)
    assert code in (contract.EXIT_OK, contract.EXIT_INVALID_INPUT), (code, summary)
    event("refused" if expected.bad else "accepted")
    if not expected.bad:
        assert code == contract.EXIT_OK, summary
        assert f"config and data are valid ({expected.records} records in {len(files)} files)" in out, out
        assert summary is None, summary
        return
    assert code == contract.EXIT_INVALID_INPUT, f"accepted, but {expected.bad} are bad: {out}"
    assert summary is not None, "a refusal writes the termination message"
    assert (summary["phase"], summary["exitCode"], summary["reason"]) == ("Failed", 3, "InvalidData")
    message: str = summary["message"]
    assert "Traceback" not in message
    header, *details = message.split("\n")
    shown = expected.bad[:MAX_REPORTED_ERRORS]
    more = len(expected.bad) - len(shown)
    assert header == f"dataset preflight failed: {len(expected.bad)} bad record(s)" + (
        f" ({more} not shown)" if more > 0 else ""
    ), message
    assert [_location(line, [uri for uri, _ in located]) for line in details] == shown, message


def _location(detail: str, uris: list[str]) -> str:
    """`file:line` (or `file`) of a detail line `  <uri>[:<line>]: <why>`."""
    text = detail.removeprefix("  ")
    for uri in sorted(uris, key=len, reverse=True):
        if text.startswith(uri):
            rest = text[len(uri) :]
            if rest.startswith(": ") and rest[2:].strip():
                return uri
            number, sep, why = rest[1:].partition(": ")
            assert rest.startswith(":") and number.isdigit() and sep and why.strip(), detail
            return f"{uri}:{number}"
    raise AssertionError(f"{detail!r} names none of the files {uris}")


@pytest.fixture(scope="module")
def model(model_dir: Any) -> Path:
    """The tiny Llama: `--check` loads no model, but the config is the one a pod would get."""
    path: Path = model_dir("llama")
    return path


@FUZZ
@given(
    fmt=st.sampled_from(FORMATS),
    data=st.data(),
    compression=st.sampled_from(sorted(SUFFIXES)),
    train_on_inputs=st.booleans(),
)
def test_check_mode_accepts_or_names_each_bad_record(
    model: Path, fmt: str, data: st.DataObject, compression: str, train_on_inputs: bool
) -> None:
    train = data.draw(data_files(fmt), label="train")
    eval_content = data.draw(st.none() | data_files(fmt), label="eval")
    files = [DataFile("train", compression, train)]
    if eval_content is not None:
        files.append(DataFile("eval", "", eval_content))
    with tempfile.TemporaryDirectory() as folder:
        _assert_verdict(Path(folder), model, files, fmt, train_on_inputs)


@FUZZ
@given(fmt=st.sampled_from(FORMATS), data=st.data(), unit_bytes=st.sampled_from([16, 64, 256]))
def test_large_files_cut_into_units_are_located_by_their_own_lines(
    model: Path, monkeypatch: pytest.MonkeyPatch, fmt: str, data: st.DataObject, unit_bytes: int
) -> None:
    """A JSONL file larger than UNIT_BYTES is read as several units (the pod tokenizes one on
    each core): the lines it reports are still the file's own, counted from its first line."""
    content = b"\n".join(data.draw(st.lists(data_files(fmt), min_size=1, max_size=4), label="parts"))
    # a file of only blank lines is refused ("no records") however many units it is read in
    monkeypatch.setattr("finetune_trainer.sources.UNIT_BYTES", unit_bytes)
    with tempfile.TemporaryDirectory() as folder:
        _assert_verdict(Path(folder), model, [DataFile("train", "", content)], fmt, False)
