"""Routing rules: get, validate, dry-run, save as a new version, roll back."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Path
from pydantic import BaseModel, Field

from dicom_ai_node.db.models import RuleSetVersion
from dicom_ai_node.web import rules_editing
from dicom_ai_node.web.api.common import ADMIN_ERRORS, ERRORS, http_errors
from dicom_ai_node.web.auth import Admin, Context, User

router = APIRouter(tags=["rules"], responses=ERRORS)

MAX_TEXT = 200_000


class Draft(BaseModel):
    text: str = Field(max_length=MAX_TEXT, description="the rule set as TOML ([[rules]] tables)")


class DryRun(Draft):
    limit: int = Field(100, ge=1, le=1000, description="how many of the newest stored studies")


class NewVersion(Draft):
    comment: str | None = Field(None, max_length=1000)


class Rollback(BaseModel):
    version: int = Field(ge=1, le=2**31 - 1)
    

class Validation(BaseModel):
    valid: bool
    problems: list[str]


class Saved(BaseModel):
    version: int


@router.get("/rules", summary="The active rule set")
def active_rules(ctx: Context, _user: User) -> dict[str, Any]:
    with ctx.database.session() as session:
        version = ctx.rules.active_version(session)
        row = session.get(RuleSetVersion, version) if version else None
        if row is None:
            return {"version": 0, "text": "", "author": None, "comment": None, "created_at": None}
        return rules_editing.version_json(row)


@router.get("/rules/versions", summary="Every stored version, newest first")
def rule_versions(ctx: Context, _user: User) -> list[dict[str, Any]]:
    with ctx.database.session() as session:
        return rules_editing.versions(session)


@router.get("/rules/versions/{version}", responses={404: {"description": "no such version"}})
def rule_version(ctx: Context, _user: User, version: Annotated[int, Path(ge=1, le=2**31 - 1)]) -> dict[str, Any]:
    with ctx.database.session() as session:
        row = session.get(RuleSetVersion, version)
        if row is None:
            raise HTTPException(404, f"no rule set version {version}")
        return rules_editing.version_json(row)


@router.post("/rules/validate", summary="Check a draft; every problem is listed precisely")
def validate(ctx: Context, _user: User, draft: Draft) -> Validation:
    problems = rules_editing.validate(ctx, draft.text)
    return Validation(valid=not problems, problems=problems)


@router.post("/rules/dry-run", summary="What a draft would do to the stored studies, against the active rules",
             responses={422: {"description": "the draft is invalid"}})
def dry_run(ctx: Context, _user: User, draft: DryRun) -> dict[str, Any]:
    with http_errors(), ctx.database.session() as session:
        return rules_editing.dry_run(ctx, session, draft.text, draft.limit)


@router.post("/rules", status_code=201, responses={**ADMIN_ERRORS, 422: {"description": "the draft is invalid"}},
             summary="Save a draft as the new active version (applies without a restart)")
def save(ctx: Context, user: Admin, draft: NewVersion) -> Saved:
    with http_errors(), ctx.database.session() as session:
        return Saved(version=rules_editing.save(ctx, session, draft.text, user.name, draft.comment))


@router.post("/rules/rollback", status_code=201, responses={**ADMIN_ERRORS, 422: {"description": "unusable now"}},
             summary="Make an older version active again (saved as a new version)")
def rollback(ctx: Context, user: Admin, body: Rollback) -> Saved:
    with http_errors(), ctx.database.session() as session:
        try:
            return Saved(version=rules_editing.rollback(ctx, session, body.version, user.name))
        except LookupError as error:
            raise HTTPException(404, str(error)) from None
