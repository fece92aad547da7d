"""A study for the OHIF viewer check (../shared/tools/viewer-check): a synthetic chest CT sent
through a real node into Orthanc; the source images and every result that arrived in Orthanc
are written to OUT, ready for check_viewer.sh.

    .venv/bin/python bench/viewer_study.py OUT [--model lung_ct_seg] [--slices 60] [--size 128]
        [--spacing 2.5 2.5 2.5] [--qc-fail send_flagged] [--case cta_cardiac]

--case: instead of the phantom, a real chest CT case of model_zoo/lung_ct_seg/data.py (from
../shared/data), e.g. cta_cardiac, the cardiac field of view of issue 9, or nsclc_lung1.

--model: any bundled model (ct_body_region: finding + saliency outline; ct_denoise: derived
series + noise measurements in a uniform region). --qc-fail: the rule's policy for a result
that fails the model's quality checks; e.g. `--slices 16 --size 64 --spacing 0.6 3.5 3.5
--qc-fail send_flagged` sends a 9.6 mm slab of chest whose ~57 mL of lung is below lung_ct_seg's
plausible volume, so its results arrive flagged "QC FAILED".

--with-prior: a follow-up study (issue 12 §4). A prior CT of the same patient, a year
earlier and with larger voxels, is put into Orthanc first; the rule asks for priors with
Orthanc as the source, so the node C-FINDs and C-MOVEs it and the SR reports the change.
Only the follow-up study (its images and results) is written to OUT.

--quirk: a case of the quirk corpus (tests/quirk_corpus.py, issue 18) instead, e.g.
frame_of_reference_per_slice, charset_iso2022_ir87, or gantry_tilt (refused before inference:
the "AI RESULT NOT PRODUCED" notice is the result); the rule asks for the notice.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pydicom import dcmread

from tests.node_process import NODE_AE, NodeProcess
from tests.peers import OrthancPeer, free_port, storescu, storescu_failures, wait_for
from tests.synthetic import make_ct_series

RUNNING = ("queued", "running", "encoding", "delivering")


PATIENT = "VIEWER-CHECK-PATIENT"
PRIORS = 'priors = { same_modality = true, within_days = 1095, max = 1 }\nsource = "pacs"\n'
CALLERS = '{ ae_title = "STORESCU" }, { ae_title = "ECHOSCU" }, { ae_title = "ORTHANC" }'


def rule(model: str, qc_fail: str | None, with_prior: bool, notice: bool = False) -> str:
    policy = f'qc_fail = "{qc_fail}"\n' if qc_fail else ""
    priors = PRIORS if with_prior else ""
    notice_line = "no_result_notice = true\n" if notice else ""
    return (f'[[rules]]\nname = "viewer-check"\npriority = 10\nmodels = ["{model}"]\ndestinations = ["pacs"]\n'
            f'{policy}{priors}{notice_line}when = {{ all = [ {{ tag = "Modality", equals = "CT" }} ] }}\n')


def put_prior(orthanc: OrthancPeer, folder: Path, args) -> None:
    """The patient's earlier CT, only in the PACS: a year before the phantom's 20240115, 10 % larger pixels."""
    spacing = (args.spacing[0], args.spacing[1] * 1.1, args.spacing[2] * 1.1)
    prior = make_ct_series(folder, shape=(args.slices, args.size, args.size), spacing=spacing,
                           seed="viewer-check-prior", patient_id=PATIENT)
    for path in prior.paths:
        ds = dcmread(path)
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = "20230110"
        ds.save_as(path, enforce_file_format=True)
        orthanc.upload(path)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--model", default="lung_ct_seg")
    parser.add_argument("--slices", type=int, default=60)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--spacing", type=float, nargs=3, default=(2.5, 2.5, 2.5))
    parser.add_argument("--qc-fail", choices=("hold", "send_flagged", "drop"))
    parser.add_argument("--case", help="a real chest CT case (model_zoo/lung_ct_seg/data.py CASES)")
    parser.add_argument("--with-prior", action="store_true", help="a follow-up whose prior is only in Orthanc")
    parser.add_argument("--quirk", help="a case of the quirk corpus (tests/quirk_corpus.py CASE_NAMES)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    storescu_args: tuple[str, ...] = ()
    with tempfile.TemporaryDirectory() as workdir:
        if args.quirk:
            from tests.conftest import SHARED_DATA
            from tests.quirk_corpus import make_quirk_corpus

            (case,) = make_quirk_corpus(Path(workdir) / "corpus", SHARED_DATA, [args.quirk])
            shutil.copytree(case.folder, Path(workdir) / "ct")
            series = SimpleNamespace(study_instance_uid=case.study_instance_uid,
                                     paths=sorted((Path(workdir) / "ct").iterdir()))
            storescu_args = case.storescu_args
        elif args.case:
            from model_zoo.lung_ct_seg.data import load_case

            pixels, spacing, _ = load_case(args.case)
            series = make_ct_series(Path(workdir) / "ct", spacing=spacing, pixels=pixels, seed=args.case)
        else:
            series = make_ct_series(Path(workdir) / "ct", shape=(args.slices, args.size, args.size),
                                    spacing=tuple(args.spacing), seed="viewer-check", patient_id=PATIENT)
        orthanc = OrthancPeer(workdir=Path(workdir) / "orthanc", node_port=free_port()).start()
        if args.with_prior:
            put_prior(orthanc, Path(workdir) / "prior", args)
        node = NodeProcess(Path(workdir) / "node", port=orthanc.node_port, destination_port=orthanc.dicom_port,
                           rules=rule(args.model, args.qc_fail, args.with_prior, notice=bool(args.quirk)),
                           quiet_period_s=5.0,
                           allowed_callers=CALLERS).start()
        try:
            failures = storescu_failures(storescu("127.0.0.1", node.port, Path(workdir) / "ct", NODE_AE,
                                                  extra_args=storescu_args))
            if failures:
                raise SystemExit(f"storescu failed: {failures[:3]}")
            def finished_jobs():  # done, held, dropped, failed ...: nothing more will arrive
                jobs = node.study(series.study_instance_uid)["jobs"]
                sending = any(d["state"] == "pending" for job in jobs for r in job["results"] for d in r["deliveries"])
                return jobs if jobs and not sending and all(job["state"] not in RUNNING for job in jobs) else None

            jobs = wait_for(finished_jobs, timeout=600, interval=1.0, what=f"the {args.model} job finished")
            print(", ".join(f"job {job['id']}: {job['state']} ({job.get('prior') or 'no prior asked'})"
                            for job in jobs))
            results = [i for i in orthanc.instances()  # of this study only (not the prior)
                       if orthanc.instance_tags(i).get("StudyInstanceUID") == series.study_instance_uid]
            for number, orthanc_id in enumerate(results):
                (args.out / f"result-{number:04d}.dcm").write_bytes(orthanc.instance_file(orthanc_id))
            for path in series.paths:  # the source images, as the scanner sent them
                (args.out / f"source-{path.name}").write_bytes(path.read_bytes())
        finally:
            node.stop()
            orthanc.stop()
    print(f"{len(list(args.out.glob('*.dcm')))} files in {args.out} (study {series.study_instance_uid})")


if __name__ == "__main__":
    main()
