"""STOW-RS in (DICOM PS3.18 10.5): `POST /dicom-web/studies[/{StudyInstanceUID}]`.

A second way in beside C-STORE, on the admin web server, for a user with an API token and
the role `sender` (or `admin`). The multipart/related body is parsed as it streams and each
part stored like a C-STORE before the next is read (receive/multipart.py, also the way in of a
prior's WADO-RS retrieve); the response lists every stored instance (Referenced SOP Sequence)
and every refused one with its Failure Reason (Failed SOP Sequence). Answering the request
marks its studies released, like an association release, so they complete promptly.

Bounded: a part over max_part_mb is dropped (A700) and the rest go on; a request over
max_request_mb is refused (413: by its Content-Length before any byte is read, else when it
passes the limit); the whole upload has request_timeout_s (408). A part cut off by a closed
connection, a timeout or a refusal never leaves its temporary file behind.
"""

from __future__ import annotations

import logging
from typing import Annotated

import anyio
from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from dicom_ai_node.receive.multipart import (
    MultipartReceiver,
    Outcome,
    RequestRefused,
    multipart_boundary,
)
from dicom_ai_node.receive.scp import SUCCESS
from dicom_ai_node.storage import is_storable_uid
from dicom_ai_node.web.auth import context, principal
from dicom_ai_node.web.users import Principal

log = logging.getLogger(__name__)

STORE_ROLES = ("sender", "admin")
MEDIA_TYPE = "application/dicom+json"

router = APIRouter(tags=["dicomweb"])


def stow_sender(who: Annotated[Principal | None, Depends(principal)]) -> Principal:
    """An API token (no session cookie: no CSRF token travels with STOW-RS) of a sender or admin."""
    if who is None:
        raise HTTPException(401, "send Authorization: Bearer <token>", headers={"WWW-Authenticate": "Bearer"})
    if who.via != "token":
        raise HTTPException(403, "STOW-RS needs an API token (Authorization: Bearer)")
    if who.role not in STORE_ROLES:
        raise HTTPException(403, f"STOW-RS needs the role sender or admin (you are a {who.role})")
    return who


def response_body(outcomes: list[Outcome]) -> dict:
    """The Store Instances Response Module (PS3.18 10.5.3) in the DICOM JSON model."""
    stored, failed = [], []
    for outcome in outcomes:
        item = {}
        if outcome.sop_class_uid:
            item["00081150"] = {"vr": "UI", "Value": [outcome.sop_class_uid]}
        if outcome.sop_instance_uid:
            item["00081155"] = {"vr": "UI", "Value": [outcome.sop_instance_uid]}
        if outcome.status == SUCCESS:
            stored.append(item)
        else:
            item["00081197"] = {"vr": "US", "Value": [outcome.status]}
            failed.append(item)
    return {"00081198": {"vr": "SQ", **({"Value": failed} if failed else {})},
            "00081199": {"vr": "SQ", **({"Value": stored} if stored else {})}}


@router.post("/dicom-web/studies", summary="STOW-RS: store instances (multipart/related; "
             'type="application/dicom"); needs an API token of a sender or admin')
async def store_instances(request: Request, who: Annotated[Principal, Depends(stow_sender)]):
    return await _stow(request, who, None)


@router.post("/dicom-web/studies/{study_uid}", summary="STOW-RS: store instances of this study")
async def store_study_instances(request: Request, study_uid: str,
                                who: Annotated[Principal, Depends(stow_sender)]):
    if not is_storable_uid(study_uid):
        raise HTTPException(400, "the study in the URL is not a valid UID")
    return await _stow(request, who, study_uid)


async def _stow(request: Request, who: Principal, study_uid: str | None):
    ctx = context(request)
    settings = ctx.config.dicomweb
    if ctx.receiver is None or not ctx.receiver.can_store:  # starting or stopping
        raise HTTPException(503, "the node cannot store instances now (starting or stopping)")
    address = request.client.host if request.client else "unknown"
    try:
        boundary = multipart_boundary(request.headers.get("content-type"))
        stow = MultipartReceiver(ctx.receiver, study_uid, f"STOW-RS user {who.name} at {address}", boundary,
                                 settings.max_part_mb << 20, settings.max_request_mb << 20)
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > stow.max_request_bytes:
            raise RequestRefused(413, f"request larger than max_request_mb ({settings.max_request_mb} MiB)")
    except RequestRefused as refusal:
        return _refused(refusal, who, address)
    try:
        with anyio.fail_after(settings.request_timeout_s):
            async for chunk in request.stream():
                await run_in_threadpool(stow.write, chunk)  # parse, write, store: never in the event loop
            await run_in_threadpool(stow.finish)
    except RequestRefused as refusal:
        return _refused(refusal, who, address)
    except TimeoutError:
        return _refused(RequestRefused(408, f"upload not finished within request_timeout_s "
                                            f"({settings.request_timeout_s:g} s)"), who, address)
    except ClientDisconnect:
        log.warning("STOW-RS upload from user %s at %s ended by the client", who.name, address)
        raise
    finally:
        stow.discard()
        # instances stored before an early end are kept (like C-STORE before an abort)
        await run_in_threadpool(ctx.receiver.studies_released, stow.studies)
    stored = sum(1 for outcome in stow.outcomes if outcome.status == SUCCESS)
    failed = len(stow.outcomes) - stored
    log.info("STOW-RS from user %s at %s: %d instances stored, %d refused", who.name, address, stored, failed)
    if not stow.outcomes:
        return _refused(RequestRefused(400, "the request holds no part"), who, address)
    status = 200 if not failed else 202 if stored else 409
    return JSONResponse(response_body(stow.outcomes), status_code=status, media_type=MEDIA_TYPE)


def _refused(refusal: RequestRefused, who: Principal, address: str) -> JSONResponse:
    log.warning("refused STOW-RS request from user %s at %s: %s", who.name, address, refusal.reason)
    return JSONResponse({"detail": refusal.reason}, status_code=refusal.status)
