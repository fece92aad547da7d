"""Fitness before inference (jobs/fitness.py) and the "no result" notice, in the job runner
in-process (temp SQLite, the bundled lung model, synthetic chest CT with one real-world quirk
each): a quirk the node can repair runs, says so on the job and in the SR, and its results pass
dciodvfy; one it cannot is refused before inference with the reason; a job that ends without a
result leaves a notice for the PACS when its rule asks; nothing fails after inference for a
reason visible before it, and what does is recorded as such."""

from __future__ import annotations

import pytest
from pydicom import config, dcmread
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from dicom_ai_node.db.engine import Database
from dicom_ai_node.db.models import Job, JobState
from dicom_ai_node.imaging.load import read_header
from dicom_ai_node.jobs import runner as runner_module
from dicom_ai_node.jobs.fitness import check_fitness
from dicom_ai_node.jobs.runner import JobRunner
from dicom_ai_node.models import ModelRegistry
from dicom_ai_node.storage import Storage
from dicom_ai_node.web import actions
from model_zoo.registry import find_manifests
from tests.conftest import SHARED_DATA, requires_shared_data
from tests.dciodvfy import dciodvfy_errors
from tests.stored import queue_job, store_series
from tests.synthetic import make_ct_series

CHEST = dict(shape=(40, 96, 96), spacing=(2.5, 3.5, 3.5))  # an adult-sized chest: lungs ~1.3 L


def quirky(folder, seed: str, change, **series_options):
    """A synthetic chest CT whose every file (index i) went through ``change(dataset, i)``,
    written as it is, invalid values included."""
    series = make_ct_series(folder / seed, seed=seed, **{**CHEST, **series_options})
    for index, path in enumerate(series.paths):
        dataset = dcmread(path)
        change(dataset, index)
        mode = config.settings.writing_validation_mode
        config.settings.writing_validation_mode = config.IGNORE  # write what real archives hold
        try:
            dataset.save_as(path)
        finally:
            config.settings.writing_validation_mode = mode
    return series


def per_slice_frame_of_reference(dataset, index):
    dataset.FrameOfReferenceUID = generate_uid(entropy_srcs=["slice", str(index)])


def no_type2_patient_study(dataset, index):
    for keyword in ("PatientBirthDate", "PatientSex", "PatientName", "ReferringPhysicianName", "StudyDate",
                    "StudyTime", "StudyID", "AccessionNumber"):
        if keyword in dataset:
            delattr(dataset, keyword)


def sloppy_values(dataset, index):
    dataset.PatientSex = "m"
    dataset.ReferringPhysicianName = "Doe^John^^^^"
    dataset.BodyPartExamined = "Chest"
    dataset.SpecificCharacterSet = ["", "ISO 2022 IR 87"]
    dataset.PatientName = "Yamada^Tarou=山田^太郎=やまだ^たろう"
    item = Dataset()
    item.ReferencedSOPInstanceUID = "1.2.3.4"  # no ReferencedSOPClassUID: Type 1 missing
    dataset.ReferencedStudySequence = [item]


class Runner:
    def __init__(self, folder):
        self.database = Database(f"sqlite:///{folder / 'node.db'}")
        self.database.upgrade()
        self.storage = Storage(folder / "storage")
        self.runner = JobRunner(self.database, self.storage, ModelRegistry())

    def run(self, series, **fields) -> Job:
        with self.database.session() as session:
            store_series(session, self.storage, series)
            job_id = queue_job(session, series, "lung_ct_seg", "chest-ct-lungs",
                               destinations=fields.pop("destinations", ["pacs"]), **fields)
        self.runner.run(job_id)
        return self.job(job_id)

    def job(self, job_id) -> Job:
        with self.database.session() as session:
            job = session.get(Job, job_id)
            for result in job.results:
                _ = result.deliveries
            session.expunge_all()
            return job


@pytest.fixture
def runner(tmp_path):
    runner = Runner(tmp_path)
    yield runner
    runner.database.dispose()


