"""Fuzzing what `kubectl finetune` reads from users (pure, no cluster): dataset files for
`add dataset` (the trainer's own data preflight: random JSONL, truncated lines, wrong types,
huge fields, invalid UTF-8), experiment manifests, checkpoint IDs and command lines. Each ends
in a result or in an error naming the file:line or what to fix — never another exception."""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rich.console import Console

from finetune_cli import datasets, experiments, main, storage
from finetune_cli.commands.add import check_dataset
from finetune_cli.commands.experiment import DEFAULT_MODEL

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=12), inner, max_size=3),
    max_leaves=10,
)
RECORD = st.one_of(
    st.fixed_dictionaries({"text": st.one_of(st.text(max_size=50), JSON)}),
    st.fixed_dictionaries({"prompt": JSON, "completion": JSON}),
    st.fixed_dictionaries({"messages": JSON}),
    st.dictionaries(st.text(max_size=8), JSON, max_size=3),
    JSON,
)


@st.composite
def jsonl_files(draw: st.DrawFn) -> bytes:
    lines = [json.dumps(record) for record in draw(st.lists(RECORD, min_size=0, max_size=6))]
    if lines and draw(st.booleans()):
        cut = draw(st.integers(0, len(lines[-1])))
        lines[-1] = lines[-1][:cut]  # truncated, as by an interrupted upload
    if draw(st.integers(0, 5)) == 0:
        lines.append(json.dumps({"text": "x" * draw(st.sampled_from([10_000, 200_000]))}))  # huge field
    content = "\n".join(lines).encode()
    if draw(st.integers(0, 5)) == 0:
        at = draw(st.integers(0, len(content)))
        content = content[:at] + b"\xff\xfe" + content[at:]  # invalid UTF-8
    return content


LOCATED = re.compile(r"^(file://\S*/)?(train\.jsonl|eval\.jsonl|notes\.txt)(:\d+| ?)?: ?")


def _check(files: list[tuple[str, Any, bytes]], format: Any) -> datasets.DatasetSummary:
    """`add dataset`'s own check (the trainer's streaming preflight) of the contents as files."""
    with tempfile.TemporaryDirectory() as folder:
        sources = []
        for name, split, content in files:
            (Path(folder) / name).write_bytes(content)
            sources += storage.list_sources([f"{folder}/{name}"], split, where=storage.Location())
        return check_dataset(
            "reports", sources, format=format, tokenizer=DEFAULT_MODEL, where=storage.Location()
        )


@FUZZ
@given(
    train=jsonl_files(),
    eval_content=st.none() | jsonl_files(),
    format=st.sampled_from([None, "text", "prompt-completion", "chat"]),
)
def test_dataset_files_are_registered_or_refused_by_file_and_line(
    train: bytes, eval_content: bytes | None, format: Any
) -> None:
    files: list[tuple[str, Any, bytes]] = [("train.jsonl", "train", train)]
    if eval_content is not None:
        files.append(("eval.jsonl", "eval", eval_content))
    try:
        summary = _check(files, format)
    except datasets.DatasetError as exc:
        located = [str(exc), *exc.details]
        assert (
            any(LOCATED.match(line) for line in located) or "formats" in str(exc) or "record(s)" in str(exc)
        ), located
        for line in exc.details:
            assert LOCATED.match(line), line
        return
    assert summary.train_records >= 1, "a registered dataset has training records"


@FUZZ
@given(st.binary(max_size=200))
def test_plain_text_files(content: bytes) -> None:
    try:
        _check([("notes.txt", "train", content)], None)
    except datasets.DatasetError as exc:
        assert all(LOCATED.match(line) for line in exc.details) or str(exc), exc


@FUZZ
@given(st.one_of(st.text(max_size=300), JSON.map(lambda v: json.dumps(v))))
def test_experiment_manifests(text: str) -> None:
    try:
        manifest = experiments.parse_manifest(text, namespace="studio")
    except experiments.ManifestError as exc:
        assert str(exc)
        return
    assert manifest["spec"]["suspend"] is True and manifest["metadata"]["namespace"] == "studio"


@FUZZ
@given(st.text(max_size=40))
def test_checkpoint_ids(value: str) -> None:
    try:
        job, step = experiments.parse_checkpoint_id(value)
    except experiments.ManifestError as exc:
        assert "<job>:<step>" in str(exc)
        return
    assert value == f"{job}:{step}" or value.endswith(str(step))


WORDS = [
    "list",
    "models",
    "hyperparameters",
    "datasets",
    "--output",
    "json",
    "-o",
    "yaml",
    "--help",
    "x",
    "",
    "-",
]


@settings(max_examples=100, deadline=None)
@given(st.lists(st.sampled_from(WORDS) | st.text(max_size=8), max_size=4))
def test_command_lines_that_need_no_cluster(argv: list[str]) -> None:
    """Parse errors are exit code 2 with a hint, never a traceback."""
    if len(argv) >= 2 and argv[:2] == ["list", "datasets"]:
        argv = ["list", "models"]  # datasets needs the registry
    console = Console(record=True, width=120)
    try:
        code = main.run(argv, console=console)
    except SystemExit as exc:  # argparse's --help
        code = int(exc.code or 0)
    assert code in (0, 1, 2)
    assert "Traceback" not in console.export_text()
