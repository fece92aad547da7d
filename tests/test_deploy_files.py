"""The deploy files (deploy/): each checked by the real tool for its format where one is on the
machine or in the test extras, plus the properties the node needs from it.

- compose.yaml: `docker-compose config` (Debian's docker-compose 1.29, or the Compose v2 plugin)
  validates it against the Compose schema; PyYAML checks what the node needs (published ports,
  health checks, start order, restart, pinned images), that the worker service scales
  (`--scale worker=N`), that its health check command works against a real database, and that
  RabbitMQ (the machine's rabbitmq-server) takes the consumer_timeout the file sets.
- Dockerfile: parsed by dockerfile-parse (non-root USER, HEALTHCHECK, constraints.txt, CPU torch
  with a build argument for CUDA).
- config files: read by the node's own load_config (listens where it must, storage, database).
- systemd: `systemd-analyze verify` and `security --offline` on the node and worker units as
  install.sh installs them; install.sh itself runs twice into a temporary root (`--root`, `--no-pip`).
- Helm chart: rendered and linted by Helm's Go library (helm-python-sdk), the manifests
  validated by kubernetes-validate against the Kubernetes schemas.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from dicom_ai_node.config import load_config
from tests import private_services

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
CHART = DEPLOY / "helm" / "dicom-ai-node"
KUBERNETES_VERSION = "1.33.0"
COMPOSE_ENV = {"POSTGRES_PASSWORD": "test-password", "RABBITMQ_PASSWORD": "test-broker-password",
               "ORTHANC_PASSWORD": "test-password"}
CONTAINER_CONFIG = "/etc/dicom-ai-node/config.toml"
SERVICE_ENV = ("DICOM_AI_NODE_DATABASE_URL", "DICOM_AI_NODE_BROKER_URL", "DICOM_AI_NODE_STORAGE_DIR")


# --- compose.yaml -----------------------------------------------------------------------------

def _compose_command() -> list[str] | None:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], check=False,
                                                 capture_output=True).returncode == 0:
        return ["docker", "compose"]
    return None


def _compose_config(*extra: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    command = _compose_command()
    if command is None:
        pytest.skip("no Compose validator: apt-get install docker-compose (Debian's v1.29 package)")
    environment = {key: value for key, value in os.environ.items()
                   if key not in COMPOSE_ENV and not key.startswith("COMPOSE_")}
    environment.update(env if env is not None else COMPOSE_ENV)
    return subprocess.run([*command, "-f", str(DEPLOY / "compose.yaml"), *extra, "config"],
                          check=False, cwd=DEPLOY, env=environment, capture_output=True, text=True, timeout=60)


def test_compose_file_is_valid_for_docker_compose():
    result = _compose_config()
    assert result.returncode == 0, result.stderr
    resolved = yaml.safe_load(result.stdout)
    assert set(resolved["services"]) == {"node", "worker", "postgres", "orthanc", "rabbitmq"}
    for name in ("node", "worker"):  # both from deploy/.env, into the same URLs
        environment = resolved["services"][name]["environment"]
        assert environment == {
            "DICOM_AI_NODE_DATABASE_URL": "postgresql://dicomai:test-password@postgres:5432/dicomai",
            "DICOM_AI_NODE_BROKER_URL": "amqp://dicomai:test-broker-password@rabbitmq:5672//"}, name
    rabbitmq = resolved["services"]["rabbitmq"]["environment"]
    assert (rabbitmq["RABBITMQ_DEFAULT_USER"], rabbitmq["RABBITMQ_DEFAULT_PASS"]) == ("dicomai", "test-broker-password")


@pytest.mark.parametrize("missing", ["POSTGRES_PASSWORD", "RABBITMQ_PASSWORD"])
def test_compose_refuses_to_start_without_the_passwords(missing):
    result = _compose_config(env={key: value for key, value in COMPOSE_ENV.items() if key != missing})
    assert result.returncode != 0
    assert missing in result.stderr


def test_compose_validator_rejects_a_broken_file(tmp_path):
    """The validator is not a rubber stamp: the same file with a wrong depends_on condition fails."""
    command = _compose_command()
    if command is None:
        pytest.skip("no Compose validator: apt-get install docker-compose (Debian's v1.29 package)")
    broken = tmp_path / "compose.yaml"
    broken.write_text((DEPLOY / "compose.yaml").read_text().replace(
        "condition: service_healthy", "condition: service_ready", 1))
    result = subprocess.run([*command, "-f", str(broken), "config"], check=False, cwd=tmp_path, capture_output=True,
                            text=True, timeout=60, env={**os.environ, **COMPOSE_ENV})
    assert result.returncode != 0
    assert "condition" in result.stderr


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def test_compose_services_start_in_order_restart_and_pin_their_images(compose):
    services = compose["services"]
    assert set(services) == {"node", "worker", "postgres", "orthanc", "rabbitmq"}
    for name, service in services.items():
        assert service["restart"] == "unless-stopped", name
        test = service["healthcheck"]["test"]
        assert test[0] == "CMD" and len(test) > 1, name
        image = service["image"]
        repository, _, tag = image.rpartition(":")
        assert repository and re.fullmatch(r"\d+(\.\d+){1,2}(-[a-z0-9.]+)?", tag), f"{name}: {image} not pinned"
    node = services["node"]
    assert node["depends_on"] == {"postgres": {"condition": "service_healthy"},
                                  "rabbitmq": {"condition": "service_healthy"},
                                  "orthanc": {"condition": "service_healthy"}}
    assert "healthz" in " ".join(node["healthcheck"]["test"])
    for name, service in services.items():  # every service starts with a plain `up`
        assert "profiles" not in service, name


def test_compose_worker_service_runs_scalable_celery_workers_after_the_node(compose):
    node, worker = compose["services"]["node"], compose["services"]["worker"]
    assert worker["command"] == ["dicom-ai-node", "--config", CONTAINER_CONFIG, "worker",
                                 "--queues", "cpu,any", "--concurrency", "1"]
    assert worker["image"] == node["image"] and worker["build"] == node["build"]  # the same image
    assert worker["environment"] == node["environment"] and worker["volumes"] == node["volumes"]
    assert worker["depends_on"] == {"postgres": {"condition": "service_healthy"},
                                    "rabbitmq": {"condition": "service_healthy"},
                                    "node": {"condition": "service_healthy"}}  # the node migrates first
    assert worker["healthcheck"]["test"] == ["CMD", "dicom-ai-node", "--config", CONTAINER_CONFIG,
                                             "processes", "--check-here", "worker"]
    assert worker["restart"] == "unless-stopped" and worker["init"] is True
    # --scale worker=N: N containers, so no fixed name and no host port they would all claim
    assert not {"container_name", "ports", "hostname"} & set(worker)
    # a stopping worker may finish its job (Celery's warm shutdown): the longest job, plus the
    # hard time limit's 60 s
    config = _compose_node_config()
    grace = worker["stop_grace_period"]
    assert re.fullmatch(r"\d+s", grace) and int(grace[:-1]) >= config.celery.job_timeout_s + 60


def test_compose_rabbitmq_allows_a_job_as_long_as_the_job_timeout(compose):
    """RabbitMQ closes a consumer that holds a message longer than consumer_timeout; a job's
    message is acknowledged only after the job."""
    rabbitmq = compose["services"]["rabbitmq"]
    match = re.fullmatch(r"-rabbit consumer_timeout (\d+)",
                         rabbitmq["environment"]["RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS"])
    assert match
    assert int(match.group(1)) > (_compose_node_config().celery.job_timeout_s + 60) * 1000
    assert rabbitmq["hostname"] == "rabbitmq"  # its data folder is named after the host
    assert "rabbitmq-data:/var/lib/rabbitmq" in rabbitmq["volumes"]


@pytest.mark.integration
@pytest.mark.skipif(private_services.missing() is not None, reason=str(private_services.missing()))
def test_rabbitmq_takes_the_consumer_timeout_of_the_compose_file(compose, tmp_path, monkeypatch):
    """The compose file's RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS on a real rabbitmq-server (the
    machine's, 3.10; the image's 3.13 starts the server with the same script variable)."""
    erl_args = compose["services"]["rabbitmq"]["environment"]["RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS"]
    monkeypatch.setenv("RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS", erl_args)
    rabbitmq = private_services.PrivateRabbitMQ(tmp_path / "rabbitmq").start()
    try:
        environment = {**os.environ, "HOME": str(rabbitmq.folder), "ERL_EPMD_ADDRESS": "127.0.0.1"}
        result = subprocess.run([str(Path(private_services.RABBITMQ_SERVER).with_name("rabbitmqctl")),
                                 "-n", rabbitmq.node, "eval", "application:get_env(rabbit, consumer_timeout)."],
                                check=False, capture_output=True, text=True, timeout=120, env=environment)
    finally:
        rabbitmq.stop()
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == f"{{ok,{erl_args.split()[-1]}}}"  # not the default 1800000


def test_compose_publishes_dicom_and_web_and_mounts_a_config_that_listens_on_all_interfaces(compose):
    node = compose["services"]["node"]
    assert "11112:11112" in node["ports"]
    assert "127.0.0.1:8080:8080" in node["ports"]  # the web page: host loopback, behind a proxy
    mount = "./config.compose.toml:/etc/dicom-ai-node/config.toml:ro"
    assert mount in node["volumes"]
    assert node["command"] == ["dicom-ai-node", "--config", CONTAINER_CONFIG, "serve", "--role", "all"]


def _compose_node_config():
    """config.compose.toml as the node reads it, without this machine's environment."""
    saved = {key: os.environ.pop(key) for key in SERVICE_ENV if key in os.environ}
    try:
        return load_config(DEPLOY / "config.compose.toml")
    finally:
        os.environ.update(saved)