def results_pass_dciodvfy(runner, job) -> None:
    for result in job.results:
        errors = dciodvfy_errors(runner.storage.absolute(result.path))
        assert errors == [], f"{result.kind}: {errors}"


def test_a_series_with_one_frame_of_reference_per_slice_runs_with_the_repair_said(runner, tmp_path):
    job = runner.run(quirky(tmp_path, "for-per-slice", per_slice_frame_of_reference))
    assert job.state == JobState.delivering, job.reason
    assert job.input_notes == ["the series' images carry 40 different Frame of Reference UIDs although they "
                               "form one volume; the results use the first image's"]
    kinds = sorted(result.kind for result in job.results)
    assert kinds == ["key_image", "seg", "sr"]
    results_pass_dciodvfy(runner, job)
    sr = dcmread(runner.storage.absolute(next(r.path for r in job.results if r.kind == "sr")))
    assert any("Frame of Reference" in str(item.get("TextValue", "")) for item in _content(sr))
    seg = dcmread(runner.storage.absolute(next(r.path for r in job.results if r.kind == "seg")))
    first = min((dcmread(p) for p in _series_paths(tmp_path / "for-per-slice")),
                key=lambda ds: float(ds.ImagePositionPatient[2]))
    assert seg.FrameOfReferenceUID == first.FrameOfReferenceUID


def test_missing_type2_and_invalid_copied_values_are_repaired_in_every_result(runner, tmp_path):
    job = runner.run(quirky(tmp_path, "no-type2", no_type2_patient_study))
    assert job.state == JobState.delivering, job.reason
    assert "source PatientBirthDate was missing and was added empty" in job.input_notes
    results_pass_dciodvfy(runner, job)

    job = runner.run(quirky(tmp_path, "sloppy", sloppy_values))
    assert job.state == JobState.delivering, job.reason
    assert "source ReferencedStudySequence item 1 lacked Type 1 ReferencedSOPClassUID and was left out" \
        in job.input_notes
    results_pass_dciodvfy(runner, job)
    for result in job.results:  # the characters are kept: the Japanese name reads back, in UTF-8,
        dataset = dcmread(runner.storage.absolute(result.path))  # which OHIF reads (not ISO 2022)
        assert str(dataset.PatientName) == "Yamada^Tarou=山田^太郎=やまだ^たろう", result.kind
        assert dataset.SpecificCharacterSet == "ISO_IR 192", result.kind
        assert dataset.PatientSex == "M" and "ReferencedStudySequence" not in dataset


def test_a_series_the_model_cannot_take_is_refused_before_inference_with_a_notice(runner, tmp_path, monkeypatch):
    predicted = []
    monkeypatch.setattr(ModelRegistry, "load", lambda self, manifest: predicted.append(manifest))
    series = make_ct_series(tmp_path / "thick", shape=(20, 48, 48), spacing=(12.0, 7.0, 7.0), seed="thick")
    job = runner.run(series, no_result_notice=True)
    assert predicted == []  # the model was never loaded, let alone run
    assert job.state == JobState.failed and job.failed_step == "input"
    assert "voxel spacing 12 x 7 x 7 mm is outside" in job.reason
    [notice] = job.results
    assert notice.kind == "notice" and [d.state for d in notice.deliveries] == ["pending"]
    results_pass_dciodvfy(runner, job)
    dataset = dcmread(runner.storage.absolute(notice.path))
    assert dataset.StudyInstanceUID == series.study_instance_uid and dataset.SeriesNumber == 9006
    assert dataset.ImageComments.startswith("AI RESULT NOT PRODUCED: series does not fit model lung_ct_seg")
    assert "NO RESULT" in dataset.SeriesDescription

    # a retry runs the job again (the notice is not a result to resend), and a second
    # failure does not send the same notice twice
    with runner.database.session() as session:
        assert actions.retry_job(session, job.id, "admin") == "run"
    runner.runner.run(job.id)
    again = runner.job(job.id)
    assert again.state == JobState.failed and len(again.results) == 1


