"""The model registry: a checkpoint registered as two served models (encoder NAME, generator NAME-generator) with a
description, the data contract as tags, a signature and an input example; ``@latest`` follows the newest version,
``set_alias`` moves ``@champion`` (on both models); ``resolve_checkpoint`` turns registry URIs back into the
checkpoint file, checked against the version's SHA-256, and refuses in one line what it cannot resolve, without
creating a store. Registering a checkpoint again reuses its versions."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hagan_clinic.errors import HaganError
from hagan_clinic.io.torch_files import file_sha256
from hagan_clinic.models.hagan import HAGAN
from hagan_clinic.tracking import Tracker
from hagan_clinic.tracking.registry import RegistryError, Resolved, find_version, resolve_checkpoint, set_alias

from conftest import tiny_config


@pytest.fixture(scope="module")
def shared_store(tmp_path_factory):
    """One store for this file's tests (a new sqlite store takes seconds to create); each test registers models
    of its own names in it."""
    return f"sqlite:///{tmp_path_factory.mktemp('registry') / 'mlflow.db'}"


@pytest.fixture(autouse=True)
def _in_shared_store(shared_store, monkeypatch):
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", shared_store)
    mlflow.set_tracking_uri(shared_store)
    yield
    mlflow.set_tracking_uri(None)  # back to the environment's store (conftest's, restored by monkeypatch)


@pytest.fixture
def name(request) -> str:
    """A model name of this test's own."""
    return "m-" + "".join(c if c.isalnum() else "-" for c in request.node.name.removeprefix("test_"))[:60]


def store() -> str:
    return os.environ["MLFLOW_TRACKING_URI"]


def register(checkpoint: Path, name: str) -> str:
    """``checkpoint`` registered as training registers it: in an open run, through the tracker."""
    tracker = Tracker(store(), "registry")
    with tracker.run("train"):
        version = tracker.register_model(name, checkpoint, tiny_config().to_dict(), {"origin": "test"})
    assert version is not None
    return version


def client():
    from mlflow import MlflowClient

    return MlflowClient(store())


def assert_one_line(err: BaseException, *needles: str) -> None:
    text = str(err)
    assert isinstance(err, HaganError) and "\n" not in text and len(text) <= 300, text
    for needle in needles:
        assert needle in text, text


@pytest.fixture(scope="module")
def other_checkpoint(tmp_path_factory):
    """A second tiny model with other weights (another seed)."""
    path = tmp_path_factory.mktemp("other") / "other.pt"
    HAGAN.from_config(tiny_config("seed=1")).save(path)
    return path


# ---------------------------------------------------------------- what a version carries
def test_a_version_has_a_description_the_data_contract_a_signature_and_an_input_example(checkpoint, name):
    from mlflow.models import Model

    assert register(checkpoint, name) == "1"
    version = client().get_model_version(name, "1")
    contract = tiny_config().data_contract()
    assert {k: version.tags[f"data.{k}"] for k in contract} == {k: str(v) for k, v in contract.items()}
    assert version.tags["data.spacing_mm"] == "[12.0, 12.0, 12.0]" and version.tags["data.modality"] == "CT"
    assert version.tags["sha256"] == file_sha256(checkpoint) and version.tags["role"] == "encoder"
    assert version.tags["origin"] == "test"  # the caller's tags too
    text = version.description
    for needle in ("encoder", "32 latent features", "'path'", "DICOM series folder", "NIfTI", f"models:/{name}@latest"):
        assert needle in text, needle
    assert "12.0, 12.0, 12.0" in text and "[-1024.0, 600.0]" in text  # the contract in words
    assert client().get_registered_model(name).description  # the model itself says what it is

    model = Model.load(f"models:/{name}/1")
    assert model.signature.inputs.input_names() == ["path", "volume"]
    assert model.signature.inputs.to_dict()[0] == {"type": "string", "name": "path", "required": False}
    assert model.signature.outputs.input_names() == [f"z{i}" for i in range(32)]
    assert {c["type"] for c in model.signature.outputs.to_dict()} == {"float"}
    assert model.saved_input_example_info is not None
    artifacts = model.flavors["python_function"]["artifacts"]
    assert artifacts["checkpoint"]["path"].endswith("tiny.pt")
    # the SHA-256 the served model checks its checkpoint against when it loads
    assert artifacts["checkpoint_sha256"]["path"].endswith("checkpoint.sha256")

    generator = client().get_model_version(f"{name}-generator", "1")
    assert generator.tags["role"] == "generator" and "generator" in generator.description
    assert generator.tags["sibling"] == f"{name}/1" and version.tags["sibling"] == f"{name}-generator/1"
    outputs = Model.load(f"models:/{name}-generator/1").signature.outputs.to_dict()
    assert outputs == [{"type": "tensor", "tensor-spec": {"dtype": "float32", "shape": (-1, 32, 32, 32)}}]