def test_container_config_listens_on_all_interfaces_and_uses_postgresql(monkeypatch):
    for key in SERVICE_ENV:
        monkeypatch.delenv(key, raising=False)
    config = load_config(DEPLOY / "config.compose.toml")
    assert (config.node.host, config.node.port) == ("0.0.0.0", 11112)
    assert (config.web.host, config.web.port, config.web.enabled) == ("0.0.0.0", 8080, True)
    assert config.database_url.startswith("postgresql://") and "@postgres:5432/" in config.database_url
    assert config.node.storage_dir == Path("/data/storage")
    assert [d.host for d in config.destinations] == ["orthanc"]


def test_container_config_sends_jobs_to_celery_with_the_broker_password_from_the_environment(monkeypatch):
    for key in SERVICE_ENV:
        monkeypatch.delenv(key, raising=False)
    config = load_config(DEPLOY / "config.compose.toml")
    assert config.executor == "celery"
    assert config.celery.broker_url == "amqp://dicomai@rabbitmq:5672//"  # no password in the file
    assert config.celery.job_timeout_s == 1500
    monkeypatch.setenv("DICOM_AI_NODE_BROKER_URL", "amqp://dicomai:s3cret@rabbitmq:5672//")
    assert load_config(DEPLOY / "config.compose.toml").celery.broker_url == "amqp://dicomai:s3cret@rabbitmq:5672//"


