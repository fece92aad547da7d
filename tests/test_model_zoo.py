"""Model zoo: manifests, the registry (discovery, loading, caching, input checks), and the
bundled lung CT segmentation model on synthetic and real CT."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from model_zoo.manifest import ManifestError, load_manifest
from model_zoo.registry import check_input, clear_cache, find_manifests, load_model
from tests.conftest import SHARED_DATA, requires_shared_data

LUNG_FOLDER = Path(__file__).resolve().parent.parent / "model_zoo" / "lung_ct_seg"

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


@pytest.fixture(scope="module")
def lung_model():
    return load_model(find_manifests()["lung_ct_seg"], device="cpu")


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

    reasons = check_input(manifest, {"Modality": "MR", "BodyPartExamined": "HEAD"}, 5, (10.0, 0.7, 0.7))
    text = " | ".join(reasons)
    assert len(reasons) == 6, reasons
    assert "modality MR" in text and "5 slices" in text and "10 x 0.7 x 0.7" in text
    assert "body part HEAD" in text and "RescaleSlope" in text and "RescaleIntercept" in text
    assert "spacing is unknown" in " ".join(check_input(manifest, good, 200, None))


# ---------------------------------------------------------------- the lung model


def synthetic_chest(shape=(60, 160, 160), spacing=(2.5, 2.0, 2.0), seed=0):
    """Body ellipse (~20 HU) with two lung-shaped ellipsoids (~-850 HU), a trachea above them,
    and one -980 HU "emphysema" ball in the right lung. Returns HU, lung truth, emphysema truth."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*(np.arange(n) * s for n, s in zip(shape, spacing)), indexing="ij")
    cy, cx = shape[1] * spacing[1] / 2, shape[2] * spacing[2] / 2
    hu = np.full(shape, -1000.0)
    hu[((y - cy) / 110) ** 2 + ((x - cx) / 150) ** 2 < 1] = 20
    lungs = np.zeros(shape, bool)
    for side in (-1, 1):
        lungs |= ((y - cy + 5) / 70) ** 2 + ((x - cx - side * 70) / 48) ** 2 + ((z - 60) / 85) ** 2 < 1
    lungs &= z > 15
    hu[lungs] = -850
    emphysema = lungs & (((z - 80) ** 2 + (y - cy) ** 2 + (x - cx + 70) ** 2) < 20 ** 2)
    hu[emphysema] = -980
    hu[(np.hypot(y - cy + 30, x - cx) < 8) & (z > 130)] = -1000  # trachea, not lung
    hu += rng.normal(0, 15, shape)
    return hu.astype(np.float32), lungs, emphysema


def test_lung_model_on_synthetic_ct(lung_model):
    from model_zoo.lung_ct_seg.data import volume_from_array

    hu, truth, emphysema = synthetic_chest()
    volume = volume_from_array(hu, (2.5, 2.0, 2.0))
    output = lung_model.predict(volume)
    mask = output.segments[0].mask
    assert output.segments[0].name == "lung" and mask.shape == hu.shape and mask.dtype == bool
    dice = 2 * (mask & truth).sum() / (mask.sum() + truth.sum())
    assert dice > 0.8, dice
    values = {m.name: m.value for m in output.measurements}
    assert all(m.segment == "lung" for m in output.measurements)
    true_ml = truth.sum() * volume.voxel_volume_ml
    assert abs(values["volume"] - true_ml) / true_ml < 0.15, (values, true_ml)
    assert -900 < values["mean_attenuation"] < -780
    expected_index = 100 * emphysema.sum() / truth.sum()
    assert abs(values["emphysema_index"] - expected_index) < 2, (values, expected_index)
    assert output.key_slices and mask[output.key_slices[0]].any()
    for m in output.measurements:
        lung_model.manifest.measurement(m.name)  # every measurement is declared


def test_lung_model_finds_nothing_in_a_body_without_lungs(lung_model):
    from model_zoo.lung_ct_seg.data import volume_from_array

    hu, lungs, _ = synthetic_chest()
    hu[lungs] = 20.0  # lungs -> soft tissue; outside air and the trachea stay
    output = lung_model.predict(volume_from_array(hu, (2.5, 2.0, 2.0)))
    assert output.segments[0].mask.sum() * 0.01 < 20  # under 20 mL (voxels are 0.01 mL)


def test_lung_components_below_the_lungs_are_dropped():
    """Colon gas that the network mistakes for lung lies below the lung bases: the anatomy-aware
    component choice drops it even when it is larger than the lungs (scan of the lung bases)."""
    from model_zoo.lung_ct_seg.model import keep_lung_components, superior_direction

    mask = np.zeros((40, 60, 60), bool)
    mask[30:40, 10:30, 5:25] = True  # right lung base (4000 voxels), top of the scan
    mask[33:40, 10:30, 35:55] = True  # left lung base (2800 voxels), a little lower
    mask[5:25, 35:55, 10:50] = True  # colon gas (16000 voxels), bulk far below the bases
    lungs = mask.copy()
    lungs[5:25] = False
    assert np.array_equal(keep_lung_components(mask, 0.0156, superior=1), lungs)
    # slices stored feet-first: the same anatomy, the rule follows the slice direction
    flipped = keep_lung_components(mask[::-1], 0.0156, superior=-1)
    assert np.array_equal(flipped, lungs[::-1])
    # unknown orientation: plain largest-component rule (keeps the gas, as before)
    assert keep_lung_components(mask, 0.0156, superior=0)[10, 40, 20]
    assert superior_direction([0, 0, 1]) == 1 and superior_direction([0, 0, -1]) == -1
    assert superior_direction([0, 1, 0]) == 0


@requires_shared_data
def test_lung_model_on_real_ct_against_totalsegmentator(lung_model):
    from model_zoo.lung_ct_seg.data import EVAL_CT, load_eval_case, volume_from_array

    if not (SHARED_DATA / EVAL_CT).is_file():
        pytest.skip(f"{SHARED_DATA / EVAL_CT} not present")
    pixels, spacing, reference = load_eval_case(SHARED_DATA)
    output = lung_model.predict(volume_from_array(pixels, spacing))
    mask = output.segments[0].mask
    dice = 2 * (mask & reference).sum() / (mask.sum() + reference.sum())
    assert dice > 0.8, dice


def test_manifest_refuses_a_code_meaning_longer_than_dicom_allows(tmp_path):
    from model_zoo.manifest import ManifestError, load_manifest
    from tests.conftest import PROJECT_ROOT

    text = (PROJECT_ROOT / "model_zoo" / "lung_ct_seg" / "model.toml").read_text()
    path = tmp_path / "model.toml"
    path.write_text(text.replace('meaning = "Lung" }', 'meaning = "' + "L" * 65 + '" }', 1))
    with pytest.raises(ManifestError, match=r"outputs.segments\[0\].type.meaning: code meanings are at most 64"):
        load_manifest(path)
