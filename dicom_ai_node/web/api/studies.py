"""Studies: what arrived, which rules matched and why, jobs, results, deliveries."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, HTTPException, Path, Query

from dicom_ai_node import inspect
from dicom_ai_node.db.models import JobState
from dicom_ai_node.web.api.common import ERRORS
from dicom_ai_node.web.auth import Context, User

router = APIRouter(tags=["studies"], responses=ERRORS)

UID = Annotated[str, Path(max_length=64, pattern=r"^[0-9.]+$", description="Study Instance UID")]


@router.get("/studies", summary="List studies, newest first, with filters")
def list_studies(ctx: Context, _user: User,
                 state: Literal["receiving", "complete"] | None = None,
                 patient_id: Annotated[str | None, Query(max_length=64)] = None,
                 q: Annotated[str | None, Query(max_length=128,
                                                description="text in patient name, description, accession, UID")] = None,
                 job_state: JobState | None = None,
                 model: Annotated[str | None, Query(max_length=128)] = None,
                 limit: Annotated[int, Query(ge=1, le=500)] = 50,
                 offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0) -> list[dict[str, Any]]:
    with ctx.database.session() as session:
        return inspect.list_studies(session, limit, offset, state=state, patient_id=patient_id, text=q,
                                    job_state=job_state.value if job_state else None, model=model)


@router.get("/studies/{study_uid}", summary="One study: series and instances, routing decisions "
            "with their reasons, jobs with timings, results, deliveries",
            responses={404: {"description": "no such study"}})
def get_study(ctx: Context, _user: User, study_uid: UID, instances: bool = True) -> dict[str, Any]:
    with ctx.database.session() as session:
        detail = inspect.study_detail(session, study_uid, with_instances=instances)
    if detail is None:
        raise HTTPException(404, f"no study {study_uid}")
    return detail