def test_compose_worker_health_check_passes_only_while_a_worker_here_beats(compose, tmp_path):
    """The worker service's health check command line, run as the container runs it, against a
    real database: unhealthy before the schema exists and with no worker, healthy while a worker
    process of this host beats, unhealthy when only a worker of another host does."""
    from dicom_ai_node import cluster
    from dicom_ai_node.db.engine import Database

    test = compose["services"]["worker"]["healthcheck"]["test"]
    config_at = test.index(CONTAINER_CONFIG)
    command = [str(ROOT / ".venv/bin" / test[1]) if (ROOT / ".venv/bin" / test[1]).exists() else test[1],
               *test[2:config_at], str(DEPLOY / "config.compose.toml"), *test[config_at + 1:]]
    url = f"sqlite:///{tmp_path / 'node.db'}"
    environment = {**{k: v for k, v in os.environ.items() if k not in SERVICE_ENV},
                   "DICOM_AI_NODE_DATABASE_URL": url, "DICOM_AI_NODE_STORAGE_DIR": str(tmp_path / "storage"),
                   "DICOM_AI_NODE_BROKER_URL": "amqp://dicomai:x@127.0.0.1:1//"}

    def check() -> subprocess.CompletedProcess:
        return subprocess.run(command, check=False, capture_output=True, text=True, timeout=120, env=environment)

    assert check().returncode == 1  # no schema yet: unhealthy, and nothing is migrated by a check
    database = Database(url)
    database.upgrade()
    assert check().returncode == 1
    cluster.ProcessRecord(database, "elsewhere/worker:1", "worker").beat()
    cluster.ProcessRecord(database, cluster.process_name("receiver", 11112), "receiver").beat()
    assert check().returncode == 1  # a worker on another host, a receiver here: not this container's worker
    cluster.ProcessRecord(database, cluster.process_name("worker"), "worker").beat()
    healthy = check()
    assert healthy.returncode == 0, healthy.stdout + healthy.stderr
    assert "1 worker process(es) alive on this host" in healthy.stdout


