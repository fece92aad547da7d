"""Issue 9's case, with real peers: a real contrast chest CT with a cardiac field of view (the
lungs run off the left, right and back image edges), written as an ordinary CT series and
pushed with storescu. Orthanc must receive a lung SEG that matches the scan's reference
(Dice >= 0.95), an SR whose volume is the SEG's, and a key image at the mid-lung level.

Before issue 9 the node sent "Lungs 8.19 mL" drawn around stomach gas for this scan.
"""

from __future__ import annotations

import io

import highdicom as hd
import numpy as np
import pytest
from pydicom import dcmread

from tests.conftest import SHARED_DATA, requires_shared_data
from tests.dciodvfy import dciodvfy_errors
from tests.node_process import NODE_AE
from tests.peers import skip_unless_tools, storescu, storescu_failures, wait_for
from tests.synthetic import make_ct_series
from tests.test_end_to_end import COMPREHENSIVE_3D_SR, SECONDARY_CAPTURE, SEG, all_results_arrived, make_node

pytestmark = [pytest.mark.integration, pytest.mark.shared_data, requires_shared_data,
              skip_unless_tools("storescu", "/usr/sbin/Orthanc")]


def test_cardiac_field_of_view_chest_ct_gets_its_lungs(tmp_path, orthanc):
    from model_zoo.lung_ct_seg.data import load_case

    pixels, spacing, reference = load_case("cta_cardiac", SHARED_DATA)
    assert reference[:, :, 0].any() and reference[:, :, -1].any()  # the lungs touch both side edges
    series = make_ct_series(tmp_path / "ct", spacing=spacing, pixels=pixels, seed="cta-cardiac",
                            noise_hu=0.0)
    with make_node(tmp_path, orthanc) as node:
        assert not storescu_failures(storescu("127.0.0.1", node.port, tmp_path / "ct", NODE_AE))
        found = wait_for(lambda: all_results_arrived(orthanc, series.study_instance_uid), timeout=240,
                         what="SEG, SR and key image in Orthanc")
        detail = wait_for(lambda: (d := node.study(series.study_instance_uid))["jobs"]
                          and d["jobs"][0]["state"] == "done" and d, timeout=60, what="job done")

    assert all(check["passed"] for check in detail["jobs"][0]["quality_checks"])
    seg_bytes = orthanc.instance_file(found[SEG][0])
    (tmp_path / "seg.dcm").write_bytes(seg_bytes)
    assert dciodvfy_errors(tmp_path / "seg.dcm") == []
    seg = hd.seg.segread(io.BytesIO(seg_bytes))
    mask = seg.get_pixels_by_source_instance(series.sop_instance_uids)[..., 0].astype(bool)
    dice = 2 * (mask & reference).sum() / (mask.sum() + reference.sum())
    assert dice >= 0.95, f"lung Dice {dice:.3f} against the reference"

    voxel_ml = float(np.prod(spacing)) / 1000
    sr = hd.sr.srread(io.BytesIO(orthanc.instance_file(found[COMPREHENSIVE_3D_SR][0])))
    volumes = [m for group in sr.content.get_volumetric_roi_measurement_groups()
               for m in group.get_measurements() if m.name.value == "118565006"]
    assert volumes and volumes[0].value == pytest.approx(mask.sum() * voxel_ml, rel=1e-3)
    assert volumes[0].value > 1500  # about 1.9 litres of lung in the field of view, not 8 mL of gas

    key = dcmread(io.BytesIO(orthanc.instance_file(found[SECONDARY_CAPTURE][0])))
    shown = series.sop_instance_uids.index(key.SourceImageSequence[0].ReferencedSOPInstanceUID)
    area = mask.sum(axis=(1, 2))
    assert area[shown] == area.max()  # the key image is where the lungs are largest
