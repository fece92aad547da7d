"""Helpers for the web tests: the web app in-process on a temp SQLite database, users with
each role, and a stored study (with a <script> patient name) that has jobs, results and
deliveries in every interesting state."""

from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient

from dicom_ai_node.config import load_config
from dicom_ai_node.db.engine import Database
from dicom_ai_node.db.models import (Delivery, Instance, Job, JobState, ResultObject, Series, Study,
                                     utcnow)
from dicom_ai_node.deliver.destinations import DestinationStore
from dicom_ai_node.models import ModelRegistry
from dicom_ai_node.router import RuleStore
from dicom_ai_node.web import users
from dicom_ai_node.web.app import create_app
from dicom_ai_node.web.context import WebContext

# scrypt at the production cost takes ~0.6 s a hash; the web tests log in hundreds of times.
# tests/test_user_management.py checks the production cost itself.
users.use_cheap_hashes_for_tests(users.ScryptCost(2**10, 8, 1))

PASSWORD = "correct horse battery"
EVIL = "<script>alert('pwned')</script>"
STUDY = "1.2.826.0.1.3680043.8.498.1"
SERIES = "1.2.826.0.1.3680043.8.498.1.1"

RULES = """
[[rules]]
name = "chest-ct-lungs"
priority = 10
models = ["lung_ct_seg"]
destinations = ["pacs"]
[rules.when]
all = [{ tag = "Modality", equals = "CT" }]
[rules.series]
min_slices = 2
"""


def write_config(folder: Path, destination_port: int = 1) -> Path:
    path = folder / "config.toml"
    path.write_text(f"""
[node]
ae_title = "AI_NODE"
storage_dir = "storage"
allow_any_caller = true

[database]
url = "sqlite:///{folder / 'node.db'}"

[[destinations]]
name = "pacs"
ae_title = "ORTHANC"
host = "127.0.0.1"
port = {destination_port}
timeout_s = 2
""")
    return path


class Web:
    """The app, its context and a way to get clients logged in as admin or viewer."""

    def __init__(self, folder: Path):
        config = load_config(write_config(folder))
        self.database = Database(config.database_url)
        self.database.upgrade()
        self.destinations = DestinationStore(self.database)
        self.destinations.seed_from_config(config.destinations)
        self.rules = RuleStore(self.database)
        with self.database.session() as session:
            self.rules.save(session, RULES.strip() + "\n", author="config")
            users.create_user(session, "alice", PASSWORD, "admin", actor="test")
            users.create_user(session, "victor", PASSWORD, "viewer", actor="test")
            self.admin_token = users.create_token(session, "alice", "tests", actor="test")
            self.viewer_token = users.create_token(session, "victor", "tests", actor="test")
        self.submitted: list[int] = []
        self.kicks = 0
        self.context = WebContext(config=config, database=self.database, rules=self.rules,
                                  models=ModelRegistry(), destinations=self.destinations, secret=b"k" * 32,
                                  submit_job=self.submitted.append, kick_outbox=self._kick)
        self.app = create_app(self.context)

    def _kick(self):
        self.kicks += 1

    def client(self, token: str | None = None) -> TestClient:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return TestClient(self.app, headers=headers, follow_redirects=False)

    def login(self, name: str = "alice") -> TestClient:
        client = self.client()
        page = client.get("/login")
        csrf = page.text.split('name="csrf_token" value="')[1].split('"')[0]
        answer = client.post("/login", data={"name": name, "password": PASSWORD, "csrf_token": csrf})
        assert answer.status_code == 303 and answer.headers["location"] == "/", answer.text
        return client


def csrf_of(client: TestClient, path: str = "/") -> str:
    return client.get(path).text.split('name="csrf_token" value="')[1].split('"')[0]


