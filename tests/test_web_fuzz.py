"""Schema-driven fuzzing of the REST API (schemathesis): generated requests against every
operation in the OpenAPI spec, as an admin, must never get a 5xx answer. Bounded: a few
examples per operation, so the run takes seconds."""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path

import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

from tests.web_support import Web, store_study

# schemathesis reads the schema when the module is collected, so the app exists by then
_FOLDER = Path(tempfile.mkdtemp(prefix="web-fuzz-"))
atexit.register(shutil.rmtree, _FOLDER, ignore_errors=True)
WEB = Web(_FOLDER)
store_study(WEB.database, _FOLDER / "storage")

# echo would dial whatever host the fuzzer invented; it is tested against loopback elsewhere
schema = schemathesis.openapi.from_asgi("/openapi.json", WEB.app).exclude(path_regex=r"/echo$")


@schema.parametrize()
@settings(max_examples=6, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
def test_no_server_errors(case):
    response = case.call(headers={"Authorization": f"Bearer {WEB.admin_token}"})
    case.validate_response(response, checks=[not_a_server_error])
