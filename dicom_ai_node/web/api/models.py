"""Installed models, and switching them on or off."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path

from dicom_ai_node.web import actions
from dicom_ai_node.web.api.common import ADMIN_ERRORS, ERRORS, Message, http_errors
from dicom_ai_node.web.auth import Admin, Context, User

router = APIRouter(tags=["models"], responses=ERRORS)

Name = Annotated[str, Path(max_length=128)]


def models_json(ctx, session) -> list[dict[str, Any]]:
    disabled = actions.disabled_models(session)
    return [{"name": name, "version": m.version, "task": m.task, "modality": list(m.input.modality),
             "folder": str(m.folder), "enabled": name not in disabled}
            for name, m in sorted(ctx.models.manifests.items())]


@router.get("/models")
def list_models(ctx: Context, _user: User) -> list[dict[str, Any]]:
    with ctx.database.session() as session:
        return models_json(ctx, session)


@router.post("/models/{name}/enable", responses=ADMIN_ERRORS)
def enable(ctx: Context, user: Admin, name: Name) -> Message:
    with http_errors(), ctx.database.session() as session:
        actions.set_model_enabled(ctx, session, name, True, user.name)
    return Message(message=f"model {name} enabled")


@router.post("/models/{name}/disable", responses=ADMIN_ERRORS,
             summary="Disable a model: its new jobs fail with 'not installed or is disabled'")
def disable(ctx: Context, user: Admin, name: Name) -> Message:
    with http_errors(), ctx.database.session() as session:
        actions.set_model_enabled(ctx, session, name, False, user.name)
    return Message(message=f"model {name} disabled")