# --- Dockerfile -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dockerfile():
    from dockerfile_parse import DockerfileParser

    return DockerfileParser(str(DEPLOY / "Dockerfile"))


def _instructions(dockerfile, name: str) -> list[str]:
    return [item["value"] for item in dockerfile.structure if item["instruction"] == name]


def test_dockerfile_runs_as_a_non_root_user_with_a_health_check(dockerfile):
    users = _instructions(dockerfile, "USER")
    assert users, "no USER: the container would run as root"
    assert users[-1].split(":")[0] not in ("root", "0")
    assert "--uid 10001" in " ".join(_instructions(dockerfile, "RUN"))  # the USER exists
    (healthcheck,) = _instructions(dockerfile, "HEALTHCHECK")
    assert "http://127.0.0.1:8080/healthz" in healthcheck and "CMD" in healthcheck
    assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm", dockerfile.baseimage)
    assert set(_instructions(dockerfile, "EXPOSE")[0].split()) == {"11112", "8080"}


def test_dockerfile_installs_cpu_torch_by_default_and_everything_with_constraints(dockerfile):
    assert dockerfile.args["TORCH_VARIANT"] == "cpu"
    assert dockerfile.args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/${TORCH_VARIANT}"
    torch_install, node_install = [run for run in _instructions(dockerfile, "RUN") if "pip install" in run]
    assert '--index-url "${TORCH_INDEX_URL}"' in torch_install and '"torch==${TORCH_VERSION}"' in torch_install
    for install in (torch_install, node_install):
        assert "-c constraints.txt" in install
    assert "constraints.txt" in _instructions(dockerfile, "COPY")[0]
    assert dockerfile.args["TORCH_VERSION"] == "2.13.0"


def test_dockerignore_keeps_the_venv_and_local_data_out_of_the_image():
    ignored = {line for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line and not line.startswith("#")}
    assert {".git", ".venv", "var", "deploy/.env"} <= ignored
    assert not ignored & {"dicom_ai_node", "model_zoo", "constraints.txt", "pyproject.toml", "README.md"}


# --- systemd and install.sh -------------------------------------------------------------------

UNITS = ("dicom-ai-node.service", "dicom-ai-node-worker.service")
HARDENING = ("User=dicomai", "Group=dicomai", "StateDirectory=dicom-ai-node", "UMask=0027", "ProtectSystem=strict",
             "ProtectHome=true", "NoNewPrivileges=true", "PrivateTmp=true", "CapabilityBoundingSet=",
             "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6", "SystemCallArchitectures=native",
             "Restart=on-failure")


def _run_install(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(DEPLOY / "install.sh"), "--root", str(root), "--no-pip"],
                          check=False, capture_output=True, text=True, timeout=60)


@pytest.fixture
def installed(tmp_path) -> Path:
    """install.sh run into a fresh root (a passwd with root only), as on a new host."""
    if os.geteuid() != 0:
        pytest.skip("install.sh creates a system user (useradd --prefix): needs root")
    if not shutil.which("useradd"):
        pytest.skip("useradd not found")
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")
    (root / "etc/group").write_text("root:x:0:\n")
    (root / "etc/shadow").write_text("root:*:19000:0:99999:7:::\n")
    (root / "etc/gshadow").write_text("root:*::\n")
    result = _run_install(root)
    assert result.returncode == 0, result.stdout + result.stderr
    return root


