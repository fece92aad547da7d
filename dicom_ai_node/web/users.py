"""Local users, login sessions and API tokens: hashing, lookups and changes, no HTTP here.

Passwords are hashed with scrypt (hashlib, no extra dependency), each with its own salt; the
parameters are stored with the hash (``scrypt$N$r$p$salt$hash``), so older, cheaper hashes
still verify and are re-hashed at the current cost on the next successful login.
Session cookies and API tokens are random; the database keeps only their SHA-256, so a copy
of the database does not let anyone log in. Tokens expire (TOKEN_DAYS_DEFAULT, at most
TOKEN_DAYS_MAX) and can be revoked. A disabled or deleted user's sessions and tokens are
refused at the next request. At least one enabled admin always remains. Every change is
audited (who, what, whom), never with a password or token.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import threading
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from dicom_ai_node import audit
from dicom_ai_node.db.models import ApiToken, WebSession, WebUser, as_utc, utcnow

ROLES = ("admin", "viewer", "sender")  # sender: only STOW-RS (web/stow.py), with a token
NAME_PATTERN = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")
MIN_PASSWORD = 8
TOKEN_DAYS_DEFAULT = 90
TOKEN_DAYS_MAX = 365
TOKEN_PREFIX_LENGTH = 12  # "dan_" and 8 random characters: shown in lists to tell tokens apart


class UserError(ValueError):
    """A refused user operation; the message says why (HTTP 422)."""


class NotFound(UserError):
    """No such user or token (HTTP 404)."""


class Conflict(UserError):
    """Refused in this state: the name exists, or no enabled admin would remain (HTTP 409)."""


class WrongPassword(UserError):
    """The current password given to change one's own password is wrong (HTTP 403)."""


@dataclass(frozen=True)
class ScryptCost:
    n: int
    r: int
    p: int

    def weaker_than(self, other: ScryptCost) -> bool:
        return self.n < other.n or self.r < other.r or self.p < other.p


# OWASP Password Storage Cheat Sheet: scrypt with N >= 2^17, r >= 8, p >= 1 (128 MiB, ~0.5 s)
OWASP_MINIMUM = ScryptCost(2**17, 8, 1)
PRODUCTION_COST = ScryptCost(2**17, 8, 1)
_cost = PRODUCTION_COST  # only use_cheap_hashes_for_tests changes it
_hashing = threading.BoundedSemaphore(4)  # 128 MiB per hash: at most 4 at once
_dummy_hashes: dict[ScryptCost, str] = {}


def use_cheap_hashes_for_tests(cost: ScryptCost | None = None) -> None:
    """TESTS ONLY: hash new passwords at a lower cost so that test suites stay quick (None:
    back to PRODUCTION_COST). The node and the CLI never call this."""
    global _cost
    _cost = cost or PRODUCTION_COST


def current_cost() -> ScryptCost:
    return _cost


@dataclass(frozen=True)
class Principal:
    """Who is making a request."""

    name: str
    role: str
    via: str  # "session" or "token"

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


# ---- passwords


def _scrypt(password: str, salt: bytes, cost: ScryptCost) -> bytes:
    with _hashing:
        return hashlib.scrypt(password.encode("utf-8", "surrogatepass"), salt=salt, n=cost.n, r=cost.r, p=cost.p,
                              maxmem=128 * cost.r * (cost.n + cost.p + 2) + 2**20)


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    digest = _scrypt(password, salt, _cost)
    return f"scrypt${_cost.n}${_cost.r}${_cost.p}${salt.hex()}${digest.hex()}"


def hash_cost(stored: str) -> ScryptCost | None:
    try:
        scheme, n, r, p, _salt, _digest = stored.split("$")
        return ScryptCost(int(n), int(r), int(p)) if scheme == "scrypt" else None
    except ValueError:
        return None


