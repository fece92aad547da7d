"""Who is asking, and may they: FastAPI dependencies for the API and the pages.

Two ways in: a login session (cookie, for the pages and the browser) or an API token
(`Authorization: Bearer ...`, for scripts). Cookie-authenticated requests that change
something must carry the CSRF token (form field `csrf_token` or header `X-CSRF-Token`),
which is an HMAC of the session token, so another site cannot forge them.

Logging in (`log_in`) is limited per user name and per client address (login_limits.py):
too many wrong passwords lock that name or address for a while (HTTP 429 with Retry-After).
Every failed login is audited and logged, never with the password.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from typing import Annotated

from fastapi import Depends, Form, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import select

from dicom_ai_node import audit
from dicom_ai_node.db.models import WebUser
from dicom_ai_node.web import users
from dicom_ai_node.web.context import WebContext
from dicom_ai_node.web.users import Principal

log = logging.getLogger(__name__)

SESSION_COOKIE = "dan_session"
CSRF_HEADER = "X-CSRF-Token"

bearer = HTTPBearer(auto_error=False, description="API token from the Users page, POST /api/tokens or "
                                                   "`dicom-ai-node tokens create NAME`")


class LoginRequired(Exception):
    """A page was asked for without a login: the app redirects to /login."""


class LoginFailed(Exception):
    """Wrong user name or password (which of the two is never said)."""


class LoginThrottled(Exception):
    """Too many failed logins for this user name or from this address: try again later."""

    def __init__(self, retry_after_s: int):
        super().__init__(f"too many failed logins; try again in {retry_after_s} s")
        self.retry_after_s = retry_after_s


def context(request: Request) -> WebContext:
    return request.app.state.context


def csrf_for(ctx: WebContext, session_token: str) -> str:
    return hmac.new(ctx.secret, session_token.encode(), hashlib.sha256).hexdigest()


def client_address(request: Request) -> str:
    """The peer's address (uvicorn takes X-Forwarded-For from a proxy on loopback)."""
    return request.client.host if request.client else "unknown"


def log_in(ctx: WebContext, address: str, name: str, password: str) -> str:
    """A new session token, or LoginThrottled / LoginFailed. Failures are audited and logged
    (the name only when such a user exists: a password typed into the name field stays out)."""
    limits = ctx.login_limits
    retry_after_s = limits.begin(name, address)
    if retry_after_s:
        raise LoginThrottled(retry_after_s)
    try:
        with ctx.database.session() as session:
            user = users.authenticate(session, name, password)
            if user is not None:
                audit.record(session, user.name, "login", user.name, address=address)
                token = users.start_session(session, user, ctx.config.web.session_hours)
    except Exception:
        limits.failed(name, address)  # counted like a wrong password: errors give no free attempts
        raise
    if user is not None:
        limits.succeeded(name, address)
        return token
    locks = limits.failed(name, address)
    with ctx.database.session() as session:
        known = session.scalar(select(WebUser.id).where(WebUser.name == name)) is not None
        target = name if known else None
        shown = repr(name) if known else "(unknown user name)"
        audit.record(session, "anonymous", "login.failed", target, address=address)
        log.warning("failed login for user %s from %s", shown, address)
        for lock in locks:
            is_user = lock.kind == "user"
            audit.record(session, "node", "login.locked", target if is_user else lock.key, kind=lock.kind,
                         seconds=lock.seconds)
            log.warning("logins for %s %s refused for %d s after repeated failures",
                        lock.kind, shown if is_user else lock.key, lock.seconds)
    raise LoginFailed()


def principal(request: Request,
              credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)] = None
              ) -> Principal | None:
    """The user behind this request, or None. A bearer token wins over a cookie."""
    ctx = context(request)
    with ctx.database.session() as session:
        if credentials is not None:
            return users.principal_for_token(session, credentials.credentials)
        token = request.cookies.get(SESSION_COOKIE)
        if token:
            found = users.principal_for_session(session, token)
            if found is not None:
                request.state.csrf = csrf_for(ctx, token)
            return found
    return None


def api_user(who: Annotated[Principal | None, Depends(principal)]) -> Principal:
    if who is None:
        raise HTTPException(401, "log in or send Authorization: Bearer <token>",
                            headers={"WWW-Authenticate": "Bearer"})
    if who.role == "sender":  # a PACS's STOW-RS account reads nothing (web/stow.py checks its own)
        raise HTTPException(403, "the role sender may only store with STOW-RS")
    return who


def api_admin(request: Request, who: Annotated[Principal, Depends(api_user)]) -> Principal:
    """An admin; with a session cookie the X-CSRF-Token header must match too."""
    if not who.is_admin:
        raise HTTPException(403, "this needs the admin role (you are a viewer)")
    if who.via == "session" and not _csrf_ok(request, request.headers.get(CSRF_HEADER)):
        raise HTTPException(403, f"missing or wrong {CSRF_HEADER} header")
    return who


def api_changer(request: Request, who: Annotated[Principal, Depends(api_user)]) -> Principal:
    """Any user changing their own things (password, tokens); with a session cookie the
    X-CSRF-Token header must match. Whether the change is theirs is checked by the endpoint."""
    if who.via == "session" and not _csrf_ok(request, request.headers.get(CSRF_HEADER)):
        raise HTTPException(403, f"missing or wrong {CSRF_HEADER} header")
    return who


def page_user(who: Annotated[Principal | None, Depends(principal)]) -> Principal:
    if who is None:
        raise LoginRequired()
    if who.role == "sender":
        raise HTTPException(403, "the role sender may only store with STOW-RS")
    return who


def page_admin(request: Request, who: Annotated[Principal, Depends(page_user)],
               csrf_token: Annotated[str, Form()] = "") -> Principal:
    """For page forms that change something: admin role and the form's CSRF token."""
    if not who.is_admin:
        raise HTTPException(403, "this needs the admin role (you are a viewer)")
    if not _csrf_ok(request, csrf_token):
        raise HTTPException(403, "the form's CSRF token is missing or wrong; reload the page")
    return who


def page_changer(request: Request, who: Annotated[Principal, Depends(page_user)],
                 csrf_token: Annotated[str, Form()] = "") -> Principal:
    """For page forms with which any user changes their own things: the form's CSRF token."""
    if not _csrf_ok(request, csrf_token):
        raise HTTPException(403, "the form's CSRF token is missing or wrong; reload the page")
    return who


def _csrf_ok(request: Request, presented: str | None) -> bool:
    expected = getattr(request.state, "csrf", None)
    return bool(expected and presented and hmac.compare_digest(expected, presented))


User = Annotated[Principal, Depends(api_user)]
Admin = Annotated[Principal, Depends(api_admin)]
PageUser = Annotated[Principal, Depends(page_user)]
PageAdmin = Annotated[Principal, Depends(page_admin)]
Changer = Annotated[Principal, Depends(api_changer)]
PageChanger = Annotated[Principal, Depends(page_changer)]
Context = Annotated[WebContext, Depends(context)]