def test_install_script_creates_user_config_venv_and_unit(installed, monkeypatch):
    users = [line.split(":") for line in (installed / "etc/passwd").read_text().splitlines()]
    (dicomai,) = [user for user in users if user[0] == "dicomai"]
    assert dicomai[5:] == ["/var/lib/dicom-ai-node", "/usr/sbin/nologin"]
    assert int(dicomai[2]) < 1000  # a system user
    assert "dicomai:" in (installed / "etc/group").read_text()

    config_file = installed / "etc/dicom-ai-node/config.toml"
    assert oct(config_file.stat().st_mode & 0o777) == "0o640"
    assert config_file.stat().st_gid == int(dicomai[3])  # the service may read it, nobody else
    monkeypatch.delenv("DICOM_AI_NODE_DATABASE_URL", raising=False)
    monkeypatch.delenv("DICOM_AI_NODE_STORAGE_DIR", raising=False)
    config = load_config(config_file)
    assert config.node.storage_dir == Path("/var/lib/dicom-ai-node/storage")
    assert config.database_url == "sqlite:////var/lib/dicom-ai-node/node.db"
    assert config.node.host == "0.0.0.0" and config.web.host == "127.0.0.1"

    state = installed / "var/lib/dicom-ai-node"
    assert state.stat().st_uid == int(dicomai[2]) and oct(state.stat().st_mode & 0o777) == "0o750"
    assert (installed / "opt/dicom-ai-node/venv/bin/python").exists()
    for name in UNITS:
        unit = installed / "etc/systemd/system" / name
        assert unit.read_text() == (DEPLOY / "systemd" / name).read_text()
    # installed, not enabled: the worker only runs with [workers] executor = "celery"
    assert not list(installed.glob("etc/systemd/system/*.wants/*"))


def test_install_script_is_idempotent_and_keeps_an_edited_config(installed):
    config_file = installed / "etc/dicom-ai-node/config.toml"
    config_file.write_text(config_file.read_text().replace('ae_title = "AI_NODE"', 'ae_title = "SITE_NODE"'))
    passwd = (installed / "etc/passwd").read_text()
    again = _run_install(installed)
    assert again.returncode == 0, again.stderr
    assert "keeping /etc/dicom-ai-node/config.toml" in again.stdout
    assert 'ae_title = "SITE_NODE"' in config_file.read_text()
    assert (installed / "etc/passwd").read_text() == passwd  # no second user


def test_install_script_refuses_a_root_without_passwd(tmp_path):
    result = _run_install(tmp_path)
    assert result.returncode != 0
    assert "etc/passwd not found" in result.stderr or "run as root" in result.stderr


def test_install_script_parses():
    assert subprocess.run(["bash", "-n", str(DEPLOY / "install.sh")], check=False).returncode == 0


def _systemd_root(installed: Path) -> Path:
    """The installed root plus the host's own units (verify follows the unit's dependencies) and
    a stand-in where pip would put the entry point (pip does not run offline)."""
    if not shutil.which("systemd-analyze"):
        pytest.skip("systemd-analyze not found (apt-get install systemd)")
    host_units = Path("/usr/lib/systemd/system")
    if not (host_units / "sysinit.target").exists():
        pytest.skip("the host's systemd units are not installed")
    shutil.copytree(host_units, installed / "usr/lib/systemd/system", symlinks=True)
    entry_point = installed / "opt/dicom-ai-node/venv/bin/dicom-ai-node"
    entry_point.write_text("#!/bin/sh\n")
    entry_point.chmod(0o755)
    return installed


