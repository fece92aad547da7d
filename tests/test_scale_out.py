"""The scaled-out form with the real parts (issue 11 §3): separate processes started with the
command lines of README "Scaling out" (deploy/compose.yaml runs the same worker command beside one
``serve --role all``) — two receivers on two ports (``serve --role receiver``), one web/duties
process (``serve --role web``), three Celery workers (``worker``) — around a
PostgreSQL server and a RabbitMQ node of the test's own (tests/private_services.py, so they can
be restarted), shared storage by path, Orthanc as the PACS and dcmtk's storescu as the scanners.

Shown, in order: four studies sent at once to both receivers each get their results in Orthanc
exactly once; a worker SIGKILLed in the middle of a job (process group: as a host crash) → another
worker finishes it, once; RabbitMQ restarted while jobs are queued → all finish; PostgreSQL
restarted while a study arrives → every instance the receiver acknowledged is stored, and the
study (resent, as a scanner retries what failed) gets its results."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import func, select

from dicom_ai_node.db.engine import Database
from dicom_ai_node.db.models import (
    Delivery,
    Instance,
    Job,
    JobState,
    NodeProcess,
    ResultObject,
)
from tests import private_services
from tests.peers import (
    free_port,
    parse_storescu_output,
    skip_unless_tools,
    storescu,
    wait_for,
)
from tests.synthetic import make_ct_series
from tests.test_celery_executor import BUNDLED, GATED_MODEL

REPO = Path(__file__).resolve().parent.parent
NODE_AE = "DICOM_AI_NODE"
WAIT_S = 300  # the most one phase may take on a loaded 2-core machine (3 workers load torch)

pytestmark = [
    pytest.mark.integration,
    skip_unless_tools("storescu", "Orthanc"),
    pytest.mark.skipif(private_services.missing() is not None, reason=str(private_services.missing())),
]

RULES = """
[[rules]]
name = "chest-ct-lungs"
priority = 10
models = ["lung_ct_seg"]
destinations = ["pacs"]
qc_fail = "send_flagged"
when = { all = [ { tag = "Modality", equals = "CT" }, { tag = "BodyPartExamined", one_of = ["CHEST"] } ] }

[[rules]]
name = "abdomen-gated"
priority = 20
models = ["ct_body_region_gated"]
destinations = ["pacs"]
qc_fail = "send_flagged"
when = { all = [ { tag = "Modality", equals = "CT" }, { tag = "BodyPartExamined", one_of = ["ABDOMEN"] } ] }
"""


class ScaledOutNode:
    """The processes of the compose file, on one config file."""

    def __init__(self, folder: Path, database_url: str, broker_url: str, orthanc):
        self.folder = folder
        self.gate = folder / "gate"
        models = folder / "models" / "ct_body_region_gated"
        models.mkdir(parents=True)
        for file in ("model.py", "weights.pt"):
            shutil.copy(BUNDLED / file, models / file)
        manifest = (BUNDLED / "model.toml").read_text()
        manifest = manifest.replace('name = "ct_body_region"', 'name = "ct_body_region_gated"', 1)
        manifest = manifest.replace('entry = "model:BodyRegionClassifier"', 'entry = "gated:GatedBodyRegion"', 1)
        manifest += f'\n[model.options]\nstarted = "{folder}"\ngate = "{self.gate}"\n'
        (models / "model.toml").write_text(manifest)
        (models / "gated.py").write_text(GATED_MODEL)
        self.receiver_ports = [free_port(), free_port()]
        self.config = folder / "config.toml"
        self.config.write_text(f"""
[node]
ae_title = "{NODE_AE}"
host = "127.0.0.1"
port = {self.receiver_ports[0]}
storage_dir = "{folder / 'shared-storage'}"
allow_any_caller = true
min_free_disk_mb = 0
release_grace_s = 0.5

[database]
url = "{database_url}"

[completion]
quiet_period_s = 2

[workers]
executor = "celery"
broker_url = "{broker_url}"
requeue_after_s = 5

[models]
paths = ["{folder / 'models'}"]

[web]
host = "127.0.0.1"
port = {free_port()}