def test_registering_neither_loads_nor_runs_the_model(checkpoint, name, monkeypatch):
    """The input example (a scan's path that exists only where the model is used) is stored, not run, and the
    requirements are given, not inferred by loading the model: registering costs no inference."""
    from mlflow.models import Model

    from hagan_clinic import serving

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded or run while it was registered")

    for cls in (serving.EncoderModel, serving.GeneratorModel):
        monkeypatch.setattr(cls, "load_context", refuse)
        monkeypatch.setattr(cls, "predict", refuse)
    register(checkpoint, name)
    model = Model.load(f"models:/{name}/1")
    assert model.load_input_example().to_dict("list") == {"path": ["/data/cohort/PATIENT0001/CT_SERIES"]}
    # the description's bounds and settings are the served model's
    description = client().get_model_version(name, "1").description
    assert f"up to {serving.MAX_VOLUMES} arrays" in description and serving.ROOT_ENV in description


def test_a_checkpoint_without_an_encoder_registers_its_generator_only(tmp_path, name):
    model = HAGAN.from_config(tiny_config())
    model.parts = ("G", "D")
    assert register(model.save(tmp_path / "g_only.pt"), name) == "1"
    names = {m.name for m in client().search_registered_models()}
    assert f"{name}-generator" in names and name not in names


def test_registering_a_checkpoint_again_reuses_its_versions(checkpoint, other_checkpoint, name, monkeypatch):
    """``train --resume`` of a finished run registers its checkpoint again, and a run killed between the encoder's
    and the generator's registration registers the encoder again on resume: neither makes a duplicate version."""
    from hagan_clinic.tracking import registry

    def versions(model: str) -> list[str]:
        return sorted(str(v.version) for v in client().search_model_versions(f"name = '{model}'"))

    assert register(checkpoint, name) == "1"
    assert register(checkpoint, name) == "1"
    assert versions(name) == versions(f"{name}-generator") == ["1"]

    real = registry._log_and_register

    def killed_before_the_generator(kind, *args, **kwargs):
        if kind == "generator":
            raise RuntimeError("killed")
        return real(kind, *args, **kwargs)

    monkeypatch.setattr(registry, "_log_and_register", killed_before_the_generator)
    with pytest.raises(RuntimeError, match="killed"):
        register(other_checkpoint, name)
    assert versions(name) == ["1", "2"] and versions(f"{name}-generator") == ["1"]
    monkeypatch.setattr(registry, "_log_and_register", real)
    assert register(other_checkpoint, name) == "2"  # resumed: the encoder's version reused, the generator's added
    assert versions(name) == versions(f"{name}-generator") == ["1", "2"]
    assert client().get_model_version(name, "2").tags["sibling"] == f"{name}-generator/2"
    assert client().get_model_version(f"{name}-generator", "2").tags["sibling"] == f"{name}/2"
    assert register(checkpoint, name) == "1"  # the newest version of that checkpoint, not a third one
    assert versions(name) == ["1", "2"]
    with pytest.raises(RegistryError) as err:  # a sha256 tag that is not the file's would make a model that never loads
        registry.register_checkpoint(name, checkpoint, tiny_config().to_dict(), {"sha256": "0" * 64})
    assert_one_line(err.value, "does not match the file")