@pytest.mark.parametrize("name, exec_start", [
    ("dicom-ai-node.service", "serve"),
    ("dicom-ai-node-worker.service", "worker --concurrency 1"),
])
def test_systemd_unit_verifies_cleanly(installed, name, exec_start):
    root = _systemd_root(installed)
    unit = root / "etc/systemd/system" / name
    result = subprocess.run(["systemd-analyze", "verify", f"--root={root}", str(unit)],
                            check=False, capture_output=True, text=True, timeout=30)
    # verify reports unknown keys and bad values as warnings with exit status 0: none allowed
    assert result.returncode == 0 and result.stderr.strip() == "", result.stderr
    lines = unit.read_text().splitlines()
    for line in (*HARDENING,
                 f"ExecStart=/opt/dicom-ai-node/venv/bin/dicom-ai-node --config /etc/dicom-ai-node/config.toml {exec_start}"):
        assert line in lines, line


def test_systemd_worker_unit_is_hardened_like_the_node_and_lets_a_job_finish():
    def settings(name: str) -> set[str]:
        return {line for line in (DEPLOY / "systemd" / name).read_text().splitlines()
                if "=" in line and not line.startswith("#")}

    node, worker = settings("dicom-ai-node.service"), settings("dicom-ai-node-worker.service")
    hardening = {line for line in node if line.split("=")[0].startswith(("Protect", "Restrict", "Private", "NoNew",
                                                                          "Capability", "Ambient", "Lock", "System",
                                                                          "UMask", "User", "Group", "State"))}
    assert len(hardening) > 20 and hardening <= worker, sorted(hardening - worker)
    # SIGTERM to the main process only (Celery's warm shutdown), time for the longest job + 60 s
    assert "KillMode=mixed" in worker
    (timeout,) = [line for line in worker if line.startswith("TimeoutStopSec=")]
    assert int(timeout.split("=")[1]) >= 1500 + 60  # [workers] job_timeout_s's default


def test_systemd_verify_catches_a_misspelt_option(installed):
    root = _systemd_root(installed)
    unit = root / "etc/systemd/system/dicom-ai-node.service"
    unit.write_text(unit.read_text().replace("ProtectSystem=strict", "ProtectSystem=sometimes"))
    result = subprocess.run(["systemd-analyze", "verify", f"--root={root}", str(unit)],
                            check=False, capture_output=True, text=True, timeout=30)
    assert "sometimes" in result.stderr


@pytest.mark.parametrize("name", UNITS)
def test_systemd_unit_hardening_is_rated_ok(installed, name):
    """systemd's own exposure score (0 = locked down, 10 = unprotected); 'OK' is below 5."""
    root = _systemd_root(installed)
    unit = root / "etc/systemd/system" / name
    result = subprocess.run(["systemd-analyze", "security", "--offline=true", f"--root={root}",
                             "--threshold=49", "--no-pager", str(unit)],
                            check=False, capture_output=True, text=True, timeout=30)
    score = re.search(rf"Overall exposure level for {re.escape(name)}: (\d+\.\d+)", result.stdout)
    assert score, result.stdout[-500:] + result.stderr
    assert float(score.group(1)) < 5.0 and result.returncode == 0


# --- Helm chart -------------------------------------------------------------------------------

DATABASE = {"database": {"url": "postgresql://dicomai:secret@db.example.org:5432/dicomai"}}
BROKER = {"broker": {"url": "amqp://dicomai:secret@mq.example.org:5672//"}}
WORKERS = {**DATABASE, **BROKER, "worker": {"enabled": True}}


def _render(values: dict) -> list[dict]:
    helm = pytest.importorskip("helm_python", reason="helm-python-sdk (test extra) not installed")
    with helm.Chart.load(CHART) as chart:
        rendered = chart.render(values, name="dain", namespace="imaging")
    return [doc for name, text in sorted(rendered.items()) if name.endswith(".yaml")
            for doc in yaml.safe_load_all(text) if doc]


def _by_kind(documents: list[dict]) -> dict[tuple[str, str], dict]:
    return {(doc["kind"], doc["metadata"]["name"]): doc for doc in documents}


@pytest.mark.parametrize("values", [DATABASE, WORKERS], ids=["receiver", "with-workers"])
def test_helm_chart_lints_cleanly(values):
    helm = pytest.importorskip("helm_python", reason="helm-python-sdk (test extra) not installed")
    report = helm.lint(CHART, values, strict=True, kube_version=f"v{KUBERNETES_VERSION}")
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


