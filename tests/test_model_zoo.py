"""Model zoo: manifests and the registry (discovery, loading, caching, input checks).
The bundled lung model has its own tests (test_lung_model.py)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from model_zoo.manifest import ManifestError, load_manifest
from model_zoo.registry import check_input, clear_cache, find_manifests, load_model


DUMMY_MODEL = '''
from model_zoo.base import ModelOutput

class Dummy:
    instances = 0

    def __init__(self, manifest, device):
        type(self).instances += 1
        self.manifest = manifest
        self.device = device

    def predict(self, volume):
        return ModelOutput()
'''


def dummy_toml(name="dummy", version="0.1.0", extra=""):
    return f'''
[model]
name = "{name}"
version = "{version}"
task = "classification"
entry = "model:Dummy"
{extra}

[algorithm]
name = "Dummy"
version = "0.1.0"

[input]
modality = ["CT"]
'''


def make_model_folder(root: Path, folder="dummy", **kwargs) -> Path:
    path = root / folder
    path.mkdir(parents=True)
    (path / "model.toml").write_text(dummy_toml(**kwargs))
    (path / "model.py").write_text(DUMMY_MODEL)
    return path


# ---------------------------------------------------------------- manifests


def test_bundled_lung_manifest_is_valid():
    manifest = find_manifests()["lung_ct_seg"]
    assert manifest.task == "segmentation"
    lung = manifest.segment("lung")
    assert (lung.type.scheme, lung.type.value) == ("SCT", "39607008")
    assert (lung.category.scheme, lung.category.value) == ("SCT", "123037004")
    units = {m.name: m.unit.value for m in manifest.measurements}
    assert units == {"volume": "ml", "mean_attenuation": "[hnsf'U]", "emphysema_index": "%"}
    for measurement in manifest.measurements:
        measurement.concept.to_highdicom()  # every code is acceptable to highdicom
    weights = manifest.folder / manifest.weights
    assert weights.is_file() and weights.stat().st_size < 5_000_000


def test_broken_manifest_error_names_file_and_key(tmp_path):
    path = tmp_path / "model.toml"
    path.write_text(dummy_toml().replace('modality = ["CT"]', ""))
    with pytest.raises(ManifestError) as error:
        load_manifest(path)
    assert str(path) in str(error.value) and "input.modality" in str(error.value)

    path.write_text(dummy_toml().replace('task = "classification"', 'task = "guessing"'))
    with pytest.raises(ManifestError, match=r"model\.task"):
        load_manifest(tmp_path)


# ---------------------------------------------------------------- registry


def test_extra_directory_is_searched_and_duplicates_refused(tmp_path):
    make_model_folder(tmp_path / "site")
    models = find_manifests([tmp_path / "site"])
    assert {"dummy", "lung_ct_seg"} <= set(models)
    make_model_folder(tmp_path / "other")
    with pytest.raises(ManifestError, match="already installed"):
        find_manifests([tmp_path / "site", tmp_path / "other"])


def test_load_model_caches_one_instance_per_name_and_version(tmp_path):
    clear_cache()
    make_model_folder(tmp_path, "a", name="cached", version="1")
    make_model_folder(tmp_path, "b", name="cached", version="2")
    first = load_manifest(tmp_path / "a")
    results = []
    threads = [threading.Thread(target=lambda: results.append(load_model(first))) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len({id(model) for model in results}) == 1
    assert type(results[0]).instances == 1
    assert results[0].device in ("cpu", "cuda")
    second = load_model(load_manifest(tmp_path / "b"))
    assert second is not results[0]
    assert load_model(first) is results[0]
    clear_cache()


def test_load_model_reports_missing_entry_and_weights(tmp_path):
    folder = make_model_folder(tmp_path, name="broken", extra='weights = "nope.pt"')
    with pytest.raises(ManifestError, match="model.weights"):
        load_model(load_manifest(folder))
    (folder / "model.toml").write_text(dummy_toml(name="broken2").replace("model:Dummy", "model:Missing"))
    with pytest.raises(ManifestError, match="model.entry"):
        load_model(load_manifest(folder))


def test_check_input():
    manifest = find_manifests()["lung_ct_seg"]
    good = {"Modality": "CT", "BodyPartExamined": "CHEST", "RescaleSlope": 1, "RescaleIntercept": -1024}
    assert check_input(manifest, good, 200, (1.0, 0.7, 0.7)) == []
    assert check_input(manifest, {**good, "BodyPartExamined": ""}, 200, (1.0, 0.7, 0.7)) == []

    reasons = check_input(manifest, {"Modality": "MR", "BodyPartExamined": "HEAD"}, 5, (12.0, 0.7, 0.7))
    text = " | ".join(reasons)
    assert len(reasons) == 6, reasons
    assert "modality MR" in text and "5 slices" in text and "12 x 0.7 x 0.7" in text
    assert "body part HEAD" in text and "RescaleSlope" in text and "RescaleIntercept" in text
    assert "spacing is unknown" in " ".join(check_input(manifest, good, 200, None))


def test_slice_spacing_has_its_own_range_when_declared(tmp_path):
    """[input] slice_spacing_mm bounds the spacing between slices; spacing_mm then bounds the
    in-plane pixels only. Without it spacing_mm bounds all three, as before."""
    good = {"Modality": "CT"}
    path = tmp_path / "model.toml"
    path.write_text(dummy_toml() + "spacing_mm = [0.3, 6.0]\n")
    every_axis = load_manifest(path)
    assert every_axis.input.slice_spacing_mm is None
    assert check_input(every_axis, good, 30, (8.0, 0.7, 0.7)) == ["voxel spacing 8 x 0.7 x 0.7 mm is outside 0.3..6 mm"]

    path.write_text(dummy_toml() + "spacing_mm = [0.3, 6.0]\nslice_spacing_mm = [0.3, 10]\n")
    thick = load_manifest(path)
    assert thick.input.slice_spacing_mm == (0.3, 10.0)
    assert check_input(thick, good, 30, (8.0, 0.65, 0.65)) == []
    assert check_input(thick, good, 30, (10.0, 0.7, 0.7)) == []
    for refused in ((10.5, 0.7, 0.7), (0.2, 0.7, 0.7), (3.0, 7.0, 7.0), (3.0, 0.7, 0.2)):
        assert check_input(thick, good, 30, refused) == [
            f"voxel spacing {' x '.join(f'{s:g}' for s in refused)} mm is outside 0.3..10 mm between slices "
            f"and 0.3..6 mm in-plane"], refused

    for bad in ("[10, 0.3]", "[0.3]", '"10"', "[0.3, true]"):
        path.write_text(dummy_toml() + f"slice_spacing_mm = {bad}\n")
        with pytest.raises(ManifestError, match=r"input\.slice_spacing_mm: must be"):
            load_manifest(path)


def test_bundled_lung_model_takes_thick_slices_but_not_coarse_pixels():
    """8-10 mm slices are accepted (MODEL_CARD.md, "Thick slices"); the in-plane range is unchanged."""
    manifest = find_manifests()["lung_ct_seg"]
    good = {"Modality": "CT", "BodyPartExamined": "CHEST", "RescaleSlope": 1, "RescaleIntercept": -1024}
    assert check_input(manifest, good, 30, (8.0, 0.65, 0.65)) == []
    assert check_input(manifest, good, 30, (10.0, 0.98, 0.98)) == []
    assert len(check_input(manifest, good, 30, (12.0, 0.7, 0.7))) == 1
    assert len(check_input(manifest, good, 100, (3.0, 7.0, 7.0))) == 1


def test_manifest_refuses_a_code_meaning_longer_than_dicom_allows(tmp_path):
    from model_zoo.manifest import ManifestError, load_manifest
    from tests.conftest import PROJECT_ROOT

    text = (PROJECT_ROOT / "model_zoo" / "lung_ct_seg" / "model.toml").read_text()
    path = tmp_path / "model.toml"
    path.write_text(text.replace('meaning = "Lung" }', 'meaning = "' + "L" * 65 + '" }', 1))
    with pytest.raises(ManifestError, match=r"outputs.segments\[0\].type.meaning: code meanings are at most 64"):
        load_manifest(path)


def test_a_cpu_only_model_is_loaded_on_the_cpu_whatever_the_host(monkeypatch):
    """manifest device = "cpu" pins the model to the CPU (a GPU worker also runs cpu/any
    queues); other models get the host's default device."""
    from dataclasses import replace

    from dicom_ai_node.models import ModelRegistry
    from model_zoo import registry

    asked = []
    monkeypatch.setattr(registry, "load_model", lambda manifest, device=None: asked.append(device))
    models = ModelRegistry()
    manifest = models.manifests["ct_body_region"]
    models.load(replace(manifest, device="cpu"))
    models.load(replace(manifest, device="any"))
    assert asked == ["cpu", None]
