"""Users and API tokens. Admins manage every user and token; every user may change their own
password (with the current one) and create, list and revoke their own tokens."""

from __future__ import annotations

from contextlib import contextmanager
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, HTTPException, Query, Request
from pydantic import BaseModel, Field

from dicom_ai_node.web import users
from dicom_ai_node.web.api.common import ADMIN_ERRORS, ERRORS, Message, RowId
from dicom_ai_node.web.auth import SESSION_COOKIE, Admin, Changer, Context

router = APIRouter(tags=["users"], responses=ADMIN_ERRORS)
UserName = Annotated[str, Field(max_length=64)]
Password = Annotated[str, Field(max_length=1024)]


class NewUser(BaseModel):
    name: UserName
    password: Password
    role: Literal["admin", "viewer", "sender"] = "viewer"


class UserChange(BaseModel):
    role: Literal["admin", "viewer", "sender"] | None = None
    disabled: bool | None = Field(None, description="true: its sessions end and its tokens are refused")


class PasswordChange(BaseModel):
    password: Password
    current_password: Password | None = Field(None, description="needed to change your own password")


class NewToken(BaseModel):
    user: UserName | None = Field(None, description="whose token (admins only; default: yours)")
    label: Annotated[str, Field(max_length=128)] | None = None
    days: Annotated[int, Field(ge=1, le=users.TOKEN_DAYS_MAX)] | None = Field(
        None, description=f"valid for (default {users.TOKEN_DAYS_DEFAULT} days)")


class CreatedToken(BaseModel):
    token: str = Field(description="shown this once; only its hash is stored")
    prefix: str
    user: str
    expires_at: datetime


@contextmanager
def user_errors():
    try:
        yield
    except users.NotFound as error:
        raise HTTPException(404, str(error)) from None
    except users.Conflict as error:
        raise HTTPException(409, str(error)) from None
    except users.WrongPassword as error:
        raise HTTPException(403, str(error)) from None
    except users.UserError as error:
        raise HTTPException(422, str(error)) from None


@router.get("/users", summary="Users, their roles and whether they are disabled")
def list_users(ctx: Context, _admin: Admin) -> list[dict[str, Any]]:
    with ctx.database.session() as session:
        return [users.user_json(user) for user in users.list_users(session)]


@router.post("/users", status_code=201, summary="Add a user")
def add_user(ctx: Context, admin: Admin, body: NewUser) -> dict[str, Any]:
    with user_errors(), ctx.database.session() as session:
        return users.user_json(users.create_user(session, body.name, body.password, body.role, admin.name))


@router.patch("/users/{name}", summary="Set a user's role, disable or enable it")
def change_user(ctx: Context, admin: Admin, name: UserName, body: UserChange) -> dict[str, Any]:
    with user_errors(), ctx.database.session() as session:
        if body.role is not None:
            users.set_role(session, name, body.role, admin.name)
        if body.disabled is not None:
            users.set_disabled(session, name, body.disabled, admin.name)
        return users.user_json(users.get_user(session, name))


@router.delete("/users/{name}", summary="Delete a user with its sessions and tokens")
def delete_user(ctx: Context, admin: Admin, name: UserName) -> Message:
    with user_errors(), ctx.database.session() as session:
        users.delete_user(session, name, admin.name)
    return Message(message=f"user {name} deleted")


@router.post("/users/{name}/password", responses=ERRORS,
             summary="Change a password: your own (with current_password) or, as admin, anyone's")
def change_password(request: Request, ctx: Context, who: Changer, name: UserName, body: PasswordChange) -> Message:
    own = who.name == name
    if not own and not who.is_admin:
        raise HTTPException(403, "this needs the admin role (you are a viewer)")
    keep = request.cookies.get(SESSION_COOKIE) if own and who.via == "session" else None
    with user_errors(), ctx.database.session() as session:
        users.change_password(session, name, body.password, who.name,
                              current=(body.current_password or "") if own else None, keep_session=keep)
    return Message(message=f"password of {name} changed")


@router.get("/tokens", responses=ERRORS, summary="API tokens (admins: everyone's; others: their own)")
def list_tokens(ctx: Context, who: Changer, user: Annotated[str | None, Query(max_length=64)] = None
                ) -> list[dict[str, Any]]:
    with ctx.database.session() as session:
        return users.list_tokens(session, user if who.is_admin else who.name)


@router.post("/tokens", status_code=201, responses=ERRORS, summary="Create an API token (shown once)")
def create_token(ctx: Context, who: Changer, body: NewToken) -> CreatedToken:
    if who.via == "token":  # else a leaked token could renew itself forever, past any expiry
        raise HTTPException(403, "a token cannot create tokens: log in (page or API session) or use the CLI")
    owner = body.user or who.name
    if owner != who.name and not who.is_admin:
        raise HTTPException(403, "this needs the admin role (you are a viewer)")
    with user_errors(), ctx.database.session() as session:
        token = users.create_token(session, owner, body.label, who.name, body.days)
        created = users.list_tokens(session, owner)[-1]
    return CreatedToken(token=token, prefix=created["prefix"], user=owner, expires_at=created["expires_at"])


@router.delete("/tokens/{token_id}", responses=ERRORS, summary="Revoke an API token: refused from now on")
def revoke_token(ctx: Context, who: Changer, token_id: RowId) -> Message:
    with user_errors(), ctx.database.session() as session:
        users.revoke_token(session, token_id, who.name, owner=None if who.is_admin else who.name)
    return Message(message=f"token {token_id} revoked")
