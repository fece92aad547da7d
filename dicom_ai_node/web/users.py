"""Local users, login sessions and API tokens: hashing and lookups, no HTTP here.

Passwords are hashed with scrypt (hashlib, no extra dependency), each with its own salt.
Session cookies and API tokens are random; the database keeps only their SHA-256, so a copy
of the database does not let anyone log in.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from dicom_ai_node import audit
from dicom_ai_node.db.models import ApiToken, WebSession, WebUser, as_utc, utcnow

ROLES = ("admin", "viewer")
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1
NAME_PATTERN = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")
MIN_PASSWORD = 8


class UserError(ValueError):
    """A refused user operation; the message says why."""


@dataclass(frozen=True)
class Principal:
    """Who is making a request."""

    name: str
    role: str
    via: str  # "session" or "token"

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P)
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${salt.hex()}${digest.hex()}"


def verify_password(password: str, stored: str) -> bool:
    try:
        _scheme, n, r, p, salt, digest = stored.split("$")
        candidate = hashlib.scrypt(password.encode(), salt=bytes.fromhex(salt), n=int(n), r=int(r),
                                   p=int(p))
    except (ValueError, MemoryError):
        return False
    return hmac.compare_digest(candidate.hex(), digest)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_user(session: Session, name: str, password: str, role: str, actor: str) -> WebUser:
    if not NAME_PATTERN.match(name):
        raise UserError("user name: 1..64 letters, digits or _ . @ -")
    if role not in ROLES:
        raise UserError(f"role must be one of {', '.join(ROLES)}")
    if len(password) < MIN_PASSWORD:
        raise UserError(f"password: at least {MIN_PASSWORD} characters")
    if session.scalar(select(WebUser).where(WebUser.name == name)) is not None:
        raise UserError(f"user {name!r} exists already")
    user = WebUser(name=name, password_hash=hash_password(password), role=role)
    session.add(user)
    audit.record(session, actor, "users.add", name, role=role)
    return user


def list_users(session: Session) -> list[WebUser]:
    return list(session.scalars(select(WebUser).order_by(WebUser.name)))


def create_token(session: Session, name: str, label: str | None, actor: str) -> str:
    user = session.scalar(select(WebUser).where(WebUser.name == name))
    if user is None:
        raise UserError(f"no user {name!r}")
    token = "dan_" + secrets.token_urlsafe(32)
    session.add(ApiToken(user_id=user.id, token_hash=token_hash(token), label=label))
    audit.record(session, actor, "users.token", name, label=label)
    return token


def authenticate(session: Session, name: str, password: str) -> WebUser | None:
    user = session.scalar(select(WebUser).where(WebUser.name == name))
    if user is None:
        verify_password(password, hash_password("timing"))  # same cost whether or not the user exists
        return None
    return user if verify_password(password, user.password_hash) else None


def start_session(session: Session, user: WebUser, hours: float) -> str:
    token = secrets.token_urlsafe(32)
    session.execute(delete(WebSession).where(WebSession.expires_at < utcnow()))  # tidy up
    session.add(WebSession(token_hash=token_hash(token), user_id=user.id,
                           expires_at=utcnow() + timedelta(hours=hours)))
    return token


def end_session(session: Session, token: str) -> None:
    session.execute(delete(WebSession).where(WebSession.token_hash == token_hash(token)))


def principal_for_session(session: Session, token: str) -> Principal | None:
    row = session.get(WebSession, token_hash(token))
    if row is None or as_utc(row.expires_at) < utcnow():
        return None
    user = session.get(WebUser, row.user_id)
    return Principal(user.name, user.role, "session") if user else None


def principal_for_token(session: Session, token: str) -> Principal | None:
    row = session.scalar(select(ApiToken).where(ApiToken.token_hash == token_hash(token)))
    if row is None:
        return None
    row.last_used_at = utcnow()
    user = session.get(WebUser, row.user_id)
    return Principal(user.name, user.role, "token") if user else None
