"""The cluster's storage defaults and where each setting comes from; S3 keys; the TensorBoard copy."""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import pytest
from rich.console import Console

from finetune_cli import defaults, storage
from finetune_cli.app import App
from finetune_cli.errors import CliError
from finetune_trainer.storage import open_store

PUBLISHED = {
    "runsUri": "s3://runs/",
    "datasetsUri": "s3://datasets/",
    "endpoint": "http://127.0.0.1:9000",
    "region": "",
    "credentialsSecret": "finetune-s3",
    "operatorVersion": "0.1.0",
    "somethingNewer": "ignored",
}


def test_configmap_values_with_empty_ones_unset() -> None:
    found = defaults.ClusterDefaults.from_configmap(PUBLISHED, source="ConfigMap ops/finetune-defaults")
    assert (found.found, found.runs_uri, found.datasets_uri, found.endpoint) == (
        True,
        "s3://runs/",
        "s3://datasets/",
        "http://127.0.0.1:9000",
    )
    assert (found.region, found.credentials_secret, found.operator_version) == (None, "finetune-s3", "0.1.0")
    missing = defaults.ClusterDefaults.from_configmap(None, source="no readable ConfigMap")
    assert (missing.found, missing.datasets_uri) == (False, None)


@pytest.mark.parametrize(
    ("flag", "env", "expected"),
    [
        pytest.param("ops", {"FINETUNE_OPERATOR_NAMESPACE": "env-ops"}, "ops", id="flag"),
        pytest.param(None, {"FINETUNE_OPERATOR_NAMESPACE": "env-ops"}, "env-ops", id="environment"),
        pytest.param(None, {}, "finetune-system", id="documented-default"),
    ],
)
def test_operator_namespace(flag: str | None, env: dict[str, str], expected: str) -> None:
    assert defaults.operator_namespace(flag, env) == expected


def _app(tmp_path: Path, **args: object) -> App:
    namespace = argparse.Namespace(output="table", namespace=None, context=None, kubeconfig=None, **args)
    app = App(namespace, Console(file=io.StringIO()))
    app._defaults = defaults.ClusterDefaults.from_configmap(
        {**PUBLISHED, "datasetsUri": f"file://{tmp_path}/from-configmap/"}, source="ConfigMap test"
    )
    return app


def test_registry_flag_then_environment_then_configmap(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("FINETUNE_DATASETS_URI", raising=False)
    assert _app(tmp_path, datasets_uri=None).registry().uri == f"file://{tmp_path}/from-configmap/"
    monkeypatch.setenv("FINETUNE_DATASETS_URI", f"file://{tmp_path}/from-env")
    assert _app(tmp_path, datasets_uri=None).registry().uri == f"file://{tmp_path}/from-env/"
    assert (
        _app(tmp_path, datasets_uri=f"file://{tmp_path}/flag/").registry().uri == f"file://{tmp_path}/flag/"
    )


def test_a_dataset_from_the_operators_own_registry_needs_no_datasets_uri_in_the_job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("FINETUNE_DATASETS_URI", raising=False)
    (tmp_path / "from-configmap" / "d").mkdir(parents=True)
    (tmp_path / "from-configmap" / "d" / "dataset.json").write_text('{"name": "d", "format": "chat"}')
    assert _app(tmp_path, datasets_uri=None).registered("d") == (None, {"name": "d", "format": "chat"})
    given = _app(tmp_path, datasets_uri=f"file://{tmp_path}/from-configmap/").registered("d")
    assert given is not None and given[0] == f"file://{tmp_path}/from-configmap/"
    with pytest.raises(CliError, match="dataset e is not registered in file://"):
        _app(tmp_path, datasets_uri=None).registered("e")


def test_endpoint_from_the_environment_before_the_configmap(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.setenv("AWS_REGION", "eu-north-1")
    assert _app(tmp_path).location() == storage.Location("http://127.0.0.1:9000", "eu-north-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.2:9000")
    assert _app(tmp_path).location().endpoint == "http://127.0.0.2:9000"


def test_a_bad_registry_uri_names_its_flag() -> None:
    with pytest.raises(CliError, match="--datasets-uri / FINETUNE_DATASETS_URI"):
        storage.datasets_uri("http://registry/")


def test_own_keys_from_the_environment_or_a_clear_error(tmp_path: Path) -> None:
    env = {"AWS_ACCESS_KEY_ID": "id", "AWS_SECRET_ACCESS_KEY": "secret"}
    assert storage.own_keys(profile=None, env=env) == env
    nothing = {"AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none")}
    assert not storage.has_own_keys(nothing)
    with pytest.raises(CliError, match="no S3 keys of your own found") as caught:
        storage.own_keys(profile=None, env=nothing)
    assert "AWS_ACCESS_KEY_ID" in str(caught.value.hint)


def test_keys_of_a_secret_must_be_complete() -> None:
    env: dict[str, str] = {}
    storage.use_keys({"AWS_ACCESS_KEY_ID": "id", "AWS_SECRET_ACCESS_KEY": "secret"}, env)
    assert env == {"AWS_ACCESS_KEY_ID": "id", "AWS_SECRET_ACCESS_KEY": "secret"}
    with pytest.raises(CliError, match="the credentials Secret has no AWS_SECRET_ACCESS_KEY"):
        storage.use_keys({"AWS_ACCESS_KEY_ID": "id"}, {})


def test_sync_folder_appends_what_an_event_file_grew_by(tmp_path: Path) -> None:
    remote = tmp_path / "run" / "tensorboard"
    (remote / "sub").mkdir(parents=True)
    (remote / "events.out.1").write_bytes(b"first")
    (remote / "sub" / "events.out.2").write_bytes(b"x")
    local = tmp_path / "copy"
    store = open_store(f"file://{remote}/")
    assert storage.sync_folder(store, local) == 2
    copy = local / "events.out.1"
    inode = copy.stat().st_ino
    (remote / "events.out.1").write_bytes(b"first+second")
    assert storage.sync_folder(store, local) == 1, "only the file that grew"
    assert copy.read_bytes() == b"first+second"
    assert copy.stat().st_ino == inode, "appended in place: TensorBoard's open reader sees the new records"
    assert storage.sync_folder(store, local) == 0
