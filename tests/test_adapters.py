"""Bring your own model: a site registers a model with only a model.toml and a file.

Each test exports a tiny model of its own (a 1x1 convolution that thresholds HU: "denser than
-250 HU") in one format (TorchScript, ONNX, MONAI bundle), writes a manifest next to it and
runs it through the node: in process (registry -> predict -> DICOM encoders -> dciodvfy) for
each format, and once end to end (storescu -> node with [models] paths -> Orthanc).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
import torch
from pydicom import dcmread

from dicom_ai_node.imaging.load import load_series, read_header
from dicom_ai_node.jobs.encode import encode_results
from model_zoo import registry
from model_zoo.manifest import ManifestError, load_manifest
from tests.dciodvfy import dciodvfy_errors
from tests.synthetic import make_ct_series

CLIP = (-1000.0, 500.0)
THRESHOLD_HU = -250.0  # = 0.5 after scaling CLIP to 0..1


class Dense(torch.nn.Module):
    """Logit > 0 where HU > -250 (input scaled 0..1 from -1000..500)."""

    def __init__(self, dims: int = 3):
        super().__init__()
        conv = torch.nn.Conv3d if dims == 3 else torch.nn.Conv2d
        self.conv = conv(1, 1, 1)
        with torch.no_grad():
            self.conv.weight.fill_(40.0)
            self.conv.bias.fill_(-20.0)

    def forward(self, x):
        return self.conv(x)


class Smooth(torch.nn.Module):
    """A 'denoiser': 3x3 mean filter on slices (N, 1, H, W)."""

    def forward(self, x):
        return torch.nn.functional.avg_pool2d(x, 3, 1, 1, count_include_pad=False)


class Region(torch.nn.Module):
    """A 'classifier' on slices: logits (N, 2) = [0, 10 * (mean - 0.3)]."""

    def forward(self, x):
        mean = x.mean(dim=(1, 2, 3))
        return torch.stack([torch.zeros_like(mean), 10 * (mean - 0.3)], dim=1)


SEGMENT = """
[[outputs.segments]]
name = "dense"
label = "Dense tissue"
category = { scheme = "SCT", value = "91723000", meaning = "Anatomical Structure" }
type = { scheme = "SCT", value = "85756007", meaning = "Tissue" }
color = [255, 128, 0]

[[outputs.measurements]]
name = "volume"
concept = { scheme = "SCT", value = "118565006", meaning = "Volume" }
unit = { scheme = "UCUM", value = "ml", meaning = "milliliter" }
"""


def write_manifest(folder: Path, name: str, entry: str, weights: str, task: str = "segmentation",
                   options: str = "", outputs: str = SEGMENT) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    options = options or f"""spatial_dims = 3
clip = {list(CLIP)}
scale_to = [0.0, 1.0]
roi_size = [8, 32, 32]
output = "segmentation"
activation = "sigmoid"
segments = ["dense"]"""
    (folder / "model.toml").write_text(f"""
[model]
name = "{name}"
version = "0.1.0"
task = "{task}"
entry = "{entry}"
weights = "{weights}"
description = "test model exported by tests/test_adapters.py"

[model.options]
{options}

[algorithm]
name = "Site test model {name}"
version = "0.1.0"
manufacturer = "Test site"

