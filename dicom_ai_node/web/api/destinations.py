"""Destinations: where results go (C-STORE or STOW-RS), with a connection test (C-ECHO or QIDO-RS)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, HTTPException, Path, Response
from pydantic import BaseModel, Field, model_validator

from dicom_ai_node.config import dicomweb_url_problem_free
from dicom_ai_node.db.models import DestinationRow
from dicom_ai_node.deliver.destinations import list_destinations, to_json
from dicom_ai_node.web import actions
from dicom_ai_node.web.api.common import ADMIN_ERRORS, ERRORS, http_errors
from dicom_ai_node.web.auth import Admin, Context, User

router = APIRouter(tags=["destinations"], responses=ERRORS)

NAME_PATTERN = r"^[A-Za-z0-9_.-]{1,64}$"
AE_PATTERN = r"^[\x20-\x5b\x5d-\x7e]*[\x21-\x5b\x5d-\x7e][\x20-\x5b\x5d-\x7e]*$"  # ASCII, no backslash, not blank
Name = Annotated[str, Path(pattern=NAME_PATTERN)]


class DestinationFields(BaseModel):
    kind: Literal["dimse", "dicomweb"] = "dimse"
    ae_title: str | None = Field(None, min_length=1, max_length=16, pattern=AE_PATTERN)  # dimse
    host: str | None = Field(None, min_length=1, max_length=255, pattern=r"^[A-Za-z0-9.:_-]+$")
    port: int | None = Field(None, ge=1, le=65535)
    calling_ae_title: str | None = Field(None, min_length=1, max_length=16, pattern=AE_PATTERN)
    url: str | None = Field(None, max_length=2048)  # dicomweb: the base URL, nothing secret in it
    max_attempts: int = Field(5, ge=1, le=100)
    backoff_s: float = Field(2.0, ge=0, le=86400)
    timeout_s: float = Field(30.0, gt=0, le=600)

    @model_validator(mode="after")
    def fields_of_the_kind(self):
        if self.kind == "dimse":
            if not (self.ae_title and self.host and self.port):
                raise ValueError("a dimse destination needs ae_title, host and port")
            self.url = None
        else:
            if not self.url or not dicomweb_url_problem_free(self.url):
                raise ValueError("a dicomweb destination needs url: http:// or https://, without "
                                 "user:password@, query or fragment")
            self.url = self.url.rstrip("/")
            self.ae_title = self.host = self.port = self.calling_ae_title = None
        return self


class NewDestination(DestinationFields):
    name: str = Field(pattern=NAME_PATTERN)


class EchoResult(BaseModel):
    ok: bool
    message: str


@router.get("/destinations")
def destinations(ctx: Context, _user: User) -> list[dict[str, Any]]:
    with ctx.database.session() as session:
        return [to_json(row) for row in list_destinations(session)]


@router.get("/destinations/{name}", responses={404: {"description": "no such destination"}})
def destination(ctx: Context, _user: User, name: Name) -> dict[str, Any]:
    with ctx.database.session() as session:
        row = session.get(DestinationRow, name)
        if row is None:
            raise HTTPException(404, f"no destination {name!r}")
        return to_json(row)


@router.post("/destinations", status_code=201, responses=ADMIN_ERRORS)
def create(ctx: Context, user: Admin, body: NewDestination) -> dict[str, Any]:
    with http_errors(), ctx.database.session() as session:
        return to_json(actions.save_destination(session, body.name, body.model_dump(), user.name, create=True))


@router.put("/destinations/{name}", responses=ADMIN_ERRORS)
def update(ctx: Context, user: Admin, name: Name, body: DestinationFields) -> dict[str, Any]:
    with http_errors(), ctx.database.session() as session:
        return to_json(actions.save_destination(session, name, body.model_dump(), user.name, create=False))


@router.delete("/destinations/{name}", status_code=204, responses=ADMIN_ERRORS,
               summary="Delete a destination no rule uses")
def delete(ctx: Context, user: Admin, name: Name) -> Response:
    with http_errors(), ctx.database.session() as session:
        actions.delete_destination(ctx, session, name, user.name)
    return Response(status_code=204)


@router.post("/destinations/{name}/echo", responses=ADMIN_ERRORS, summary="Test the destination now: C-ECHO (dimse) or QIDO-RS (dicomweb)")
def echo(ctx: Context, user: Admin, name: Name) -> EchoResult:
    with http_errors():
        ok, message = actions.echo_destination(ctx, name, user.name)
    return EchoResult(ok=ok, message=message)


class PauseResult(BaseModel):
    paused: bool
    pending: int  # deliveries waiting for the destination


@router.post("/destinations/{name}/pause", responses=ADMIN_ERRORS,
             summary="Pause deliveries to the destination: they stay pending until resumed; audited")
def pause(ctx: Context, user: Admin, name: Name) -> PauseResult:
    with http_errors(), ctx.database.session() as session:
        pending = actions.pause_destination(session, name, user.name)
    return PauseResult(paused=True, pending=pending)


@router.post("/destinations/{name}/resume", responses=ADMIN_ERRORS,
             summary="Resume deliveries to a paused destination (pending ones go now); audited")
def resume(ctx: Context, user: Admin, name: Name) -> PauseResult:
    with http_errors(), ctx.database.session() as session:
        pending = actions.resume_destination(session, name, user.name)
    ctx.kick_outbox()
    return PauseResult(paused=False, pending=pending)
