"""Numbers in page URLs that reach the database are bounded: a huge one is a 422, never an
overflow inside SQLite (HTTP 500)."""

from __future__ import annotations

import pytest

from tests.web_support import STUDY, Web, csrf_of, store_study

HUGE = str(10**30)


@pytest.fixture
def web(tmp_path):
    web = Web(tmp_path)
    web.ids = store_study(web.database, tmp_path / "storage")
    return web


@pytest.mark.parametrize("path", [f"/studies?page={HUGE}", f"/audit?page={HUGE}", f"/rules?version={HUGE}",
                                  "/studies?page=-1", "/rules?version=0", f"/results/{HUGE}/file",
                                  f"/results/{HUGE}/image.png"])
def test_a_huge_page_or_version_is_refused_not_a_server_error(web, path):
    assert web.login().get(path).status_code == 422


@pytest.mark.parametrize("action", ["release", "reject", "retry", "cancel"])
def test_a_huge_job_id_in_a_form_url_is_refused(web, action):
    client = web.login()
    answer = client.post(f"/jobs/{HUGE}/{action}", data={"csrf_token": csrf_of(client), "study": STUDY},
                         headers={"X-CSRF-Token": csrf_of(client)})
    assert answer.status_code == 422


def test_pages_within_the_bounds_still_answer(web):
    client = web.login()
    for path in ("/studies?page=0", "/studies?page=100000", "/audit?page=3", "/rules?version=1",
                 "/rules?version=2147483647"):
        assert client.get(path).status_code == 200, path