def test_helm_manifests_are_valid_kubernetes_objects():
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    documents = _render({**WORKERS, "receiver": {"replicas": 2}, "persistence": {"accessMode": "ReadWriteMany"}})
    assert len(documents) == 8  # with the worker Deployment and the broker Secret
    for document in documents:
        kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)  # raises when invalid


def test_kubernetes_validate_rejects_a_broken_manifest():
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    service = _by_kind(_render(DATABASE))[("Service", "dain-dicom-ai-node-dicom")]
    service["spec"]["ports"][0]["port"] = "eleven"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(service, KUBERNETES_VERSION, strict=True)


def test_helm_receiver_serves_dicom_and_web_with_storage_and_the_database_url_from_a_secret():
    objects = _by_kind(_render(DATABASE))
    assert set(objects) == {("ConfigMap", "dain-dicom-ai-node-config"),
                            ("PersistentVolumeClaim", "dain-dicom-ai-node-storage"),
                            ("Deployment", "dain-dicom-ai-node-receiver"),
                            ("Secret", "dain-dicom-ai-node-db"),
                            ("Service", "dain-dicom-ai-node-dicom"),
                            ("Service", "dain-dicom-ai-node-web")}  # no worker by default
    assert objects[("Secret", "dain-dicom-ai-node-db")]["stringData"]["url"] == DATABASE["database"]["url"]
    pod = objects[("Deployment", "dain-dicom-ai-node-receiver")]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    (env,) = container["env"]
    assert env == {"name": "DICOM_AI_NODE_DATABASE_URL",
                   "valueFrom": {"secretKeyRef": {"name": "dain-dicom-ai-node-db", "key": "url"}}}
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {"dicom": 11112, "web": 8080}
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["args"] == ["dicom-ai-node", "--config", CONTAINER_CONFIG, "serve", "--role", "all"]
    receiver = objects[("Deployment", "dain-dicom-ai-node-receiver")]["spec"]
    assert receiver["replicas"] == 1 and receiver["strategy"]["type"] == "Recreate"  # a ReadWriteOnce volume
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] == 10001
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["storage"]["persistentVolumeClaim"]["claimName"] == "dain-dicom-ai-node-storage"
    for service, port in (("dicom", 11112), ("web", 8080)):
        spec = objects[("Service", f"dain-dicom-ai-node-{service}")]["spec"]
        assert spec["selector"] == objects[("Deployment", "dain-dicom-ai-node-receiver")]["spec"]["selector"]["matchLabels"]
        assert spec["ports"][0]["port"] == port and spec["ports"][0]["targetPort"] == service


def _helm_config(values: dict, tmp_path: Path, monkeypatch, broker_url: str | None = None):
    """The rendered config.toml as the node reads it, with the environment the pods get."""
    config_map = _by_kind(_render(values))[("ConfigMap", "dain-dicom-ai-node-config")]
    path = tmp_path / "config.toml"
    path.write_text(config_map["data"]["config.toml"])
    monkeypatch.setenv("DICOM_AI_NODE_DATABASE_URL", DATABASE["database"]["url"])
    monkeypatch.delenv("DICOM_AI_NODE_STORAGE_DIR", raising=False)
    monkeypatch.delenv("DICOM_AI_NODE_BROKER_URL", raising=False)
    if broker_url is not None:
        monkeypatch.setenv("DICOM_AI_NODE_BROKER_URL", broker_url)
    return load_config(path)


def test_helm_config_is_one_the_node_accepts(tmp_path, monkeypatch):
    config = _helm_config(DATABASE, tmp_path, monkeypatch)
    assert config.node.host == config.web.host == "0.0.0.0"
    assert config.node.storage_dir == Path("/data/storage")
    assert config.database_url == DATABASE["database"]["url"]
    assert config.executor == "local" and config.celery is None  # no workers: jobs in the receiver