[[destinations]]
name = "pacs"
ae_title = "{orthanc.aet}"
host = "127.0.0.1"
port = {orthanc.dicom_port}
max_attempts = 20
backoff_s = 0.5
timeout_s = 10
{RULES}
""")
        self.database = Database(database_url)
        self.processes: dict[str, subprocess.Popen] = {}

    def start(self, name: str, *args: str) -> None:
        with open(self.folder / f"{name}.log", "ab") as log:
            self.processes[name] = subprocess.Popen(
                [sys.executable, "-m", "dicom_ai_node.cli", "--config", str(self.config), *args],
                cwd=self.folder, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def start_all(self) -> None:
        self.start("web", "serve", "--role", "web")  # migrates the empty database first
        self.wait(lambda: self._leader() is not None, "a leader")
        for number, port in enumerate(self.receiver_ports):
            self.start(f"receiver{number}", "serve", "--role", "receiver", "--port", str(port))
        for number in range(3):
            self.start(f"worker{number}", "worker", "--queues", "cpu,any", "--concurrency", "1")
        self.wait(lambda: self._count(NodeProcess.name) == 6 and self._listening(),
                  "6 processes registered and both receivers listening")

    def wait(self, predicate, what: str):
        """``predicate``'s first truthy value, checked until WAIT_S; the processes' logs if not."""
        deadline = time.monotonic() + WAIT_S
        while not (value := predicate()):
            if time.monotonic() > deadline:
                pytest.fail(f"not within {WAIT_S} s: {what}\n{self.logs()}")
            self.check_alive()
            time.sleep(0.2)
        return value

    def _listening(self) -> bool:
        from tests.peers import _port_open

        return all(_port_open("127.0.0.1", port) for port in self.receiver_ports)

    def _leader(self):
        from dicom_ai_node.db.models import LeaderLease

        try:
            with self.database.session() as session:
                return session.scalar(select(LeaderLease.holder))
        except Exception:  # noqa: BLE001 - not migrated yet
            return None

    def _count(self, column, *where) -> int:
        with self.database.session() as session:
            return session.scalar(select(func.count(column)).where(*where))

    def cli_rc(self, *args: str) -> int:
        return subprocess.run([sys.executable, "-m", "dicom_ai_node.cli", "--config", str(self.config), *args],
                              cwd=self.folder, capture_output=True, timeout=120, check=False).returncode

    def cli(self, *args: str) -> str:
        return subprocess.run([sys.executable, "-m", "dicom_ai_node.cli", "--config", str(self.config), *args],
                              cwd=self.folder, capture_output=True, text=True, timeout=120, check=True).stdout

    def kill(self, name: str) -> None:
        """SIGKILL the process and its children (a worker's pool) at once, as a host crash would."""
        process = self.processes.pop(name)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)

    def check_alive(self) -> None:
        for name, process in self.processes.items():
            assert process.poll() is None, f"{name} exited with {process.returncode}\n{self.logs()}"

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes.values():
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(process.pid, signal.SIGKILL)  # whatever is left of its group
            except ProcessLookupError:
                pass
            process.wait(timeout=30)
        self.database.dispose()

    def logs(self, lines: int = 25) -> str:
        return "\n".join(f"--- {path.name}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
                         for path in sorted(self.folder.glob("*.log")))

    def jobs_of(self, study_uid: str) -> list[Job]:
        with self.database.session() as session:
            jobs = session.scalars(select(Job).where(Job.study_instance_uid == study_uid)).all()
            session.expunge_all()
        return list(jobs)

    def result_uids(self, study_uid: str) -> set[str]:
        with self.database.session() as session:
            return set(session.scalars(select(ResultObject.sop_instance_uid).join(Job)
                                       .where(Job.study_instance_uid == study_uid)))

    def deliveries(self, study_uid: str) -> list[tuple[str, int]]:
        with self.database.session() as session:
            return [(state.value if hasattr(state, "value") else state, attempts) for state, attempts in session.execute(
                select(Delivery.state, Delivery.attempts).join(ResultObject).join(Job)
                .where(Job.study_instance_uid == study_uid))]


def results_in_orthanc(orthanc, study_uid: str) -> set[str]:
    """SOP Instance UIDs of the study in Orthanc that are not the study's own CT images."""
    found = set()
    for series in orthanc.study_series(study_uid):
        if series.get("MainDicomTags", {}).get("Modality") == "CT":
            continue
        for orthanc_id in series.get("Instances", []):
            found.add(orthanc.instance_tags(orthanc_id)["SOPInstanceUID"])
    return found


def delivered_once(node: ScaledOutNode, orthanc, study_uid: str) -> bool:
    """Every job of the study finished, its results all in Orthanc and nothing else there."""
    jobs = node.jobs_of(study_uid)
    if not jobs or any(job.state != JobState.done for job in jobs):
        return False
    return results_in_orthanc(orthanc, study_uid) == node.result_uids(study_uid) != set()