def verify_password(password: str, stored: str) -> bool:
    cost = hash_cost(stored)
    if cost is None:
        return False
    try:
        candidate = _scrypt(password, bytes.fromhex(stored.split("$")[4]), cost)
    except (ValueError, MemoryError):
        return False
    return hmac.compare_digest(candidate.hex(), stored.split("$")[5])


def _check_password(password: str) -> None:
    if len(password) < MIN_PASSWORD:
        raise UserError(f"password: at least {MIN_PASSWORD} characters")


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


# ---- users


def create_user(session: Session, name: str, password: str, role: str, actor: str) -> WebUser:
    if not NAME_PATTERN.match(name):
        raise UserError("user name: 1..64 letters, digits or _ . @ -")
    if role not in ROLES:
        raise UserError(f"role must be one of {', '.join(ROLES)}")
    _check_password(password)
    if session.scalar(select(WebUser).where(WebUser.name == name)) is not None:
        raise Conflict(f"user {name!r} exists already")
    user = WebUser(name=name, password_hash=hash_password(password), role=role, disabled=False)
    session.add(user)
    audit.record(session, actor, "users.add", name, role=role)
    return user


def list_users(session: Session) -> list[WebUser]:
    return list(session.scalars(select(WebUser).order_by(WebUser.name)))


def user_json(user: WebUser) -> dict[str, Any]:
    return {"name": user.name, "role": user.role, "disabled": bool(user.disabled), "created_at": user.created_at}


def get_user(session: Session, name: str) -> WebUser:
    user = session.scalar(select(WebUser).where(WebUser.name == name))
    if user is None:
        raise NotFound(f"no user {name!r}")
    return user


def _keep_an_admin(session: Session, user: WebUser, change: str) -> None:
    """Refuse a change that would leave no enabled admin (the node could not be administered)."""
    if user.role != "admin" or user.disabled:
        return
    admins = session.scalar(select(func.count()).select_from(WebUser).where(
        WebUser.role == "admin", WebUser.disabled.is_(False)))
    if admins <= 1:
        raise Conflict(f"cannot {change} {user.name!r}: it is the only enabled admin")


def _end_sessions(session: Session, user: WebUser, keep: str | None = None) -> int:
    query = delete(WebSession).where(WebSession.user_id == user.id)
    if keep:
        query = query.where(WebSession.token_hash != token_hash(keep))
    return session.execute(query).rowcount


def set_disabled(session: Session, name: str, disabled: bool, actor: str) -> None:
    """Disable (its sessions end; its tokens are refused while disabled) or enable a user."""
    user = get_user(session, name)
    if disabled:
        _keep_an_admin(session, user, "disable")
        _end_sessions(session, user)
    user.disabled = disabled
    audit.record(session, actor, "users.disable" if disabled else "users.enable", name)


def set_role(session: Session, name: str, role: str, actor: str) -> None:
    if role not in ROLES:
        raise UserError(f"role must be one of {', '.join(ROLES)}")
    user = get_user(session, name)
    if role != "admin":
        _keep_an_admin(session, user, "make a viewer of")
    audit.record(session, actor, "users.role", name, role=role, was=user.role)
    user.role = role


def delete_user(session: Session, name: str, actor: str) -> None:
    """Delete a user with its sessions and tokens (the audit log keeps its name)."""
    user = get_user(session, name)
    _keep_an_admin(session, user, "delete")
    _end_sessions(session, user)
    tokens = session.execute(delete(ApiToken).where(ApiToken.user_id == user.id)).rowcount
    session.delete(user)
    audit.record(session, actor, "users.delete", name, role=user.role, tokens_revoked=tokens)


def change_password(session: Session, name: str, password: str, actor: str, current: str | None = None,
                    keep_session: str | None = None) -> None:
    """A new password. With ``current`` (one's own password) it must match. The user's other
    sessions end (``keep_session``, the cookie of the request, stays logged in); tokens stay."""
    user = get_user(session, name)
    if current is not None and not verify_password(current, user.password_hash):
        raise WrongPassword("the current password is wrong")
    _check_password(password)
    user.password_hash = hash_password(password)
    ended = _end_sessions(session, user, keep=keep_session)
    audit.record(session, actor, "users.password", name, sessions_ended=ended)


