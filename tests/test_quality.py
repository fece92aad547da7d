"""Quality checks: [qc] in model.toml (parsing, precise errors) and model_zoo/quality.py (the
checks themselves, on hand-made outputs and on the bundled lung model's real output)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from model_zoo.base import Finding, Measurement, ModelOutput, SegmentMask
from model_zoo.manifest import ManifestError, load_manifest
from model_zoo.quality import check_output
from model_zoo.registry import find_manifests, load_model
from tests.synthetic import make_ct_series

MANIFEST = '''
[model]
name = "site_seg"
version = "1.0.0"
task = "segmentation"
entry = "model:Whatever"

[algorithm]
name = "Site segmentation"
version = "1.0.0"

[input]
modality = ["CT"]

[[outputs.segments]]
name = "liver"
label = "Liver"
category = { scheme = "SCT", value = "123037004", meaning = "Anatomical Structure" }
type = { scheme = "SCT", value = "10200004", meaning = "Liver" }

[[outputs.segments]]
name = "spleen"
label = "Spleen"
category = { scheme = "SCT", value = "123037004", meaning = "Anatomical Structure" }
type = { scheme = "SCT", value = "78961009", meaning = "Spleen" }

[[outputs.measurements]]
name = "mean_attenuation"
concept = { scheme = "DCM", value = "112181", meaning = "Mean Attenuation Coefficient" }
unit = { scheme = "UCUM", value = "[hnsf'U]", meaning = "Hounsfield unit" }

[[outputs.measurements]]
name = "noise_input"
concept = { scheme = "99X", value = "IN", meaning = "noise in" }
unit = { scheme = "UCUM", value = "[hnsf'U]", meaning = "Hounsfield unit" }

[[outputs.measurements]]
name = "noise_output"
concept = { scheme = "99X", value = "OUT", meaning = "noise out" }
unit = { scheme = "UCUM", value = "[hnsf'U]", meaning = "Hounsfield unit" }

[[outputs.findings]]
name = "region"
concept = { scheme = "DCM", value = "123014", meaning = "Target Region" }
values = { chest = { scheme = "SCT", value = "51185008", meaning = "Chest" } }
'''

QC = '''
[[qc.segments]]
name = "liver"
required = true
volume_ml = [500, 4000]

[[qc.segments]]
name = "spleen"
volume_ml = [50, 1000]

[[qc.measurements]]
name = "mean_attenuation"
segment = "liver"
range = [0, 200]

[[qc.findings]]
name = "region"
min_probability = 0.6

[[qc.reductions]]
before = "noise_input"
after = "noise_output"
min_relative = 0.2
'''


def manifest_with(tmp_path, qc: str):
    path = tmp_path / "model.toml"
    path.write_text(MANIFEST + qc)
    return load_manifest(path)


def mask_of_ml(ml: float, voxel_ml: float = 0.001) -> np.ndarray:
    mask = np.zeros(1_000_000, bool)  # at 1 uL per voxel: up to 1000 mL
    mask[:int(round(ml / voxel_ml))] = True
    return mask


def by_name(results):
    return {r.name: r for r in results}


# ---------------------------------------------------------------- [qc] in model.toml


def test_qc_section_is_parsed(tmp_path):
    qc = manifest_with(tmp_path, QC).qc
    assert qc.segments[0].name == "liver" and qc.segments[0].required and qc.segments[0].volume_ml == (500.0, 4000.0)
    assert not qc.segments[1].required
    assert qc.measurements[0].allowed == (0.0, 200.0) and qc.measurements[0].segment == "liver"
    assert qc.findings[0].min_probability == 0.6 and not qc.findings[0].required
    assert (qc.reductions[0].before, qc.reductions[0].after, qc.reductions[0].min_relative) == \
        ("noise_input", "noise_output", 0.2)
    assert manifest_with(tmp_path, "").qc.segments == ()  # no [qc]: nothing is checked


def test_bundled_models_declare_their_checks():
    manifests = find_manifests()
    lung = manifests["lung_ct_seg"].qc
    assert lung.segments[0].name == "lung" and lung.segments[0].required and lung.segments[0].volume_ml == (100, 12000)
    assert lung.measurements[0].name == "mean_attenuation" and lung.measurements[0].allowed == (-1000, -500)
    assert manifests["ct_body_region"].qc.findings[0].min_probability == 0.6
    assert manifests["ct_denoise"].qc.reductions[0].min_relative == 0.2


@pytest.mark.parametrize("qc, key, problem", [
    ('[[qc.segments]]\nname = "lungs"\nrequired = true', "qc.segments[0].name",
     "'lungs' is not an [[outputs.segments]] name (declared: liver, spleen)"),
    ('[[qc.segments]]\nname = "liver"\nvolume_ml = [4000, 500]', "qc.segments[0].volume_ml",
     "must be [low, high] in mL with low <= high"),
    ('[[qc.segments]]\nname = "liver"\nvolume_ml = [500]', "qc.segments[0].volume_ml", "must be [low, high]"),
    ('[[qc.segments]]\nname = "liver"', "qc.segments[0]", "checks nothing"),
    ('[[qc.segments]]\nname = "liver"\nrequired = "yes"', "qc.segments[0].required", "must be bool"),
    ('[[qc.segments]]\nname = "liver"\nvolume = [1, 2]', "qc.segments[0].volume", "unknown key"),
    ('[[qc.measurements]]\nname = "mean_attenuation"', "qc.measurements[0].range", "is required"),
    ('[[qc.measurements]]\nname = "mean_attenuation"\nrange = [0, 1]\nsegment = "lung"',
     "qc.measurements[0].segment", "'lung' is not an [[outputs.segments]] name"),
    ('[[qc.findings]]\nname = "region"\nmin_probability = 60', "qc.findings[0].min_probability",
     "must be between 0 and 1"),
    ('[[qc.findings]]\nname = "age"\nmin_probability = 0.5', "qc.findings[0].name",
     "not an [[outputs.findings]] name"),
    ('[[qc.reductions]]\nbefore = "noise_input"\nafter = "noise_input"\nmin_relative = 0.2',
     "qc.reductions[0].after", "must name another measurement"),
    ('[[qc.reductions]]\nbefore = "noise_input"\nafter = "noise"\nmin_relative = 0.2',
     "qc.reductions[0].after", "not an [[outputs.measurements]] name"),
    ('[[qc.segments]]\nname = "liver"\nrequired = true\n[[qc.segments]]\nname = "liver"\nvolume_ml = [1, 2]',
     "qc.segments", "the same output is checked twice: liver"),
    ('[qc]\nsegment = []', "qc.segment", "unknown key (allowed: segments, measurements, findings, reductions)"),
    ("[qc]\nsegments = 3", "qc.segments", "must be list"),
    ('[[qc.segments]]\nname = 3\nrequired = true', "qc.segments[0].name", "must be str"),
])
def test_qc_errors_name_the_file_and_the_key(tmp_path, qc, key, problem):
    with pytest.raises(ManifestError) as error:
        manifest_with(tmp_path, qc)
    message = str(error.value)
    assert message.startswith(f"{tmp_path / 'model.toml'}: {key}: "), message
    assert problem in message, message


# ---------------------------------------------------------------- the checks


def test_a_plausible_output_passes_every_check(tmp_path):
    manifest = manifest_with(tmp_path, QC)
    output = ModelOutput(
        segments=[SegmentMask("liver", mask_of_ml(900)), SegmentMask("spleen", mask_of_ml(120))],
        measurements=[Measurement("mean_attenuation", 55.0, segment="liver"),
                      Measurement("noise_input", 20.0), Measurement("noise_output", 12.0)],
        findings=[Finding("region", "chest", 0.84)])
    results = by_name(check_output(manifest, output, voxel_volume_ml=0.001))
    assert all(r.passed for r in results.values()), results
    liver = results["liver volume"]
    assert (liver.value, liver.low, liver.high, liver.unit) == (pytest.approx(900), 500, 4000, "mL")
    assert liver.message == "liver volume 900 mL is within the plausible range 500 to 4000 mL"
    reduction = results["noise_output reduction from noise_input"]
    assert reduction.value == pytest.approx(40.0) and reduction.unit == "%" and reduction.low == 20.0
    assert reduction.message == ("noise_output reduction from noise_input 40% is within the needed minimum 20% "
                                 "(noise_input 20 HU, noise_output 12 HU)")
    assert results["region probability"].message == \
        "region 'chest': region probability 0.84 is within the needed minimum 0.6"
    assert results["mean_attenuation on liver"].unit == "HU"


def test_implausible_outputs_fail_with_a_sentence_each(tmp_path):
    manifest = manifest_with(tmp_path, QC)
    output = ModelOutput(
        segments=[SegmentMask("liver", mask_of_ml(8)), SegmentMask("spleen", mask_of_ml(0))],
        measurements=[Measurement("mean_attenuation", -600.0, segment="liver"),
                      Measurement("noise_input", 20.0), Measurement("noise_output", 18.0)],
        findings=[Finding("region", "chest", 0.41)])
    results = by_name(check_output(manifest, output, voxel_volume_ml=0.001))
    failed = {name for name, r in results.items() if not r.passed}
    assert failed == {"liver volume", "mean_attenuation on liver", "region probability",
                      "noise_output reduction from noise_input"}
    assert results["liver volume"].message == "liver volume 8 mL is below the plausible range 500 to 4000 mL"
    assert results["mean_attenuation on liver"].message == \
        "mean_attenuation on liver -600 HU is below the plausible range 0 to 200 HU"
    assert "10% is below the needed minimum 20%" in results["noise_output reduction from noise_input"].message
    # an optional segment the model did not find is not a failure
    assert results["spleen volume"].passed and "optional" in results["spleen volume"].message
    for result in results.values():  # they go into DICOM text and burned-in banners
        assert result.message.isascii()


def test_required_outputs_that_are_missing_fail(tmp_path):
    manifest = manifest_with(tmp_path, QC.replace('min_probability = 0.6', 'min_probability = 0.6\nrequired = true')
                             .replace('min_relative = 0.2', 'min_relative = 0.2\nrequired = true')
                             .replace('range = [0, 200]', 'range = [0, 200]\nrequired = true'))
    results = by_name(check_output(manifest, ModelOutput(), voxel_volume_ml=1.0))
    assert not any(r.passed for name, r in results.items() if name != "spleen volume")
    assert results["liver volume"].message == "liver not found: the model segmented nothing, and it is required"
    assert results["region probability"].value is None
    assert results["mean_attenuation on liver"].message == \
        "mean_attenuation on liver not reported by the model, and it is required"
    # not required: absent outputs pass, and say so
    results = by_name(check_output(manifest_with(tmp_path, QC), ModelOutput(), voxel_volume_ml=1.0))
    assert results["region probability"].passed and "optional" in results["region probability"].message
    assert not results["liver volume"].passed  # still required


def test_values_that_are_not_numbers_fail(tmp_path):
    manifest = manifest_with(tmp_path, QC)
    output = ModelOutput(segments=[SegmentMask("liver", mask_of_ml(900))],
                         measurements=[Measurement("mean_attenuation", math.nan, segment="liver"),
                                       Measurement("noise_input", 0.0), Measurement("noise_output", 0.0)])
    results = by_name(check_output(manifest, output, voxel_volume_ml=0.001))
    assert results["mean_attenuation on liver"].message == "mean_attenuation on liver is not a number"
    assert not results["noise_output reduction from noise_input"].passed  # 0 before: no reduction to speak of


def test_a_measurement_check_without_segment_checks_every_value_of_that_name(tmp_path):
    manifest = manifest_with(tmp_path, QC.replace('segment = "liver"\n', ""))
    output = ModelOutput(measurements=[Measurement("mean_attenuation", 50.0, segment="liver"),
                                       Measurement("mean_attenuation", 400.0, segment="spleen")])
    results = check_output(manifest, output, voxel_volume_ml=1.0)
    checked = {r.name: r.passed for r in results if r.name.startswith("mean_attenuation")}
    assert checked == {"mean_attenuation on liver": True, "mean_attenuation on spleen": False}


def test_bundled_lung_model_fails_its_checks_on_a_cropped_phantom_and_passes_a_fuller_one(tmp_path):
    """The phantoms the end-to-end tests use: what makes them pass or fail is the manifest's
    declared range, on the model's real output."""
    from dicom_ai_node.imaging.load import load_series

    manifest = find_manifests()["lung_ct_seg"]
    model = load_model(manifest, device="cpu")
    outcomes = {}
    for name, shape, spacing in (("cropped", (16, 64, 64), (0.6, 3.5, 3.5)),  # a 9.6 mm slab: ~57 mL of lung
                                 ("chest", (40, 96, 96), (2.5, 3.5, 3.5))):
        series = make_ct_series(tmp_path / name, shape=shape, spacing=spacing, seed=name)
        volume = load_series(series.paths)
        outcomes[name] = by_name(check_output(manifest, model.predict(volume), volume.voxel_volume_ml))
    assert not outcomes["cropped"]["lung volume"].passed, outcomes["cropped"]["lung volume"]
    assert outcomes["cropped"]["lung volume"].value < 100
    assert all(r.passed for r in outcomes["chest"].values()), outcomes["chest"]