def wait_delivered(node: ScaledOutNode, orthanc, study_uids: list[str], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not all(delivered_once(node, orthanc, uid) for uid in study_uids):
        if time.monotonic() > deadline:
            states = {uid: [(j.model_name, j.state.value, j.reason) for j in node.jobs_of(uid)] for uid in study_uids}
            pytest.fail(f"not within {WAIT_S} s: {what}; jobs: {states}\n{node.logs()}")
        node.check_alive()
        time.sleep(0.5)


def assert_sent_once(node: ScaledOutNode, orthanc, study_uid: str) -> None:
    jobs = node.jobs_of(study_uid)
    # one job per (series, model): routed once although two receivers and the web process ran
    assert len({(job.series_instance_uid, job.model_name) for job in jobs}) == len(jobs)
    deliveries = node.deliveries(study_uid)
    assert deliveries and all(state == "sent" for state, _ in deliveries), deliveries
    assert all(attempts == 1 for _, attempts in deliveries), f"a result was sent more than once: {deliveries}"
    assert results_in_orthanc(orthanc, study_uid) == node.result_uids(study_uid)


def send(port: int, folder: Path, outcomes: dict, key: str) -> None:
    outcomes[key] = storescu("127.0.0.1", port, folder, NODE_AE, timeout=240)


@pytest.fixture
def services(tmp_path_factory):
    folder = tmp_path_factory.mktemp("services")
    postgres = private_services.PrivatePostgres()
    rabbitmq = private_services.PrivateRabbitMQ(folder / "rabbitmq")
    try:
        postgres.start()
        rabbitmq.start()
        yield postgres, rabbitmq
    finally:
        rabbitmq.stop()
        postgres.stop()


def test_the_scaled_out_node_survives_workers_broker_and_database_going_away(tmp_path, orthanc, services):
    postgres, rabbitmq = services
    node = ScaledOutNode(tmp_path / "node", postgres.url, rabbitmq.url, orthanc)
    try:
        node.start_all()

        # 1. four studies at once, two to each receiver: each study's results in Orthanc exactly once
        studies = [make_ct_series(tmp_path / f"study{n}", shape=(40, 96, 96), spacing=(2.5, 3.5, 3.5),
                                  seed=f"scale-out-{n}", patient_id=f"SCALE-{n}") for n in range(4)]
        outcomes: dict = {}
        senders = [threading.Thread(target=send, args=(node.receiver_ports[n % 2], tmp_path / f"study{n}",
                                                       outcomes, n)) for n in range(4)]
        for sender in senders:
            sender.start()
        for sender in senders:
            sender.join(timeout=300)
        for n in range(4):
            sent = parse_storescu_output(outcomes[n].stdout + outcomes[n].stderr)
            assert len(sent) == 40 and all(o.ok for o in sent), outcomes[n].stdout[-2000:]
        uids = [study.study_instance_uid for study in studies]
        wait_delivered(node, orthanc, uids, "four studies' results in Orthanc")
        for uid in uids:
            assert_sent_once(node, orthanc, uid)
        with node.database.session() as session:
            workers = set(session.scalars(select(Job.claimed_by).where(Job.study_instance_uid.in_(uids))))
            roles = sorted(session.scalars(select(NodeProcess.role)))
        assert all(name and "/worker:" in name for name in workers), workers  # run by workers, not the web process
        assert roles == ["receiver", "receiver", "web", "worker", "worker", "worker"]
        listing = node.cli("processes")
        assert listing.count(" alive ") == 6 and listing.count("(leader)") == 1 and "/web:" in listing.split(
            "(leader)")[0].splitlines()[-1]
        assert node.cli_rc("processes", "--check-here", "worker") == 0  # the compose worker's health check

        # 2. a worker killed in the middle of a job: another worker finishes it, once
        gated = make_ct_series(tmp_path / "gated", shape=(40, 96, 96), spacing=(2.5, 3.5, 3.5), seed="gated",
                               patient_id="SCALE-G", body_part="ABDOMEN")
        storescu("127.0.0.1", node.receiver_ports[0], tmp_path / "gated", NODE_AE, check=True)
        running = node.wait(lambda: [j for j in node.jobs_of(gated.study_instance_uid)
                                     if j.state == JobState.running and list(tmp_path.glob("node/started-*"))],
                            "the gated job running")
        claimed_by = running[0].claimed_by
        victim = next(name for name, process in node.processes.items()
                      if name.startswith("worker") and claimed_by.endswith(f"/worker:{process.pid}"))
        node.kill(victim)
        node.gate.touch()
        wait_delivered(node, orthanc, [gated.study_instance_uid], "the killed worker's job finished by another")
        (job,) = node.jobs_of(gated.study_instance_uid)
        assert job.attempts == 2 and job.claimed_by != claimed_by
        assert_sent_once(node, orthanc, gated.study_instance_uid)
        node.start(victim, "worker", "--queues", "cpu,any", "--concurrency", "1")  # back to three

        # 3. RabbitMQ restarted while jobs are queued: all finish
        node.gate.unlink()  # the gated jobs wait, so they are queued or running when the broker goes
        queued = [make_ct_series(tmp_path / f"queued{n}", shape=(40, 96, 96), spacing=(2.5, 3.5, 3.5),
                                 seed=f"queued-{n}", patient_id=f"SCALE-Q{n}", body_part="ABDOMEN") for n in range(2)]
        for n in range(2):
            storescu("127.0.0.1", node.receiver_ports[n], tmp_path / f"queued{n}", NODE_AE, check=True)
        node.wait(lambda: all(node.jobs_of(s.study_instance_uid) for s in queued), "jobs for the two studies")
        rabbitmq.restart()
        node.gate.touch()
        wait_delivered(node, orthanc, [s.study_instance_uid for s in queued], "jobs queued across a broker restart")
        for study in queued:
            assert_sent_once(node, orthanc, study.study_instance_uid)

        # 4. PostgreSQL restarted while a study arrives: nothing acknowledged is lost
        arriving = make_ct_series(tmp_path / "arriving", shape=(60, 96, 96), spacing=(2.5, 3.5, 3.5),
                                  seed="arriving", patient_id="SCALE-P")
        outcomes = {}
        sender = threading.Thread(target=send, args=(node.receiver_ports[1], tmp_path / "arriving", outcomes, "p"))
        sender.start()
        wait_for(lambda: node._count(Instance.sop_instance_uid, Instance.series_instance_uid
                                     == arriving.series_instance_uid) >= 5, timeout=WAIT_S, interval=0.02,
                 what="the study arriving")
        postgres.restart()
        sender.join(timeout=300)
        stored = parse_storescu_output(outcomes["p"].stdout + outcomes["p"].stderr)
        acknowledged = {Path(o.path).name for o in stored if o.ok}
        assert len(stored) == 60
        with node.database.session() as session:
            rows = {Path(p).name: p for p in session.scalars(select(Instance.path).where(
                Instance.series_instance_uid == arriving.series_instance_uid))}
        by_file = {Path(path).name: uid for path, uid in zip(arriving.paths, arriving.sop_instance_uids)}
        missing = [name for name in acknowledged if f"{by_file[name]}.dcm" not in rows]
        assert not missing, f"acknowledged but not indexed: {missing}"
        storage = tmp_path / "node" / "shared-storage"
        assert all((storage / rows[f"{by_file[name]}.dcm"]).is_file() for name in acknowledged)
        # the scanner resends what was refused during the outage; the whole series then gets its
        # results (a job on the part that came first may have run meanwhile, or been superseded)
        storescu("127.0.0.1", node.receiver_ports[1], tmp_path / "arriving", NODE_AE, check=True)
        whole = node.wait(lambda: [j for j in node.jobs_of(arriving.study_instance_uid)
                                   if j.input_count == 60 and j.state == JobState.done], "a job on the whole series done")
        with node.database.session() as session:
            results = set(session.scalars(select(ResultObject.sop_instance_uid)
                                          .where(ResultObject.job_id == whole[0].id)))
        assert results and results <= results_in_orthanc(orthanc, arriving.study_instance_uid)
        assert all(attempts == 1 for _, attempts in node.deliveries(arriving.study_instance_uid))
        node.check_alive()  # every process reconnected by itself
    finally:
        node.stop()


def test_a_node_started_before_its_database_waits_for_it(tmp_path):
    """compose/systemd may start the node before PostgreSQL accepts connections: it waits
    (bounded) instead of exiting, and starts once the database is up."""
    postgres = private_services.PrivatePostgres()
    port = free_port()
    (tmp_path / "config.toml").write_text(f"""
[node]
port = {port}
host = "127.0.0.1"
storage_dir = "storage"
allow_any_caller = true

[database]
url = "{postgres.url}"

[web]
enabled = false
""")
    log_path = tmp_path / "node.log"
    with open(log_path, "wb") as log:
        node = subprocess.Popen([sys.executable, "-m", "dicom_ai_node.cli", "--config", str(tmp_path / "config.toml"),
                                 "serve"], cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(lambda: "database not reachable yet" in log_path.read_text(errors="replace"), timeout=60,
                 what="the node saying it waits for the database")
        assert node.poll() is None
        postgres.start()
        wait_for(lambda: "node ready" in log_path.read_text(errors="replace"), timeout=120,
                 what=f"the node ready once PostgreSQL is up\n{log_path.read_text(errors='replace')[-3000:]}")
        assert node.poll() is None
    finally:
        node.send_signal(signal.SIGTERM)
        try:
            node.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(node.pid, signal.SIGKILL)
            node.wait(timeout=30)
        postgres.stop()