[input]
modality = ["CT"]
min_slices = 4
spacing_mm = [0.3, 6.0]
{outputs}
""")
    return folder


def export_torchscript(folder: Path, module=None, name="site_ts", **kwargs) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    torch.jit.save(torch.jit.script(module or Dense()), str(folder / "model.pt"))
    return write_manifest(folder, name, "torchscript", "model.pt", **kwargs)


def export_onnx(folder: Path, dims: int = 3) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    example = torch.zeros((1, 1, 8, 32, 32) if dims == 3 else (1, 1, 32, 32))
    axes = {0: "n", 2: "d", 3: "h", 4: "w"} if dims == 3 else {0: "n", 2: "h", 3: "w"}
    torch.onnx.export(Dense(dims), (example,), str(folder / "model.onnx"), input_names=["image"],
                      output_names=["logits"], dynamic_axes={"image": axes, "logits": axes}, dynamo=False)
    return write_manifest(folder, "site_onnx", "onnx", "model.onnx")


def export_bundle(folder: Path) -> Path:
    bundle = folder / "dense_bundle"
    (bundle / "configs").mkdir(parents=True, exist_ok=True)
    (bundle / "models").mkdir(parents=True, exist_ok=True)
    network = {"_target_": "monai.networks.nets.UNet", "spatial_dims": 3, "in_channels": 1, "out_channels": 1,
               "channels": [4, 8], "strides": [2], "num_res_units": 0}
    (bundle / "configs" / "inference.json").write_text(json.dumps({"bundle_root": ".", "network_def": network}))
    (bundle / "configs" / "metadata.json").write_text(json.dumps({"version": "0.1.0", "task": "test"}))
    from monai.networks.nets import UNet

    unet = UNet(spatial_dims=3, in_channels=1, out_channels=1, channels=(4, 8), strides=(2,), num_res_units=0)
    torch.save(unet.state_dict(), bundle / "models" / "model.pt")
    return write_manifest(folder, "site_bundle", "monai_bundle", "dense_bundle"), unet


@pytest.fixture
def series(tmp_path):
    return make_ct_series(tmp_path / "ct", shape=(12, 48, 64), spacing=(2.5, 0.8, 0.7), seed="adapters")


@pytest.fixture(autouse=True)
def fresh_cache():
    registry.clear_cache()
    yield
    registry.clear_cache()


def run_in_process(folder: Path, series, tmp_path: Path):
    manifest = load_manifest(folder)
    model = registry.load_model(manifest, device="cpu")
    assert registry.load_model(manifest, device="cpu") is model  # loaded once, reused
    volume = load_series(series.paths)
    assert registry.check_input(manifest, volume.attributes, volume.shape[0], volume.spacing) == []
    output = model.predict(volume)
    sources = [read_header(p) for p in dict.fromkeys(f.path for f in volume.source_frames)]
    objects = encode_results(sources, volume, output, manifest, f"test {manifest.name}")
    for index, (kind, dataset) in enumerate(objects):
        path = tmp_path / f"{manifest.name}-{kind}-{index}.dcm"
        dataset.save_as(path, enforce_file_format=True)
        assert dciodvfy_errors(path) == [], f"{manifest.name} {kind}: dciodvfy errors"
    return volume, output, objects


def assert_dense_mask(volume, output, series):
    (segment,) = output.segments
    expected = series.hu > THRESHOLD_HU
    assert segment.name == "dense" and segment.mask.shape == volume.shape
    agreement = (segment.mask == expected).mean()
    assert agreement > 0.98, f"mask agrees with HU > -250 on {agreement:.1%} of voxels"
    assert output.measurements[0].value == pytest.approx(segment.mask.sum() * volume.voxel_volume_ml)


def test_torchscript_model_runs_through_the_encoders(tmp_path, series):
    folder = export_torchscript(tmp_path / "site" / "ts")
    volume, output, objects = run_in_process(folder, series, tmp_path)
    assert_dense_mask(volume, output, series)
    assert sorted({kind for kind, _ in objects}) == ["key_image", "seg", "sr"]


def test_onnx_model_runs_with_onnxruntime(tmp_path, series):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    folder = export_onnx(tmp_path / "site" / "onnx")
    volume, output, objects = run_in_process(folder, series, tmp_path)
    assert_dense_mask(volume, output, series)
    seg = next(ds for kind, ds in objects if kind == "seg")
    assert seg.SegmentSequence[0].SegmentLabel == "Dense tissue"


def test_monai_bundle_folder_gives_the_same_output_as_its_network(tmp_path, series):
    folder, unet = export_bundle(tmp_path / "site" / "bundle")
    volume, output, _ = run_in_process(folder, series, tmp_path)
    scaled = ((torch.from_numpy(series.hu).clamp(*CLIP) - CLIP[0]) / (CLIP[1] - CLIP[0]))[None, None]
    from monai.inferers import sliding_window_inference

    with torch.no_grad():
        expected = torch.sigmoid(sliding_window_inference(scaled, (8, 32, 32), 1, unet.eval(), overlap=0.25,
                                                          mode="gaussian"))[0, 0].numpy() > 0.5
    assert (output.segments[0].mask == expected).mean() > 0.999


def test_2d_denoiser_returns_a_derived_series(tmp_path, series):
    options = """spatial_dims = 2
clip = [-1024.0, 3071.0]
scale_to = [0.0, 1.0]
roi_size = [32, 32]
output = "image"
"""
    folder = export_torchscript(tmp_path / "site" / "smooth", module=Smooth(), name="site_smooth",
                                task="denoising", options=options, outputs="")
    volume, output, objects = run_in_process(folder, series, tmp_path)
    assert output.derived_pixels.shape == volume.shape
    expected = Smooth()(torch.from_numpy(volume.pixels).clamp(-1024, 3071)[:, None])[:, 0].numpy()
    # the network's output back in HU (tiles blend with Gaussian weights: tiny seams only)
    assert np.abs(output.derived_pixels - expected).mean() < 1.0
    derived = [ds for kind, ds in objects if kind == "derived"]
    assert len(derived) == volume.shape[0] and derived[0].ImageType[0] == "DERIVED"


def test_2d_classifier_gives_a_finding_with_probability(tmp_path, series):
    options = """spatial_dims = 2
clip = [-1000.0, 1000.0]
scale_to = [0.0, 1.0]
output = "class"
classes = ["air", "body"]
"""
    outputs = """