def test_without_the_rule_asking_a_refused_job_sends_nothing(runner, tmp_path):
    series = make_ct_series(tmp_path / "thick", shape=(20, 48, 48), spacing=(12.0, 7.0, 7.0), seed="quiet")
    job = runner.run(series)
    assert job.state == JobState.failed and job.failed_step == "input" and job.results == []


def test_an_exception_after_inference_is_recorded_as_such_with_a_notice(runner, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("encoder bug")

    monkeypatch.setattr(runner_module, "encode_results", broken)
    job = runner.run(make_ct_series(tmp_path / "chest", seed="bug", **CHEST), no_result_notice=True)
    assert job.state == JobState.failed and job.failed_step == "encoding"
    assert job.reason == "internal error: RuntimeError: encoder bug"
    assert [r.kind for r in job.results] == ["notice"]


@pytest.mark.parametrize("change, reason", [
    (lambda ds, i: setattr(ds, "SeriesInstanceUID", "1.2.826.0.1.3680043.8.498.012"),
     "SeriesInstanceUID that is not a valid DICOM UID"),
    (lambda ds, i: ds.ImagePositionPatient.__setitem__(0, ds.ImagePositionPatient[0] + 2.0 * i),
     "gantry tilt"),
    (lambda ds, i: ds.__delattr__("ImagePositionPatient") if i == 5 else None, "no valid ImagePositionPatient"),
    (lambda ds, i: setattr(ds, "PhotometricInterpretation", "RGB"), "PhotometricInterpretation RGB"),
])
def test_what_results_could_not_carry_is_refused_by_the_fitness_check(tmp_path, change, reason):
    series = quirky(tmp_path, "refused", change, shape=(16, 32, 32))
    headers = [read_header(path) for path in series.paths]
    fitness = check_fitness(find_manifests()["lung_ct_seg"], series.paths, headers)
    assert not fitness.fit and any(reason in refusal for refusal in fitness.refusals), fitness.refusals


def test_rescale_that_differs_per_slice_is_fit(tmp_path):
    def rescale(dataset, index):
        if index % 2:  # same HU, other stored values: slope 0.5 doubles them
            import numpy as np

            stored = np.frombuffer(dataset.PixelData, dtype=np.uint16).astype(np.int32)
            dataset.PixelData = np.clip((stored - 1024 + 2048) * 2, 0, 65535).astype(np.uint16).tobytes()
            dataset.RescaleSlope, dataset.RescaleIntercept = "0.5", "-2048"

    series = quirky(tmp_path, "rescale", rescale, shape=(16, 32, 32))
    headers = [read_header(path) for path in series.paths]
    fitness = check_fitness(find_manifests()["lung_ct_seg"], series.paths, headers)
    assert fitness.fit, fitness.refusals
    assert "RescaleIntercept" not in fitness.plan.attributes and "RescaleIntercept" in fitness.plan.present


def _content(sr):
    stack = list(sr.get("ContentSequence", []))
    while stack:
        item = stack.pop()
        yield item
        stack.extend(item.get("ContentSequence", []))


def _series_paths(folder):
    return sorted(folder.glob("*.dcm"))


REAL_CT_SERIES = {  # real scanners' headers, as archives keep them (../shared/data)
    "nsclc_lung1": "chest_ct/NKI-RT__DecideDocker/workspace/decide/data/LUNG1-001/CT",
    "4d_lung": "chest_ct/bhklab__readii/tests/4D-Lung/113_HM10395/11-26-1999-NA-p4-13296/"
               "1.000000-P4P113S303I10349 Gated 40.0B-29543",
    "copdgene": "chest_ct/acil-bwh__ChestImagingPlatform/Testing/Data/Input/ct-64Dicom",
}


@requires_shared_data
@pytest.mark.shared_data
@pytest.mark.parametrize("name", sorted(REAL_CT_SERIES))
def test_results_from_real_scanner_headers_pass_dciodvfy(tmp_path, name):
    """Whatever a real source's header holds (LUNG1-001: PatientIdentityRemoved without a
    method), the SEG, SR and key image made from it pass dciodvfy (a threshold mask stands in
    for the model: the headers are what is tested)."""
    import numpy as np

    from dicom_ai_node.imaging.load import read_volume
    from dicom_ai_node.jobs.encode import encode_results
    from dicom_ai_node.jobs.runner import _encode
    from dicom_ai_node.results.conform import conform_result
    from model_zoo.base import Measurement, ModelOutput, SegmentMask

    paths = sorted((SHARED_DATA / REAL_CT_SERIES[name]).glob("*.dcm"))
    manifest = find_manifests()["lung_ct_seg"]
    headers = [read_header(path) for path in paths]
    fitness = check_fitness(manifest, paths, headers)
    assert fitness.fit, fitness.refusals
    volume = read_volume(fitness.plan)
    mask = (volume.pixels > -950) & (volume.pixels < -500)
    output = ModelOutput(segments=[SegmentMask("lung", mask)],
                         measurements=[Measurement("volume", float(mask.sum() * volume.voxel_volume_ml), "lung")])
    for kind, dataset in encode_results(fitness.sources, volume, output, manifest, f"real-{name}",
                                        input_repairs=fitness.repairs):
        conform_result(dataset)
        path = tmp_path / f"{kind}-{dataset.SOPInstanceUID}.dcm"
        path.write_bytes(_encode(dataset))
        assert dciodvfy_errors(path) == [], f"{name} {kind}"
        assert dcmread(path).StudyInstanceUID == headers[0].StudyInstanceUID
    assert np.any(mask)


def test_a_derived_series_from_a_sloppy_source_passes_dciodvfy(tmp_path):
    """A derived image copies its source header whole: every module of the CT IOD is made valid
    (lower-case code strings, person names, items without their Type 1, a long DS, no
    Frame of Reference; the denoiser's output stands in as the source's own pixels)."""
    from dicom_ai_node.imaging.load import read_volume
    from dicom_ai_node.jobs.encode import encode_results
    from dicom_ai_node.jobs.runner import _encode
    from dicom_ai_node.results.conform import conform_result
    from model_zoo.base import Measurement, ModelOutput

    def sloppier(dataset, index):
        sloppy_values(dataset, index)
        dataset.ImageType = ["original", "primary", "axial"]
        reference = Dataset()
        reference.ReferencedSOPInstanceUID = "1.2.3.4"  # no class
        dataset.ReferencedImageSequence = [reference]
        dataset.SliceThickness = "2.500000000000000001"
        del dataset.FrameOfReferenceUID

    series = quirky(tmp_path, "derived", sloppier, shape=(8, 32, 32))
    manifest = find_manifests()["ct_denoise"]
    headers = [read_header(path) for path in series.paths]
    fitness = check_fitness(manifest, series.paths, headers)
    assert fitness.fit, fitness.refusals
    volume = read_volume(fitness.plan)
    output = ModelOutput(derived_pixels=volume.pixels.copy(),
                         measurements=[Measurement("noise_input", 10.0), Measurement("noise_output", 5.0)])
    objects = encode_results(fitness.sources, volume, output, manifest, "derived-sloppy",
                             input_repairs=fitness.repairs)
    derived = [dataset for kind, dataset in objects if kind == "derived"]
    assert len(derived) == 8
    for kind, dataset in objects:
        conform_result(dataset, copied_whole=kind == "derived")
        path = tmp_path / f"{kind}-{dataset.SOPInstanceUID}.dcm"
        path.write_bytes(_encode(dataset))
        assert dciodvfy_errors(path) == [], kind
    assert derived[0].ImageType[0] == "DERIVED" and "ReferencedImageSequence" not in derived[0]
    assert str(derived[0].PatientName) == "Yamada^Tarou=山田^太郎=やまだ^たろう"
