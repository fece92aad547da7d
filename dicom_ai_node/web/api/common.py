"""Shared bits of the API: error answers and converting refusals into HTTP codes."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Annotated

from fastapi import HTTPException, Path, Query
from pydantic import BaseModel

from dicom_ai_node.web.actions import NotFound, Refused
from dicom_ai_node.web.rules_editing import RulesInvalid

# what refused requests look like in the OpenAPI spec
ERRORS = {401: {"description": "not logged in and no API token"},
          403: {"description": "viewer role, or missing CSRF header with a session cookie"}}
ADMIN_ERRORS = {**ERRORS, 404: {"description": "no such thing"}, 409: {"description": "refused in this state"}}


# numbers from a URL that reach the database: bounded, so a huge one is a 422, not an overflow (500)
MAX_ROW_ID = 2**31 - 1
RowId = Annotated[int, Path(ge=1, le=MAX_ROW_ID)]
PageNumber = Annotated[int, Query(ge=0, le=100_000)]
Version = Annotated[int | None, Query(ge=1, le=MAX_ROW_ID)]


class Message(BaseModel):
    message: str


@contextmanager
def http_errors():
    """Map the action layer's exceptions to 404 / 409 / 422 answers with the reason."""
    try:
        yield
    except NotFound as error:
        raise HTTPException(404, str(error)) from None
    except Refused as error:
        raise HTTPException(409, str(error)) from None
    except RulesInvalid as error:
        raise HTTPException(422, {"problems": error.problems}) from None