def store_study(database: Database, storage: Path) -> dict[str, int]:
    """A complete CT study of 3 slices with: a failed job whose delivery failed (results
    exist), a failed job without results, a queued job; returns their ids."""
    ids = {}
    with database.session() as session:
        session.add(Study(study_instance_uid=STUDY, patient_id="P1", patient_name=EVIL, study_date="20240101",
                          study_description=f"CHEST {EVIL}", state="complete", completed_at=utcnow()))
        session.add(Series(series_instance_uid=SERIES, study_instance_uid=STUDY, modality="CT", series_number=1,
                           series_description=EVIL, attributes={"Modality": "CT", "SeriesDescription": EVIL}))
        for i in range(3):
            session.add(Instance(sop_instance_uid=f"{SERIES}.{i}", series_instance_uid=SERIES,
                                 sop_class_uid="1.2.840.10008.5.1.4.1.1.2", transfer_syntax_uid="1.2.840.10008.1.2.1",
                                 instance_number=i + 1, path=f"x/{i}.dcm", size_bytes=1000, calling_ae_title="STORESCU"))
        session.flush()  # parents before the jobs that refer to them
        delivered = Job(study_instance_uid=STUDY, series_instance_uid=SERIES, model_name="lung_ct_seg",
                        rule_name="chest-ct-lungs", destinations=["pacs"], input_fingerprint="a", input_count=3,
                        state=JobState.failed, reason="1 result object(s) not delivered to pacs: refused",
                        started_at=utcnow(), finished_at=utcnow(), timings={"load_s": 1.0, "inference_s": 2.0})
        session.add(delivered)
        session.flush()
        (storage / "results").mkdir(parents=True, exist_ok=True)
        (storage / "results" / "seg.dcm").write_bytes(b"\0" * 128 + b"DICM")
        result = ResultObject(job_id=delivered.id, kind="seg", sop_instance_uid=f"{SERIES}.99",
                              sop_class_uid="1.2.840.10008.5.1.4.1.1.66.4", series_instance_uid=f"{SERIES}.9",
                              path="results/seg.dcm")
        result.deliveries.append(Delivery(destination="pacs", state="failed", attempts=3, last_error=EVIL))
        session.add(result)
        crashed = Job(study_instance_uid=STUDY, series_instance_uid=SERIES, model_name="lung_ct_seg",
                      rule_name="chest-ct-lungs", destinations=["pacs"], input_fingerprint="b", input_count=3,
                      state=JobState.failed, reason="model error", attempts=1, finished_at=utcnow())
        queued = Job(study_instance_uid=STUDY, series_instance_uid=SERIES, model_name="lung_ct_seg",
                     rule_name="chest-ct-lungs", destinations=["pacs"], input_fingerprint="c", input_count=3,
                     state=JobState.queued)
        session.add_all([crashed, queued])
        session.flush()
        ids.update(delivered=delivered.id, crashed=crashed.id, queued=queued.id, result=result.id,
                   delivery=result.deliveries[0].id)
    return ids


HELD_SERIES = "1.2.826.0.1.3680043.8.498.1.2"


def store_held_job(database: Database, storage: Path, study: str = STUDY) -> dict[str, int]:
    """A job on ``study`` (stored already) whose result failed its quality checks under policy
    hold: a stored SEG and a real 8-bit RGB Secondary Capture key image, no deliveries, one
    failed and one passed check. Returns the job's and the results' ids."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage

    from dicom_ai_node.db.models import QualityCheck
    from dicom_ai_node.storage import Storage

    with database.session() as session:
        job = Job(study_instance_uid=study, series_instance_uid=SERIES, model_name="lung_ct_seg",
                  rule_name="chest-ct-lungs", destinations=["pacs"], input_fingerprint="held", input_count=3,
                  state=JobState.held, qc_policy="hold", started_at=utcnow(), model_version="1.1.0",
                  reason="held for review: lung volume 39.3 mL is below the plausible range 100 to 12000 mL")
        session.add(job)
        session.flush()
        session.add_all([
            QualityCheck(job_id=job.id, name="lung volume", value=39.3, low=100.0, high=12000.0, unit="mL",
                         passed=False, message="lung volume 39.3 mL is below the plausible range 100 to 12000 mL"),
            QualityCheck(job_id=job.id, name="mean_attenuation on lung", value=-565.0, low=-1000.0, high=-500.0,
                         unit="HU", passed=True,
                         message="mean_attenuation on lung -565 HU is within the plausible range -1000 to -500 HU")])
        files = Storage(storage)
        image_uid, seg_uid = f"{HELD_SERIES}.1", f"{HELD_SERIES}.2"
        image = Dataset()
        image.SOPClassUID, image.SOPInstanceUID = SecondaryCaptureImageStorage, image_uid
        image.Rows, image.Columns, image.SamplesPerPixel, image.PhotometricInterpretation = 4, 6, 3, "RGB"
        image.BitsAllocated, image.BitsStored, image.HighBit, image.PixelRepresentation = 8, 8, 7, 0
        image.PlanarConfiguration = 0
        image.PixelData = bytes(range(4 * 6 * 3))
        image.file_meta = FileMetaDataset()
        image.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        image.file_meta.MediaStorageSOPClassUID, image.file_meta.MediaStorageSOPInstanceUID = image.SOPClassUID, image_uid
        key_path = files.result_path(job.id, image_uid)
        files.absolute(key_path).parent.mkdir(parents=True, exist_ok=True)
        image.save_as(files.absolute(key_path), enforce_file_format=True)
        key_image = ResultObject(job_id=job.id, kind="key_image", sop_instance_uid=image_uid,
                                 sop_class_uid=SecondaryCaptureImageStorage, series_instance_uid=HELD_SERIES,
                                 path=key_path)
        seg = ResultObject(job_id=job.id, kind="seg", sop_instance_uid=seg_uid, sop_class_uid="1.2.840.10008.5.1.4.1.1.66.4",
                           series_instance_uid=f"{HELD_SERIES}.9", path=files.result_path(job.id, seg_uid))
        session.add_all([key_image, seg])
        session.flush()
        return {"held": job.id, "key_image": key_image.id, "held_seg": seg.id}
