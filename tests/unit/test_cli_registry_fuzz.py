"""Fuzzing `kubectl finetune add dataset` as a sequence of registrations into one `file://`
registry (the real command line through `main.run`, no cluster): names drawn from a small set,
so attempts collide; contents valid or random (`jsonl_files`); with and without --replace,
--eval-paths and --format; sources taken from a fresh folder or from another registered
dataset's own copy.

After every attempt: a refused attempt (exit code 1) leaves the registry byte for byte as it
was — no partial folder, no file, no directory — and says why; an accepted one (exit code 0)
changes nothing but its own folder, which then holds exactly the dataset.json and the copies it
lists, each byte-identical to its source; every dataset registered earlier keeps its files and
metadata unless the attempt named it with --replace; `list datasets` shows exactly the datasets
registered. (CLI commands that write into run folders: none — `tensorboard` only reads them into
a local temporary folder — so checkpoints have no counterpart here.)
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, note, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from rich.console import Console

from finetune_cli import main
from tests.unit.test_cli_fuzz import jsonl_files

# Valid names (NAME_PATTERN) that share prefixes, so a prefix-deleting replace would show.
NAMES = ["news", "news-2", "n", "news.v2"]
SOURCE_NAMES = ["train.jsonl", "data.jsonl", "part.jsonl.gz"]
TEXTS = st.text(max_size=30).filter(str.strip)
VALID = st.lists(st.fixed_dictionaries({"text": TEXTS}), min_size=1, max_size=5).map(
    lambda records: "".join(json.dumps(r) + "\n" for r in records).encode()
)
OUTCOMES: Counter[str] = Counter()  # of every attempt in this session: the mix the test covered
Snapshot = dict[str, bytes | None]  # path in the registry -> bytes (None: a directory)


def snapshot(root: Path) -> Snapshot:
    """Every file and directory under `root`, by its path relative to it."""
    out: Snapshot = {}
    for path in sorted(root.rglob("*")):
        out[path.relative_to(root).as_posix()] = None if path.is_dir() else path.read_bytes()
    return out


def _under(shot: Snapshot, name: str) -> Snapshot:
    return {k: v for k, v in shot.items() if k == name or k.startswith(name + "/")}


def _outside(shot: Snapshot, name: str) -> Snapshot:
    return {k: v for k, v in shot.items() if not (k == name or k.startswith(name + "/"))}


class Registrations(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.root = Path(tempfile.mkdtemp(prefix="registry-fuzz-"))
        self.registry = self.root / "registry"
        self.registry.mkdir()
        self.attempt = 0
        self.model: Snapshot = {}  # what the registry must hold
        self.sources: dict[str, bytes] = {}  # source URI -> content, of every attempt so far

    def teardown(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    # ---- running the command --------------------------------------------------------------------
    def _run(self, argv: list[str]) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stderr(err):
            code = main.run(
                [*argv, "--datasets-uri", f"file://{self.registry}/"],
                console=Console(file=out, width=300, soft_wrap=True),
            )
        return code, out.getvalue(), err.getvalue()

    def _write_sources(self, split: str, contents: list[tuple[str, bytes]]) -> list[str]:
        """The files in a fresh folder per file (so two may share a name); their paths."""
        paths = []
        for i, (name, content) in enumerate(contents):
            folder = self.root / f"attempt-{self.attempt}" / f"{split}-{i}"
            folder.mkdir(parents=True)
            path = folder / name
            path.write_bytes(gzip.compress(content) if name.endswith(".gz") else content)
            self.sources[f"file://{path}"] = path.read_bytes()
            paths.append(str(path))
        return paths

    def _attempt(
        self,
        name: str,
        paths: list[str],
        eval_paths: list[str],
        flags: list[str],
        sources: list[str] | None = None,
    ) -> None:
        """Run `add dataset`; `sources`: the URIs of the files the paths name (default: the paths)."""
        before = snapshot(self.registry)
        assert before == self.model
        existed = f"{name}/dataset.json" in before
        argv = ["add", "dataset", "--name", name, "--paths", *paths, *flags]
        if eval_paths:
            argv += ["--eval-paths", *eval_paths]
        code, out, err = self._run(argv)
        note(f"{argv[2:]} -> {code}\n{out}{err}")
        after = snapshot(self.registry)
        assert code in (0, 1), (code, err)
        assert "Traceback" not in err
        outcome = ("refused" if code else "replaced" if existed else "registered") + (
            " a copy" if sources is not None else ""
        )
        event(outcome)
        OUTCOMES[outcome] += 1
        if code == 1:
            assert err.startswith("error: ") and err.strip() != "error:", err
            if existed and "--replace" not in flags:
                assert f"dataset {name} already exists" in err, err
            assert after == before, "a refused attempt changed the registry"
        else:
            assert not existed or "--replace" in flags, (
                "registered over an existing dataset without --replace"
            )
            assert _outside(after, name) == _outside(before, name), "another dataset changed"
            expected = sources or [f"file://{p}" for p in [*paths, *eval_paths]]
            self._assert_registered(name, _under(after, name), expected)
        self.model = after

    def _assert_registered(self, name: str, files: Snapshot, sources: list[str]) -> None:
        """The dataset's folder holds its dataset.json and exactly the copies it lists, each one
        byte-identical to the file it was copied from."""
        raw = files.get(f"{name}/dataset.json")
        assert raw is not None, f"no {name}/dataset.json"
        metadata = json.loads(raw)
        assert metadata["name"] == name
        listed = metadata["files"]
        assert sorted(f["source"] for f in listed) == sorted(sources)
        for f in listed:
            assert f["key"].startswith(f"{name}/{f['split']}/"), f
            assert files.get(f["key"]) == self.sources[f["source"]], f"{f['key']} is not {f['source']}"
        kept = {k for k, v in files.items() if v is not None}
        assert kept == {f"{name}/dataset.json", *(f["key"] for f in listed)}, "stray files in the dataset"

    # ---- what a user does -----------------------------------------------------------------------
    @initialize()
    def environment(self) -> None:
        # No cluster defaults, an empty Hugging Face cache: set by the test function below.
        assert os.environ["HF_HUB_CACHE"] and os.environ["AWS_ENDPOINT_URL"]

    @rule(
        name=st.sampled_from(NAMES),
        train=st.lists(
            st.tuples(st.sampled_from(SOURCE_NAMES), VALID | jsonl_files()), min_size=1, max_size=2
        ),
        eval_content=st.none() | VALID | jsonl_files(),
        replace=st.booleans(),
        data_format=st.sampled_from([None, None, "text", "chat"]),
    )
    def add(
        self,
        name: str,
        train: list[tuple[str, bytes]],
        eval_content: bytes | None,
        replace: bool,
        data_format: str | None,
    ) -> None:
        self.attempt += 1
        paths = self._write_sources("train", train)
        eval_paths = (
            self._write_sources("eval", [("eval.jsonl", eval_content)]) if eval_content is not None else []
        )
        flags = (["--replace"] if replace else []) + (["--format", data_format] if data_format else [])
        self._attempt(name, paths, eval_paths, flags)

    @rule(name=st.sampled_from(NAMES), valid=VALID, replace=st.booleans())
    def add_valid(self, name: str, valid: bytes, replace: bool) -> None:
        """Valid text records under a free name (or with --replace) are registered."""
        self.attempt += 1
        free = f"{name}/dataset.json" not in self.model
        paths = self._write_sources("train", [("train.jsonl", valid)])
        self._attempt(name, paths, [], ["--replace"] if replace else [])
        if free or replace:
            assert f"{name}/dataset.json" in self.model, f"valid records were not registered as {name}"

    def registered(self) -> list[str]:
        return sorted(k.split("/")[0] for k in self.model if k.endswith("/dataset.json"))

    @precondition(lambda self: self.registered())
    @rule(data=st.data(), content=VALID | jsonl_files())
    def replace(self, data: st.DataObject, content: bytes) -> None:
        """--replace of a registered dataset: replaced by the new files if they are valid (the
        old files gone), else refused with the old dataset intact."""
        name = data.draw(st.sampled_from(self.registered()), label="name")
        self.attempt += 1
        paths = self._write_sources("train", [("data.jsonl", content)])
        self._attempt(name, paths, [], ["--replace"])

    @precondition(lambda self: self.registered())
    @rule(data=st.data(), name=st.sampled_from(NAMES), replace=st.booleans())
    def copy_a_registered_dataset(self, data: st.DataObject, name: str, replace: bool) -> None:
        """`--paths <registry>/<source>/train/`: a registered dataset's own files as the source
        of another registration; the source dataset stays as it is."""
        source = data.draw(st.sampled_from(self.registered()), label="source")
        # with --replace and name == source the files are the dataset's own: refused, kept
        self.attempt += 1
        copied = sorted(
            k for k, v in self.model.items() if k.startswith(f"{source}/train/") and v is not None
        )
        for key in copied:
            self.sources[f"file://{self.registry}/{key}"] = self.model[key] or b""
        self._attempt(
            name,
            [str(self.registry / source / "train")],
            [],
            ["--replace"] if replace else [],
            sources=[f"file://{self.registry}/{key}" for key in copied],
        )

    @invariant()
    def listed(self) -> None:
        code, out, err = self._run(["list", "datasets", "-o", "json"])
        assert code == 0, err
        names = sorted(d["name"] for d in json.loads(out)) if out.strip() else []
        assert names == self.registered(), out
        # nothing but registered datasets' folders at the top of the registry
        assert {k.split("/")[0] for k in self.model} == set(names), sorted(self.model)


def test_registrations_never_lose_or_overwrite_a_dataset(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # the cluster's defaults are not read
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))  # an empty hub cache, never the user's
    monkeypatch.delenv("FINETUNE_DATASETS_URI", raising=False)
    OUTCOMES.clear()
    run_state_machine_as_test(
        Registrations,
        settings=settings(
            max_examples=40,
            stateful_step_count=8,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        ),
    )
    covered = {"registered", "replaced", "refused"} <= set(OUTCOMES) and any(
        outcome.endswith(" a copy") for outcome in OUTCOMES
    )
    assert covered, f"the attempts did not cover every outcome: {dict(OUTCOMES)}"


def _add(argv: list[str], registry: Path) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main.run(
            ["add", "dataset", *argv, "--datasets-uri", f"file://{registry}/"],
            console=Console(file=io.StringIO(), width=300),
        )
    return code, err.getvalue()


def test_replacing_a_dataset_from_its_own_files_is_refused_and_keeps_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """What the state machine above found: --replace with --paths inside the dataset itself
    deleted the dataset before copying from it (a FileNotFoundError, the dataset gone)."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    registry, data = tmp_path / "registry", tmp_path / "t.jsonl"
    data.write_text('{"text": "one"}\n{"text": "two"}\n')
    assert _add(["--name", "news", "--paths", str(data)], registry)[0] == 0
    before = snapshot(registry)
    code, err = _add(["--name", "news", "--replace", "--paths", str(registry / "news" / "train")], registry)
    assert code == 1 and "name files of dataset news itself" in err and "Traceback" not in err, err
    assert snapshot(registry) == before, "the dataset is kept as it was"


@pytest.mark.parametrize("name", ["Bad", "-news", "news-", "a b", "n" * 64, "news/2", ""])
def test_an_invalid_dataset_name_is_a_usage_error_naming_the_option(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, name: str
) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    data = tmp_path / "t.jsonl"
    data.write_text('{"text": "one"}\n')
    code, err = _add([f"--name={name}", "--paths", str(data)], tmp_path / "registry")
    assert (
        code == 2 and err.startswith(f"error: --name {name!r}: a dataset name is") and "Traceback" not in err
    )
    assert not (tmp_path / "registry").exists() or not any((tmp_path / "registry").iterdir())