# ---------------------------------------------------------------- resolving registry URIs
def test_latest_follows_the_newest_version_and_a_version_resolves_to_its_checkpoint(checkpoint, other_checkpoint, name):
    register(checkpoint, name)
    first = resolve_checkpoint(f"models:/{name}@latest", store())
    assert (first.name, first.version) == (name, "1") and file_sha256(first.path) == file_sha256(checkpoint)
    register(other_checkpoint, name)
    latest = resolve_checkpoint(f"models:/{name}@latest", store())
    assert (latest.name, latest.version) == (name, "2") and file_sha256(latest.path) == file_sha256(other_checkpoint)
    assert resolve_checkpoint(f"models:/{name}/latest", store()).version == "2"
    old = resolve_checkpoint(f"models:/{name}/1", store())
    assert (old.name, old.version) == (name, "1") and file_sha256(old.path) == file_sha256(checkpoint)
    # the generator of a registration resolves to the same checkpoint
    generator = resolve_checkpoint(f"models:/{name}-generator@latest", store())
    assert generator.version == "2" and file_sha256(generator.path) == file_sha256(other_checkpoint)
    # a plain path is what it is (its checks are the command's)
    assert resolve_checkpoint("some/model.pt", store()) == Resolved(Path("some/model.pt"))
    # a command that reads the file names its version: the newest encoder version registered from it
    assert find_version(file_sha256(other_checkpoint), store()) == f"{name}/2"
    assert find_version("0" * 64, store()) is None


def test_champion_is_set_on_the_encoder_and_its_generator(checkpoint, other_checkpoint, name):
    register(checkpoint, name)
    register(other_checkpoint, name)
    assert set_alias(f"models:/{name}/1", "champion", store()) == f"{name}/1"
    champion = resolve_checkpoint(f"models:/{name}@champion", store())
    assert champion.version == "1" and file_sha256(champion.path) == file_sha256(checkpoint)
    assert resolve_checkpoint(f"models:/{name}-generator@champion", store()).version == "1"
    # set from an alias, and from NAME/VERSION; it moves
    assert set_alias(f"models:/{name}@latest", "champion", store()) == f"{name}/2"
    assert resolve_checkpoint(f"models:/{name}-generator@champion", store()).version == "2"
    assert set_alias(f"{name}/1", "champion", store()) == f"{name}/1"
    assert resolve_checkpoint(f"models:/{name}@champion", store()).version == "1"
    with pytest.raises(RegistryError) as err:
        set_alias(f"{name}/1", "latest", store())  # the registry's own
    assert_one_line(err.value, "latest")


@pytest.mark.parametrize(
    ("uri", "needle"),
    [
        ("models:/{name}/7", "'{name}' has no version 7"),
        ("models:/{name}@champion", "has no alias 'champion' (its aliases: none"),
        ("models:/nobody/1", "no registered model 'nobody'"),
        ("models:/nobody@latest", "no registered model 'nobody'"),
        ("models:/", "give models:/NAME/VERSION"),
        ("models:/{name}/stable", "give models:/NAME/VERSION"),
        ("models:/a/b/1", "give models:/NAME/VERSION"),
        ("models:/{name}/\u0661", "give models:/NAME/VERSION"),  # an Arabic-Indic one is no version number
        ("models:/{name}/" + "1" * 23, "give models:/NAME/VERSION"),  # no SQLite integer
        ("models:/{name}/" + "9" * 18, "has no version " + "9" * 18),
        ("models:/{name}@" + "a" * 500, "has no alias 'aaa"),  # long names and aliases are cut in the message
        ("models:/" + "n" * 500 + "/1", "no registered model 'nnn"),
    ],
)
def test_what_cannot_be_resolved_is_refused_in_one_line(checkpoint, name, uri, needle):
    register(checkpoint, name)
    with pytest.raises(RegistryError) as err:
        resolve_checkpoint(uri.format(name=name), store())
    assert_one_line(err.value, needle.format(name=name))


def test_a_missing_store_is_refused_and_not_created(tmp_path):
    missing = tmp_path / "nowhere" / "mlflow.db"
    for call in (
        lambda: resolve_checkpoint("models:/model@latest", f"sqlite:///{missing}"),
        lambda: set_alias("model/1", "champion", f"sqlite:///{missing}"),
    ):
        with pytest.raises(RegistryError) as err:
            call()
        assert_one_line(err.value, "no tracking store", str(missing))
    assert find_version("0" * 64, f"sqlite:///{missing}") is None
    assert not missing.parent.exists()