def _dummy_hash() -> str:
    if _cost not in _dummy_hashes:
        _dummy_hashes[_cost] = hash_password(secrets.token_hex(8))
    return _dummy_hashes[_cost]


def authenticate(session: Session, name: str, password: str) -> WebUser | None:
    """The user, when the password is right and the user is enabled. A hash made at a lower
    cost than the current one is replaced (audited as users.password_upgraded)."""
    user = session.scalar(select(WebUser).where(WebUser.name == name))
    if user is None or user.disabled:
        verify_password(password, _dummy_hash())  # the same cost whether or not the user may log in
        return None
    if not verify_password(password, user.password_hash):
        return None
    old = hash_cost(user.password_hash)
    if old is not None and old.weaker_than(_cost):
        user.password_hash = hash_password(password)
        audit.record(session, "node", "users.password_upgraded", user.name,
                     old=f"N={old.n},r={old.r},p={old.p}", new=f"N={_cost.n},r={_cost.r},p={_cost.p}")
    return user


# ---- sessions


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
    return Principal(user.name, user.role, "session") if user and not user.disabled else None


# ---- API tokens


def create_token(session: Session, name: str, label: str | None, actor: str, days: int | None = None) -> str:
    """A new token for user ``name``, valid ``days`` (default TOKEN_DAYS_DEFAULT); returned
    once, only its hash is kept."""
    days = TOKEN_DAYS_DEFAULT if days is None else days
    if not 1 <= days <= TOKEN_DAYS_MAX:
        raise UserError(f"token validity: 1 to {TOKEN_DAYS_MAX} days")
    if label is not None and len(label) > 128:
        raise UserError("token label: at most 128 characters")
    user = get_user(session, name)
    token = "dan_" + secrets.token_urlsafe(32)
    row = ApiToken(user_id=user.id, token_hash=token_hash(token), label=label or None,
                   prefix=token[:TOKEN_PREFIX_LENGTH], expires_at=utcnow() + timedelta(days=days))
    session.add(row)
    session.flush()
    audit.record(session, actor, "tokens.create", name, token=row.id, prefix=row.prefix, label=row.label,
                 days=days)
    return token


def list_tokens(session: Session, owner: str | None = None) -> list[dict[str, Any]]:
    query = select(ApiToken, WebUser.name).join(WebUser, WebUser.id == ApiToken.user_id).order_by(ApiToken.id)
    if owner is not None:
        query = query.where(WebUser.name == owner)
    now = utcnow()
    return [{"id": row.id, "prefix": row.prefix, "user": user, "label": row.label, "created_at": row.created_at,
             "last_used_at": row.last_used_at, "expires_at": row.expires_at,
             "expired": as_utc(row.expires_at) < now} for row, user in session.execute(query)]


def revoke_token(session: Session, token_id: int, actor: str, owner: str | None = None) -> None:
    """Delete a token: the next request with it is refused. With ``owner``, only that user's."""
    row = session.get(ApiToken, token_id)
    user = session.get(WebUser, row.user_id) if row else None
    if row is None or user is None or (owner is not None and user.name != owner):
        raise NotFound(f"no token {token_id}")
    session.delete(row)
    audit.record(session, actor, "tokens.revoke", user.name, token=row.id, prefix=row.prefix, label=row.label)


def principal_for_token(session: Session, token: str) -> Principal | None:
    row = session.scalar(select(ApiToken).where(ApiToken.token_hash == token_hash(token)))
    if row is None or as_utc(row.expires_at) < utcnow():
        return None
    user = session.get(WebUser, row.user_id)
    if user is None or user.disabled:
        return None
    row.last_used_at = utcnow()
    return Principal(user.name, user.role, "token")
