"""Fuzzing what `kubectl finetune` reads from users (pure, no cluster): dataset files for
`add dataset` (the trainer's own data preflight: random JSONL, truncated lines, wrong types,
huge fields, invalid UTF-8), experiment manifests (any text, and the experiment template with
one field broken or one line of YAML broken), checkpoint IDs and command lines. Each ends in a
result or in an error naming the file:line, the field or what to fix — never another
exception."""

from __future__ import annotations

import copy
import json
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from rich.console import Console

from finetune_cli import datasets, experiments, main, storage
from finetune_cli.commands.add import check_dataset
from finetune_cli.commands.experiment import DEFAULT_MODEL, catalog_problems
from finetune_operator.api import API_VERSION, KIND, SpecError, parse_spec

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
    if len(lines) > 0 and draw(st.booleans()):
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


ENVELOPE_MESSAGES = (
    "expected one FineTuneJob (a YAML mapping",
    f"kind must be {KIND} and apiVersion {API_VERSION}",
    "metadata.name is required",
    "spec is required",
)


@FUZZ
@given(st.one_of(st.text(max_size=300), JSON.map(lambda v: json.dumps(v))))
def test_experiment_manifests(text: str) -> None:
    """Any text: a manifest, or an error that says where the YAML breaks (line or position)
    or which part of a FineTuneJob is missing — never another exception."""
    try:
        manifest = experiments.parse_manifest(text, namespace="studio")
    except experiments.ManifestError as exc:
        message = str(exc)
        if message.startswith("not valid YAML: "):
            assert re.search(r"(line \d+, column \d+|position \d+)", message), message
        else:
            assert message.startswith(ENVELOPE_MESSAGES), message
        return
    assert manifest["spec"]["suspend"] is True and manifest["metadata"]["namespace"] == "studio"


# ---- near-valid manifests: the template with one field broken --------------------------------------
TEMPLATE = experiments.template(name="exp-fuzz", model=DEFAULT_MODEL)
VALID_MANIFEST: dict[str, Any] = yaml.safe_load(TEMPLATE)
FieldPath = tuple[str | int, ...]