def test_helm_config_with_workers_uses_celery_and_the_broker_secret(tmp_path, monkeypatch):
    values = {**WORKERS, "worker": {"enabled": True, "jobTimeoutSeconds": 3000}}
    config = _helm_config(values, tmp_path, monkeypatch, broker_url=BROKER["broker"]["url"])
    assert config.executor == "celery"
    assert config.celery.broker_url == BROKER["broker"]["url"] and config.celery.job_timeout_s == 3000
    objects = _by_kind(_render(values))
    assert objects[("Secret", "dain-dicom-ai-node-broker")]["stringData"]["url"] == BROKER["broker"]["url"]
    broker_env = {"name": "DICOM_AI_NODE_BROKER_URL",
                  "valueFrom": {"secretKeyRef": {"name": "dain-dicom-ai-node-broker", "key": "url"}}}
    for deployment in ("receiver", "worker"):  # the node sends the jobs, the workers take them
        (container,) = objects[("Deployment", f"dain-dicom-ai-node-{deployment}")]["spec"]["template"]["spec"]["containers"]
        assert broker_env in container["env"], deployment
    helm = pytest.importorskip("helm_python")
    with pytest.raises(helm.HelmError, match="broker.url"):
        _render({**DATABASE, "worker": {"enabled": True}})
    existing = _by_kind(_render({**DATABASE, "worker": {"enabled": True},
                                 "broker": {"existingSecret": "site-mq", "existingSecretKey": "amqp"}}))
    assert ("Secret", "dain-dicom-ai-node-broker") not in existing
    (container,) = existing[("Deployment", "dain-dicom-ai-node-worker")]["spec"]["template"]["spec"]["containers"]
    assert {"name": "site-mq", "key": "amqp"} in [e["valueFrom"]["secretKeyRef"] for e in container["env"]]


def test_helm_receiver_replicas_share_a_read_write_many_volume():
    objects = _by_kind(_render({**WORKERS, "receiver": {"replicas": 3}, "persistence": {"accessMode": "ReadWriteMany"}}))
    receiver = objects[("Deployment", "dain-dicom-ai-node-receiver")]["spec"]
    assert receiver["replicas"] == 3 and receiver["strategy"]["type"] == "RollingUpdate"
    assert objects[("PersistentVolumeClaim", "dain-dicom-ai-node-storage")]["spec"]["accessModes"] == ["ReadWriteMany"]


def test_helm_uses_an_existing_secret_and_needs_a_database():
    objects = _by_kind(_render({"database": {"existingSecret": "site-db", "existingSecretKey": "dsn"}}))
    assert not [key for key in objects if key[0] == "Secret"]
    pod = objects[("Deployment", "dain-dicom-ai-node-receiver")]["spec"]["template"]["spec"]
    assert pod["containers"][0]["env"][0]["valueFrom"]["secretKeyRef"] == {"name": "site-db", "key": "dsn"}
    helm = pytest.importorskip("helm_python")
    with pytest.raises(helm.HelmError, match="database.url"):
        _render({})


def test_helm_worker_is_off_by_default_and_asks_for_gpus_when_on():
    objects = _by_kind(_render({**WORKERS, "worker": {"enabled": True, "replicas": 3}}))
    worker = objects[("Deployment", "dain-dicom-ai-node-worker")]["spec"]
    assert worker["replicas"] == 3
    pod = worker["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["args"] == ["dicom-ai-node", "--config", CONTAINER_CONFIG, "worker",
                                 "--queues", "gpu,any", "--concurrency", "1"]
    assert container["livenessProbe"]["exec"]["command"] == ["dicom-ai-node", "--config", CONTAINER_CONFIG,
                                                             "processes", "--check-here", "worker"]
    assert pod["terminationGracePeriodSeconds"] >= 1500 + 60  # a stopping worker may finish its job
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["storage"]["persistentVolumeClaim"]["claimName"] == "dain-dicom-ai-node-storage"
    cpu_worker = _by_kind(_render({**WORKERS, "worker": {"enabled": True, "gpus": 0, "queues": "cpu,any",
                                                         "concurrency": 2}}))
    (container,) = cpu_worker[("Deployment", "dain-dicom-ai-node-worker")]["spec"]["template"]["spec"]["containers"]
    assert "nvidia.com/gpu" not in container["resources"]["limits"]
    assert container["args"][4:] == ["--queues", "cpu,any", "--concurrency", "2"]