def test_a_version_without_a_checkpoint_is_refused(checkpoint, tmp_path, name):
    """A version registered from a bare folder (as training registered its snapshot before models were served)."""
    folder = tmp_path / "snapshot"
    folder.mkdir()
    (folder / "model.pt").write_bytes(checkpoint.read_bytes())
    client().create_registered_model(name)
    client().create_model_version(name, folder.as_uri())
    with pytest.raises(RegistryError) as err:
        resolve_checkpoint(f"models:/{name}/1", store())
    assert_one_line(err.value, f"models:/{name}/1", "no hagan-clinic checkpoint")
    with pytest.raises(RegistryError) as err:  # promote refuses it too
        set_alias(f"models:/{name}/1", "champion", store())
    assert_one_line(err.value, f"models:/{name}/1", "no hagan-clinic checkpoint", "no alias set")
    assert not client().get_registered_model(name).aliases


def test_a_checkpoint_replaced_in_a_local_store_is_refused_by_the_registry_and_the_served_model(
    checkpoint, other_checkpoint, name
):
    """A local store's checkpoint is read in place: one replaced there (here by a valid checkpoint of other weights)
    is refused, never used and labelled as the registered version; the loaded pyfunc model refuses it too."""
    import mlflow

    register(checkpoint, name)
    stored = resolve_checkpoint(f"models:/{name}/1", store()).path
    assert stored.parent != Path(checkpoint).parent  # the stored file itself, in the store's artifact folder
    stored.write_bytes(other_checkpoint.read_bytes())
    with pytest.raises(RegistryError) as err:
        resolve_checkpoint(f"models:/{name}@latest", store())
    expected = file_sha256(checkpoint)[:12]
    assert_one_line(err.value, f"models:/{name}@latest", f"does not match the version's sha256 {expected}", "replaced?")
    with pytest.raises(HaganError) as err:
        mlflow.pyfunc.load_model(f"models:/{name}/1")
    assert_one_line(err.value, "does not match the sha256", expected, "replaced?")
    # the generator's own copy is untouched: it still resolves and loads
    assert file_sha256(resolve_checkpoint(f"models:/{name}-generator/1", store()).path) == file_sha256(checkpoint)
    assert mlflow.pyfunc.load_model(f"models:/{name}-generator/1") is not None


def test_a_stored_checkpoint_is_bounded_as_the_checkpoint_reader_bounds_it(checkpoint, name, monkeypatch):
    from hagan_clinic.models.hagan import MAX_PARAMETERS
    from hagan_clinic.tracking import registry

    # float32 parameters, and at most as many again for the EMA copy of the generator
    assert registry.MAX_CHECKPOINT_BYTES == 8 * MAX_PARAMETERS
    register(checkpoint, name)
    monkeypatch.setattr(registry, "MAX_CHECKPOINT_BYTES", checkpoint.stat().st_size - 1)
    with pytest.raises(RegistryError) as err:
        resolve_checkpoint(f"models:/{name}/1", store())
    assert_one_line(err.value, f"models:/{name}/1", "registered checkpoint", "MiB")


def test_from_a_remote_artifact_store_the_checkpoint_is_downloaded_and_checked(checkpoint, monkeypatch, name):
    """Remote stores (here a local one treated as remote) are downloaded to a temporary folder, checked against
    the version's SHA-256; a copy that does not match is refused."""
    from hagan_clinic.tracking import registry

    register(checkpoint, name)
    monkeypatch.setattr(registry, "_local_path", lambda uri: None)
    found = resolve_checkpoint(f"models:/{name}@latest", store())
    assert registry._download_folder() in found.path.parents
    assert file_sha256(found.path) == file_sha256(checkpoint) and found.version == "1"
    client().set_model_version_tag(name, "1", "sha256", "0" * 64)
    with pytest.raises(RegistryError) as err:
        resolve_checkpoint(f"models:/{name}/1", store())
    assert_one_line(err.value, "does not match the version's sha256 000000000000 (replaced?)")


def test_a_command_records_the_served_model_it_uses_whichever_uri_it_was_given(checkpoint, name):
    """encode uses the encoder and generate the generator of a checkpoint: given the other model's URI, each still
    records its own model's NAME/VERSION (provenance must not name the generator for features)."""
    from hagan_clinic.cli.options import checkpoint_source

    register(checkpoint, name)
    for uri in (f"models:/{name}/1", f"models:/{name}-generator/1", f"models:/{name}-generator@latest"):
        path, encoder = checkpoint_source(uri, role="encoder")
        _, generator = checkpoint_source(uri, role="generator")
        assert file_sha256(path) == file_sha256(checkpoint)
        assert (encoder, generator) == (f"{name}/1", f"{name}-generator/1"), uri
    assert checkpoint_source(str(checkpoint)) == (checkpoint, None)