def _paths(node: Any, prefix: FieldPath = ()) -> list[FieldPath]:
    """Every key and list item under `node`, as paths from it."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else []
    out: list[FieldPath] = []
    for key, value in items:
        out += [(*prefix, key), *_paths(value, (*prefix, key))]
    return out


def field_name(path: FieldPath) -> str:
    """A path as the API server and `parse_spec` name it: spec.dataset.train[0]."""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text


def _kind(value: Any) -> str:
    if value is None or isinstance(value, bool):
        return repr(value)  # None, True, False: each its own
    return {int: "number", float: "number", str: "string", list: "array", dict: "object"}[type(value)]


ENVELOPE: dict[FieldPath, str] = {  # what parse_manifest checks, and the field its message names
    ("kind",): "kind",
    ("apiVersion",): "apiVersion",
    ("metadata",): "metadata.name",
    ("metadata", "name"): "metadata.name",
    ("spec",): "spec",
}
SPEC_PATHS = [("spec", *p) for p in _paths(VALID_MANIFEST["spec"]) if p != ("suspend",)]


def _get(node: Any, path: FieldPath) -> Any:
    for part in path:
        node = node[part]
    return node


@dataclass(frozen=True)
class Mutation:
    manifest: dict[str, Any]
    path: FieldPath  # the field broken
    how: str  # "type", "range", "unknown" or "missing"
    old: Any
    new: Any

    @property
    def field(self) -> str:
        return ENVELOPE.get(self.path) or field_name(self.path)


@st.composite
def near_valid_manifests(draw: st.DrawFn) -> Mutation:
    manifest = copy.deepcopy(VALID_MANIFEST)
    objects = [("spec",), *(p for p in SPEC_PATHS if isinstance(_get(manifest, p), dict))]
    how = draw(st.sampled_from(["type", "type", "range", "unknown", "missing"]))
    if how == "unknown":
        path = draw(st.sampled_from(objects))
        key = draw(
            st.sampled_from(["bogus", "learningrate", "Model", "max_steps"]) | st.text(min_size=1, max_size=8)
        )
        assume(key not in _get(manifest, path))
        _get(manifest, path)[key] = draw(JSON)
        return Mutation(manifest, (*path, key), how, None, None)
    if how == "range":
        numbers = [p for p in SPEC_PATHS if _kind(_get(manifest, p)) == "number"]
        path = draw(st.sampled_from(numbers))
        new: Any = draw(
            st.integers(max_value=0) | st.floats(max_value=0, allow_nan=False, allow_infinity=False)
        )
        if draw(st.booleans()):
            new = draw(st.integers(min_value=10**12))
    else:
        path = draw(st.sampled_from([*ENVELOPE, *SPEC_PATHS]))
        if how == "missing" and isinstance(path[-1], str):
            old = _get(manifest, path)
            del _get(manifest, path[:-1])[path[-1]]
            return Mutation(manifest, path, how, old, None)
        how = "type"
        old = _get(manifest, path)
        new = draw(JSON.filter(lambda v: _kind(v) != _kind(old)) | st.sampled_from(["FineTuneJob", "v1", ""]))
        assume(new != old)
    old = _get(manifest, path)
    _get(manifest, path[:-1])[path[-1]] = new
    return Mutation(manifest, path, how, old, new)


def _names(error: str, path: FieldPath) -> bool:
    """Whether a `field: message` error is about the field at `path`: the field itself, a part
    of it, or (a rule between siblings, e.g. one of name or uri) the object holding it."""
    field, _, message = error.partition(": ")
    name = field_name(path)
    return bool(message.strip()) and (
        field == name or field.startswith((name + ".", name + "[")) or field == field_name(path[:-1])
    )


@FUZZ
@given(near_valid_manifests())
def test_near_valid_manifests_are_refused_by_the_field_they_break(mutation: Mutation) -> None:
    """The experiment template with one field broken (a wrong type, a value out of range, an
    unknown key, a missing field), as YAML. What `parse_manifest` checks (kind, apiVersion,
    metadata.name, spec) it refuses by name; the spec it passes on exactly as written, and what
    a spec field breaks is said by field: by `parse_spec` (what the API server's dry run answers,
    see the CRD-vs-Python agreement test) and the CLI's own catalog check. (Not as JSON: known
    product bug, see the report — pyyaml's YAML 1.1 reads JSON's `5e-05` as a string.)"""
    text = yaml.safe_dump(mutation.manifest)
    envelope = mutation.path in ENVELOPE
    try:
        manifest = experiments.parse_manifest(text, namespace="studio")
    except experiments.ManifestError as exc:
        event("envelope: refused")
        assert envelope, f"{mutation.field} is the API server's to check, but: {exc}"
        assert mutation.field in str(exc), f"{exc} does not name {mutation.field}"
        return
    if envelope:
        # only a metadata.name of another type passes (the API server names it)
        assert mutation.path == ("metadata", "name") and mutation.new, mutation
        return
    assert manifest["spec"] == {**mutation.manifest["spec"], "suspend": True}, "the spec is sent as written"
    spec = manifest["spec"]
    try:
        parse_spec(spec)
        errors: list[str] = []
    except SpecError as exc:
        errors = list(exc.errors)
    errors += catalog_problems(manifest)
    event(f"spec, {mutation.how}: {'refused' if errors else 'accepted'}")
    must_refuse = (
        mutation.how in ("unknown", "range")
        or _kind(mutation.new) in ("array", "object")
        or (_kind(mutation.old) in ("array", "object") and mutation.new is not None)
    ) and mutation.how != "missing"
    if mutation.how == "range" and mutation.new > 0:
        must_refuse = False  # an upper bound is not every field's
    assert errors or not must_refuse, f"{mutation.field} = {mutation.new!r} accepted"
    for error in errors:
        assert _names(error, mutation.path), f"{error!r} does not name {mutation.field}"


YAML_LINES = [
    i for i, line in enumerate(TEMPLATE.splitlines()) if line.strip() and not line.lstrip().startswith("#")
]


@FUZZ
@given(line=st.sampled_from(YAML_LINES), how=st.sampled_from(["tab", "flow", "quote", "brace", "mapping"]))
def test_a_yaml_syntax_error_names_its_line(line: int, how: str) -> None:
    """One line of the template broken (a tab indent, an unclosed [ { or ", a second `: `):
    the error says `line N` of the file the user edited."""
    lines = TEMPLATE.splitlines()
    key, sep, rest = lines[line].partition(": ")
    value, mark, comment = rest.partition("  #")
    if how == "tab" or not value.strip():
        broken = "\t" + lines[line]
    else:
        value = (
            {"flow": "[", "quote": '"', "brace": "{"}.get(how, "")
            + value.strip()
            + (": x" if how == "mapping" else "")
        )
        broken = key + sep + value + mark + comment
    text = "\n".join([*lines[:line], broken, *lines[line + 1 :]]) + "\n"
    try:
        experiments.parse_manifest(text, namespace="studio")
    except experiments.ManifestError as exc:
        assert str(exc).startswith("not valid YAML: ") and f"line {line + 1}," in str(exc), (broken, str(exc))
        return
    raise AssertionError(f"line {line + 1} broken ({broken!r}) but the manifest was accepted")


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


@pytest.mark.parametrize(
    ("written", "value"),
    [
        ("1e-4", 1e-4),
        ("5e-05", 5e-05),
        ("2.0e-5", 2.0e-5),
        ("-3E+2", -300.0),
        ("0.001", 0.001),
        ("'1e-4'", "1e-4"),
    ],
)
def test_numbers_in_exponent_form_are_numbers_as_kubectl_reads_them(written: str, value: Any) -> None:
    """PyYAML's YAML 1.1 reads 1e-4 (no dot) as a string, which the API server refuses for a
    number field; kubectl (YAML 1.2) reads a number. Quoted, it stays a string."""
    text = TEMPLATE.replace("learningRate: ", f"learningRate: {written}  # was ", 1)
    assert f"learningRate: {written}" in text
    manifest = experiments.parse_manifest(text, namespace="studio")
    assert manifest["spec"]["hyperparameters"]["learningRate"] == value
    as_json = json.dumps(
        {**manifest, "spec": {**manifest["spec"], "hyperparameters": {"learningRate": 5e-05}}}
    )
    assert "5e-05" in as_json
    assert (
        experiments.parse_manifest(as_json, namespace="studio")["spec"]["hyperparameters"]["learningRate"]
        == 5e-05
    )


def test_a_syntax_error_below_the_error_block_names_the_line_the_editor_shows() -> None:
    """The editor reopens with the errors as comments on top: the line of a syntax error counts
    them too, so it is the line the user sees."""
    text = experiments.with_errors(TEMPLATE, ["spec.model.name: unknown catalog model", "second line"])
    lines = text.splitlines()
    broken = next(i for i, line in enumerate(lines) if line.startswith("spec:"))
    lines[broken + 1] = "\t" + lines[broken + 1]  # a tab in the indentation: a syntax error
    with pytest.raises(experiments.ManifestError, match=rf"line {broken + 2},"):
        experiments.parse_manifest("\n".join(lines), namespace="studio")
