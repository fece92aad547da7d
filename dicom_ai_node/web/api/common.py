"""Shared bits of the API: error answers and converting refusals into HTTP codes."""

from __future__ import annotations

from contextlib import contextmanager

from fastapi import HTTPException
from pydantic import BaseModel

from dicom_ai_node.web.actions import NotFound, Refused
from dicom_ai_node.web.rules_editing import RulesInvalid

# what refused requests look like in the OpenAPI spec
ERRORS = {401: {"description": "not logged in and no API token"},
          403: {"description": "viewer role, or missing CSRF header with a session cookie"}}
ADMIN_ERRORS = {**ERRORS, 404: {"description": "no such thing"}, 409: {"description": "refused in this state"}}


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