[[outputs.findings]]
name = "content"
concept = { scheme = "DCM", value = "121071", meaning = "Finding" }
values = { air = { scheme = "SCT", value = "14384000", meaning = "Air" }, body = { scheme = "SCT", value = "123037004", meaning = "Anatomical Structure" } }
"""
    folder = export_torchscript(tmp_path / "site" / "region", module=Region(), name="site_region",
                                task="classification", options=options, outputs=outputs)
    _, output, objects = run_in_process(folder, series, tmp_path)
    (finding,) = output.findings
    assert finding.value in ("air", "body") and 0.5 <= finding.probability <= 1
    sr = hd.sr.srread(io.BytesIO(_bytes(next(ds for kind, ds in objects if kind == "sr"))))
    (group,) = sr.content.get_image_measurement_groups()
    values = [item.ConceptCodeSequence[0].CodeMeaning for item in group[0].ContentSequence
              if item.ValueType == "CODE" and item.ConceptNameCodeSequence[0].CodeValue == "121071"]
    expected = {"air": "Air", "body": "Anatomical Structure"}[finding.value]
    assert expected in values
    (probability,) = group.get_measurements()
    assert probability.value == pytest.approx(100 * finding.probability, abs=1e-3)


def _bytes(dataset) -> bytes:
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def test_a_site_model_declares_quality_checks_without_code(tmp_path, series):
    from model_zoo.quality import check_output

    qc = """
[[qc.segments]]
name = "dense"
required = true
volume_ml = [1, 10]

[[qc.measurements]]
name = "volume"
segment = "dense"
range = [1, 1000]
"""
    manifest = load_manifest(export_torchscript(tmp_path / "site", outputs=SEGMENT + qc))
    volume = load_series(series.paths)
    output = registry.load_model(manifest, device="cpu").predict(volume)
    results = {r.name: r for r in check_output(manifest, output, volume.voxel_volume_ml)}
    body_ml = output.measurements[0].value  # the phantom's body: everything denser than -250 HU
    assert 10 < body_ml < 1000
    assert not results["dense volume"].passed and results["dense volume"].value == pytest.approx(body_ml)
    assert results["volume on dense"].passed and results["volume on dense"].unit == "mL"


def test_bad_manifests_are_refused_with_the_key(tmp_path):
    folder = export_torchscript(tmp_path / "bad", options='output = "segmentation"\nsegments = ["nope"]')
    with pytest.raises(ManifestError, match="model.options.segments"):
        registry.load_model(load_manifest(folder), device="cpu")
    folder = write_manifest(tmp_path / "missing", "site_missing", "onnx", "absent.onnx")
    with pytest.raises(ManifestError, match="file not found"):
        registry.load_model(load_manifest(folder), device="cpu")
    folder = write_manifest(tmp_path / "badentry", "site_badentry", "tensorflow", "model.pb")
    (folder / "model.pb").write_bytes(b"")
    with pytest.raises(ManifestError, match="onnx"):
        registry.load_model(load_manifest(folder), device="cpu")


def test_models_check_loads_and_runs_the_model(tmp_path):
    from dicom_ai_node.cli import main

    folder = export_torchscript(tmp_path / "site" / "ts")
    assert main(["--config", str(tmp_path / "none.toml"), "models", "check", str(folder)]) == 0
    (folder / "model.pt").write_bytes(b"not a model")
    registry.clear_cache()
    assert main(["--config", str(tmp_path / "none.toml"), "models", "check", str(folder)]) == 1


@pytest.mark.integration
def test_site_onnx_model_end_to_end_through_the_node(tmp_path, orthanc):
    pytest.importorskip("onnxruntime")
    from tests.node_process import NODE_AE, NodeProcess
    from tests.peers import skip_unless_tools, storescu, storescu_failures, wait_for
    from tests.test_end_to_end import COMPREHENSIVE_3D_SR, SEG, results_in_orthanc

    export_onnx(tmp_path / "site" / "onnx")
    series = make_ct_series(tmp_path / "ct", shape=(12, 48, 64), spacing=(2.5, 0.8, 0.7), seed="site-e2e")
    rules = """
[[rules]]
name = "site-dense"
priority = 5
models = ["site_onnx"]
destinations = ["pacs"]
when = { tag = "Modality", equals = "CT" }
"""
    node = NodeProcess(tmp_path / "node", port=orthanc.node_port, destination_port=orthanc.dicom_port,
                       rules=rules, model_paths=(tmp_path / "site",))
    with node:
        listed = node.cli("models", "list").stdout
        assert "site_onnx" in listed and "lung_ct_seg" in listed
        assert not storescu_failures(storescu("127.0.0.1", node.port, tmp_path / "ct", NODE_AE))
        found = wait_for(lambda: (f := results_in_orthanc(orthanc, series.study_instance_uid))
                         and {SEG, COMPREHENSIVE_3D_SR} <= set(f) and f, timeout=120, what="site model results")
        job = wait_for(lambda: (j := node.study(series.study_instance_uid)["jobs"]) and j[0]["state"] == "done"
                       and j[0], timeout=30, what="job done")
    assert job["model"] == "site_onnx"
    data = orthanc.instance_file(found[SEG][0])
    path = tmp_path / "seg.dcm"
    path.write_bytes(data)
    assert dciodvfy_errors(path) == []
    seg = hd.seg.segread(io.BytesIO(data))
    mask = seg.get_pixels_by_source_instance(series.sop_instance_uids)[..., 0].astype(bool)
    assert (mask == (series.hu > THRESHOLD_HU)).mean() > 0.98
    assert dcmread(path).StudyInstanceUID == series.study_instance_uid
