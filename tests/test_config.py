"""A wrong config is refused at start with the file, the key and what is wrong."""

from __future__ import annotations

from pathlib import Path

import pytest

from dicom_ai_node.cli import main
from dicom_ai_node.config import ConfigError, load_config
from tests.conftest import PROJECT_ROOT

MINIMAL = '[node]\nallowed_callers = [{ ae_title = "CT1" }]\n'


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def test_the_shipped_default_config_is_valid():
    config = load_config(PROJECT_ROOT / "config.toml")
    assert config.database_url.startswith("sqlite:///")
    assert config.destination("pacs").port == 4242
    assert config.rules and config.rules[0]["models"] == ["lung_ct_seg"]
    assert config.qc_on_fail == "hold"  # a result failing its quality checks waits for an admin
    # relative paths are relative to the config file, not the working directory
    assert config.node.storage_dir == PROJECT_ROOT / "var" / "storage"


@pytest.mark.parametrize("text, key, problem", [
    (MINIMAL + "port = 'eleven'\n", "node.port", "must be an integer"),
    (MINIMAL + "port = 70000\n", "node.port", "1..65535"),
    (MINIMAL + "ae_title = 'A_TITLE_LONGER_THAN_16'\n", "node.ae_title", "1..16 ASCII"),
    (MINIMAL + "colour = 'blue'\n", "node.colour", "unknown key"),
    ("[node]\n", "node.allowed_callers", "is empty"),
    (MINIMAL + "[database]\nurl = 'mysql://x'\n", "database.url", "sqlite:/// or postgresql://"),
    (MINIMAL + "[completion]\nquiet_period_s = -1\n", "completion.quiet_period_s", "between 0"),
    (MINIMAL + "[models]\npaths = ['no/such/folder']\n", "models.paths[0]", "folder not found"),
    (MINIMAL + "[[destinations]]\nname = 'pacs'\nae_title = 'PACS'\nhost = 'h'\n", "destinations[0].port",
     "is required"),
    (MINIMAL + "tls = { cert_file = 'missing.crt', key_file = 'k' }\n", "node.tls.cert_file", "file not found"),
    (MINIMAL + "port = \n", "", "not valid TOML"),
    (MINIMAL + "[qc]\non_fail = 'send'\n", "qc.on_fail", "must be one of hold, send_flagged, drop"),
    (MINIMAL + "[qc]\nfail = 'drop'\n", "qc.fail", "unknown key"),
])
def test_errors_name_the_file_and_the_key(tmp_path, text, key, problem):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as error:
        load_config(path)
    message = str(error.value)
    assert message.startswith(str(path.resolve()))
    assert f": {key}: " in message if key else True
    assert problem in message


def test_qc_on_fail_defaults_to_hold_and_takes_the_other_policies(tmp_path):
    assert load_config(write(tmp_path, MINIMAL)).qc_on_fail == "hold"
    assert load_config(write(tmp_path, MINIMAL + "[qc]\non_fail = 'send_flagged'\n")).qc_on_fail == "send_flagged"


def test_serve_refuses_a_wrong_config_with_exit_code_2(tmp_path, capsys):
    path = write(tmp_path, MINIMAL + "port = 'x'\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["--config", str(path), "serve"])
    assert exit_info.value.code == 2
    assert "node.port" in capsys.readouterr().err


def test_environment_overrides_database_and_storage(tmp_path, monkeypatch):
    monkeypatch.setenv("DICOM_AI_NODE_DATABASE_URL", "postgresql://u@db/x")
    monkeypatch.setenv("DICOM_AI_NODE_STORAGE_DIR", str(tmp_path / "store"))
    config = load_config(write(tmp_path, MINIMAL))
    assert config.database_url == "postgresql://u@db/x"
    assert config.node.storage_dir == tmp_path / "store"
