"""The admin pages: server-rendered HTML (Jinja2, autoescape on: DICOM text such as patient
names is shown escaped everywhere). Forms post back here with a CSRF token and redirect."""

from __future__ import annotations

import secrets
from datetime import timezone
from pathlib import Path
from typing import Annotated
from urllib.parse import urlencode

from fastapi import APIRouter, Form, HTTPException, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from jinja2 import Environment, FileSystemLoader
from pydantic import ValidationError
from sqlalchemy import func, select

from dicom_ai_node import inspect
from dicom_ai_node.db.models import Delivery, Job, JobState, ResultObject, RuleSetVersion, Study, utcnow
from dicom_ai_node.deliver.destinations import delivery_counts, list_destinations, to_json
from dicom_ai_node.deliver.outbox import dead_letters
from dicom_ai_node.jobs import retraction, review
from dicom_ai_node.jobs.review import MAX_COMMENT
from dicom_ai_node.retention import storage_use
from dicom_ai_node.storage import Storage
from dicom_ai_node.web import actions, previews, rules_editing, users
from dicom_ai_node.web.actions import NotFound, Refused
from dicom_ai_node.web.api.audit import audit_events
from dicom_ai_node.web.api.common import PageNumber, RowId, Version
from dicom_ai_node.web.api.destinations import DestinationFields
from dicom_ai_node.web.api.models import models_json
from dicom_ai_node.web.auth import (SESSION_COOKIE, Context, LoginFailed, LoginThrottled, PageAdmin, PageChanger,
                                    PageUser, _csrf_ok, client_address, log_in)
from dicom_ai_node.web.rules_editing import RulesInvalid

router = APIRouter(include_in_schema=False)
templates = Jinja2Templates(env=Environment(loader=FileSystemLoader(Path(__file__).parent / "templates"),
                                            autoescape=True))
LOGIN_CSRF_COOKIE = "dan_login_csrf"


def _when(moment) -> str:
    if moment is None:
        return ""
    moment = moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def _ago(moment) -> str:
    if moment is None:
        return ""
    moment = moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)
    seconds = int((utcnow() - moment).total_seconds())
    return f"{seconds}s ago" if seconds < 120 else f"{seconds // 60} min ago" if seconds < 7200 else _when(moment)


templates.env.filters["when"] = _when
templates.env.filters["ago"] = _ago


def render(request: Request, name: str, user, **values) -> HTMLResponse:
    values.update(user=user, csrf=getattr(request.state, "csrf", ""), msg=request.query_params.get("msg"),
                  error=values.get("error") or request.query_params.get("error"))
    return templates.TemplateResponse(request, name, values)


def back(path: str, **flash) -> RedirectResponse:
    return RedirectResponse(f"{path}?{urlencode(flash)}" if flash else path, status_code=303)


# ---- login


@router.get("/login")
def login_page(request: Request, next: str = "/", error: str | None = None):
    token = secrets.token_urlsafe(16)
    response = templates.TemplateResponse(request, "login.html", {"user": None, "csrf": token, "next": next,
                                                                  "error": error, "msg": None})
    response.set_cookie(LOGIN_CSRF_COOKIE, token, httponly=True, samesite="strict")
    return response


@router.post("/login")
def login(request: Request, ctx: Context, name: Annotated[str, Form(max_length=64)],
          password: Annotated[str, Form(max_length=1024)], csrf_token: Annotated[str, Form()] = "",
          next: Annotated[str, Form()] = "/"):
    cookie = request.cookies.get(LOGIN_CSRF_COOKIE, "")
    if not cookie or not secrets.compare_digest(cookie, csrf_token):
        return back("/login", error="the login form expired; try again")
    try:
        token = log_in(ctx, client_address(request), name, password)
    except LoginThrottled as throttled:  # the form again, with the reason; scripts read Retry-After
        response = login_page(request, next, error=str(throttled))
        response.status_code = 429
        response.headers["Retry-After"] = str(throttled.retry_after_s)
        return response
    except LoginFailed:
        return back("/login", error="wrong user name or password")
    response = RedirectResponse(_local(next, fallback="/"), status_code=303)
    response.set_cookie(SESSION_COOKIE, token, httponly=True, samesite="lax",
                        secure=request.url.scheme == "https", max_age=int(ctx.config.web.session_hours * 3600))
    response.delete_cookie(LOGIN_CSRF_COOKIE)
    return response


@router.post("/logout")
def logout(request: Request, ctx: Context, _user: PageUser, csrf_token: Annotated[str, Form()] = ""):
    if not _csrf_ok(request, csrf_token):
        raise HTTPException(403, "the form's CSRF token is missing or wrong; reload the page")
    with ctx.database.session() as session:
        users.end_session(session, request.cookies.get(SESSION_COOKIE, ""))
    response = back("/login", msg="logged out")
    response.delete_cookie(SESSION_COOKIE)
    return response


# ---- dashboard and studies


@router.get("/")
def dashboard(request: Request, ctx: Context, user: PageUser):
    with ctx.database.session() as session:
        arriving = inspect.list_studies(session, 20, state="receiving")
        recent = inspect.list_studies(session, 25)
        active = session.scalars(select(Job).where(Job.state.in_(
            [JobState.running, JobState.encoding, JobState.delivering])).order_by(Job.id)).all()
        running = [_progress(job) for job in active]
        failures = session.scalars(select(Job).where(Job.state == JobState.failed)
                                   .order_by(Job.finished_at.desc()).limit(10)).all()
        failed = [{"id": j.id, "study": j.study_instance_uid, "model": j.model_name, "reason": j.reason,
                   "at": j.finished_at} for j in failures]
        queued = session.scalar(select(func.count()).where(Job.state == JobState.queued))
        held = session.scalar(select(func.count()).where(Job.state == JobState.held))
        pending = session.scalar(select(func.count()).where(Delivery.state == "pending"))
        storage = storage_use(session)
    return render(request, "dashboard.html", user, arriving=arriving, recent=recent, running=running,
                  failed=failed, queued=queued, held=held, pending=pending, storage=storage)


def _progress(job: Job) -> dict:
    """Where a running job is: its step, and for delivery how many objects are sent."""
    steps = ["running", "encoding", "delivering", "done"]
    deliveries = [d for result in job.results for d in result.deliveries]
    sent = sum(1 for d in deliveries if d.state == "sent")
    percent = 100 * steps.index(job.state.value) // 3
    if job.state == JobState.delivering and deliveries:
        percent += int(33 * sent / len(deliveries))
    return {"id": job.id, "study": job.study_instance_uid, "model": job.model_name, "state": job.state.value,
            "started_at": job.started_at, "sent": sent, "deliveries": len(deliveries), "percent": min(percent, 99)}


@router.get("/studies")
def studies(request: Request, ctx: Context, user: PageUser, q: str = "", state: str = "",
            page: PageNumber = 0):
    with ctx.database.session() as session:
        listing = inspect.list_studies(session, 50, max(page, 0) * 50, text=q[:128] or None,
                                       state=state if state in ("receiving", "complete") else None)
    return render(request, "studies.html", user, studies=listing, q=q, state=state, page=max(page, 0))


@router.get("/studies/{study_uid}")
def study(request: Request, ctx: Context, user: PageUser, study_uid: str):
    with ctx.database.session() as session:
        detail = inspect.study_detail(session, study_uid[:64])
    if detail is None:
        raise HTTPException(404, "no such study")
    evaluations: dict[int, list] = {}
    for decision in detail["decisions"]:
        evaluations.setdefault(decision["evaluation"], []).append(decision)
    return render(request, "study.html", user, study=detail, evaluations=sorted(evaluations.items(), reverse=True),
                  max_comment=MAX_COMMENT)


@router.get("/results/{result_id}/file")
def result_file(ctx: Context, _user: PageUser, result_id: RowId):
    """The result object as a DICOM file (Part 10), for download."""
    with ctx.database.session() as session:
        result = _result(session, result_id)
        path = _storage(ctx).absolute(result.path)
    if not Path(path).is_file():
        raise HTTPException(404, "the result's file is gone")
    return FileResponse(path, media_type="application/dicom", filename=f"{result.sop_instance_uid}.dcm")


@router.get("/results/{result_id}/image.png")
def key_image(ctx: Context, _user: PageUser, result_id: RowId):
    """A key image (Secondary Capture result) as PNG, for the held-results and study pages."""
    with ctx.database.session() as session:
        result = _result(session, result_id)
        try:
            png = previews.key_image_png(previews.key_image_path(_storage(ctx), result))
        except previews.NoPreview as error:
            raise HTTPException(404, str(error)) from None
    return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})


def _result(session, result_id: int) -> ResultObject:
    result = session.get(ResultObject, result_id)
    if result is None:
        raise HTTPException(404, "no such result")
    return result


def _storage(ctx) -> Storage:
    return Storage(ctx.config.node.storage_dir, 0)


# ---- held results (failed their quality checks under policy "hold")


@router.get("/held")
def held_page(request: Request, ctx: Context, user: PageUser):
    with ctx.database.session() as session:
        jobs = [_held_json(session, job) for job in review.held_jobs(session)]
        reviewed = review.recent_reviews(session)
    return render(request, "held.html", user, jobs=jobs, reviewed=reviewed, max_comment=MAX_COMMENT)


def _held_json(session, job: Job) -> dict:
    study = session.get(Study, job.study_instance_uid)
    return {"id": job.id, "model": job.model_name, "model_version": job.model_version, "rule": job.rule_name,
            "reason": job.reason, "destinations": job.destinations, "created_at": job.created_at,
            "study": {"study_instance_uid": study.study_instance_uid, "patient_name": study.patient_name,
                      "patient_id": study.patient_id, "description": study.study_description},
            "checks": inspect.quality_checks_json(job.quality_checks),
            "key_images": [r.id for r in job.results if r.kind == previews.KEY_IMAGE],
            "results": [r.kind for r in job.results]}


@router.post("/jobs/{job_id}/release")
def release(ctx: Context, user: PageAdmin, job_id: RowId, comment: Annotated[str, Form(max_length=MAX_COMMENT)] = "",
            next: Annotated[str, Form()] = "/held"):
    return _review(ctx, user, job_id, "release", comment, next)


@router.post("/jobs/{job_id}/reject")
def reject(ctx: Context, user: PageAdmin, job_id: RowId, comment: Annotated[str, Form(max_length=MAX_COMMENT)] = "",
           next: Annotated[str, Form()] = "/held"):
    return _review(ctx, user, job_id, "reject", comment, next)


def _review(ctx, user, job_id: int, decision: str, comment: str, next: str) -> RedirectResponse:
    """Release or reject held results, then back to the page the form was on."""
    target = _local(next, fallback="/held")
    try:
        with ctx.database.session() as session:
            if decision == "release":
                queued = actions.release_job(session, job_id, user.name, comment)
                message = f"job {job_id} released: {queued} deliveries queued"
            else:
                actions.reject_job(session, job_id, user.name, comment)
                message = f"job {job_id} rejected: its results are never sent"
    except (NotFound, Refused) as error:
        return back(target, error=str(error))
    if decision == "release":
        ctx.kick_outbox()
    return back(target, msg=message)


def _local(path: str, fallback: str) -> str:
    """A redirect target on this site only (a form field could name another)."""
    return path if path.startswith("/") and not path.startswith("//") and "\\" not in path else fallback


@router.post("/jobs/{job_id}/retry")
def retry(ctx: Context, user: PageAdmin, job_id: RowId, study: Annotated[str, Form()] = ""):
    try:
        with ctx.database.session() as session:
            how = actions.retry_job(session, job_id, user.name)
    except (NotFound, Refused) as error:
        return back(f"/studies/{study}", error=str(error))
    ctx.submit_job(job_id) if how == "run" else ctx.kick_outbox()
    return back(f"/studies/{study}", msg=f"job {job_id} queued again" if how == "run"
                else f"job {job_id}: results queued for delivery again")


@router.post("/jobs/{job_id}/cancel")
def cancel(ctx: Context, user: PageAdmin, job_id: RowId, study: Annotated[str, Form()] = ""):
    try:
        with ctx.database.session() as session:
            actions.cancel_job(session, job_id, user.name)
    except (NotFound, Refused) as error:
        return back(f"/studies/{study}", error=str(error))
    return back(f"/studies/{study}", msg=f"job {job_id} cancelled")


@router.post("/deliveries/{delivery_id}/resend")
def resend(ctx: Context, user: PageAdmin, delivery_id: RowId, study: Annotated[str, Form()] = ""):
    try:
        with ctx.database.session() as session:
            actions.resend_delivery(session, delivery_id, user.name)
    except (NotFound, Refused) as error:
        return back(f"/studies/{study}", error=str(error))
    ctx.kick_outbox()
    return back(f"/studies/{study}", msg=f"delivery {delivery_id} queued again")


# ---- rules


@router.get("/rules")
def rules_page(request: Request, ctx: Context, user: PageUser, version: Version = None):
    with ctx.database.session() as session:
        active = ctx.rules.active_version(session)
        shown = session.get(RuleSetVersion, version or active) if (version or active) else None
        history = rules_editing.versions(session)
    return render(request, "rules.html", user, text=shown.text if shown else "", active=active,
                  shown=shown.version if shown else None, versions=history, problems=None, dry=None, comment="")


@router.post("/rules")
def rules_action(request: Request, ctx: Context, user: PageUser, text: Annotated[str, Form(max_length=200_000)] = "",
                 action: Annotated[str, Form()] = "validate", comment: Annotated[str, Form(max_length=1000)] = "",
                 csrf_token: Annotated[str, Form()] = ""):
    """Validate and dry-run are open to viewers (they change nothing); save needs an admin."""
    if not _csrf_ok(request, csrf_token):
        raise HTTPException(403, "the form's CSRF token is missing or wrong; reload the page")
    problems, dry, msg = rules_editing.validate(ctx, text), None, None
    with ctx.database.session() as session:
        if not problems and action == "dryrun":
            dry = rules_editing.dry_run(ctx, session, text)
        elif not problems and action == "save":
            if not user.is_admin:
                raise HTTPException(403, "this needs the admin role (you are a viewer)")
            version = rules_editing.save(ctx, session, text, user.name, comment or None)
            return back("/rules", msg=f"saved as version {version}; it applies to the next study that completes")
        elif not problems:
            msg = "valid: the rule set can be saved"
        active = ctx.rules.active_version(session)
        history = rules_editing.versions(session)
    return render(request, "rules.html", user, text=text, active=active, shown=None, versions=history,
                  problems=problems, dry=dry, comment=comment, note=msg)


@router.post("/rules/rollback")
def rules_rollback(ctx: Context, user: PageAdmin, version: Annotated[int, Form()]):
    try:
        with ctx.database.session() as session:
            new = rules_editing.rollback(ctx, session, version, user.name)
    except RulesInvalid as invalid:
        return back("/rules", error="cannot roll back: " + "; ".join(invalid.problems))
    except LookupError as error:
        return back("/rules", error=str(error))
    return back("/rules", msg=f"version {version} is active again (saved as version {new})")


# ---- destinations, models, audit


@router.get("/destinations")
def destinations_page(request: Request, ctx: Context, user: PageUser, edit: str | None = None):
    with ctx.database.session() as session:
        counts = delivery_counts(session)
        rows = [{**to_json(row), **counts.get(row.name, {"pending": 0, "failed": 0})}
                for row in list_destinations(session)]
    editing = next((row for row in rows if row["name"] == edit), None)
    return render(request, "destinations.html", user, destinations=rows, editing=editing)


@router.post("/destinations")
def destination_save(ctx: Context, user: PageAdmin, name: Annotated[str, Form()], ae_title: Annotated[str, Form()] = "",
                     host: Annotated[str, Form()] = "", port: Annotated[str, Form()] = "",
                     calling_ae_title: Annotated[str, Form()] = "", max_attempts: Annotated[str, Form()] = "5",
                     backoff_s: Annotated[str, Form()] = "2", timeout_s: Annotated[str, Form()] = "30",
                     mode: Annotated[str, Form()] = "create", kind: Annotated[str, Form()] = "dimse",
                     url: Annotated[str, Form()] = ""):
    try:
        fields = DestinationFields(kind=kind, ae_title=ae_title or None, host=host or None, port=port or None,
                                   calling_ae_title=calling_ae_title or None, url=url or None,
                                   max_attempts=max_attempts, backoff_s=backoff_s, timeout_s=timeout_s)
        if not name or len(name) > 64 or not all(c.isalnum() or c in "_.-" for c in name):
            raise ValueError("name: 1..64 letters, digits or _ . -")
        with ctx.database.session() as session:
            actions.save_destination(session, name, fields.model_dump(), user.name, create=mode == "create")
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
        return back("/destinations", error=problems)
    except (ValueError, NotFound, Refused) as error:
        return back("/destinations", error=str(error))
    return back("/destinations", msg=f"destination {name} saved")


@router.post("/destinations/{name}/delete")
def destination_delete(ctx: Context, user: PageAdmin, name: str):
    try:
        with ctx.database.session() as session:
            actions.delete_destination(ctx, session, name, user.name)
    except (NotFound, Refused) as error:
        return back("/destinations", error=str(error))
    return back("/destinations", msg=f"destination {name} deleted")


@router.post("/destinations/{name}/echo")
def destination_echo(ctx: Context, user: PageAdmin, name: str):
    try:
        ok, message = actions.echo_destination(ctx, name, user.name)
    except NotFound as error:
        return back("/destinations", error=str(error))
    return back("/destinations", **({"msg": f"{name}: {message}"} if ok else {"error": f"{name}: {message}"}))


# ---- pause a destination, dead letters (deliveries that failed for good)


@router.post("/destinations/{name}/pause")
def destination_pause(ctx: Context, user: PageAdmin, name: str):
    try:
        with ctx.database.session() as session:
            pending = actions.pause_destination(session, name, user.name)
    except (NotFound, Refused) as error:
        return back("/destinations", error=str(error))
    return back("/destinations", msg=f"destination {name} paused: {pending} deliveries wait for it")


@router.post("/destinations/{name}/resume")
def destination_resume(ctx: Context, user: PageAdmin, name: str):
    try:
        with ctx.database.session() as session:
            pending = actions.resume_destination(session, name, user.name)
    except (NotFound, Refused) as error:
        return back("/destinations", error=str(error))
    ctx.kick_outbox()
    return back("/destinations", msg=f"destination {name} resumed: {pending} deliveries go now")


@router.get("/dead-letters")
def dead_letters_page(request: Request, ctx: Context, user: PageUser, destination: str = "",
                      page: PageNumber = 0):
    page = max(page, 0)
    with ctx.database.session() as session:
        letters = dead_letters(session, destination[:64] or None, 100, page * 100)
        counts = {name: c["failed"] for name, c in sorted(delivery_counts(session).items()) if c["failed"]}
    return render(request, "dead_letters.html", user, letters=letters, counts=counts, destination=destination,
                  page=page)


@router.post("/dead-letters/{delivery_id}/retry")
def dead_letter_retry(ctx: Context, user: PageAdmin, delivery_id: RowId):
    try:
        with ctx.database.session() as session:
            actions.retry_dead_letter(session, delivery_id, user.name)
    except (NotFound, Refused) as error:
        return back("/dead-letters", error=str(error))
    ctx.kick_outbox()
    return back("/dead-letters", msg=f"delivery {delivery_id} queued again")


@router.post("/dead-letters/retry")
def dead_letters_retry(ctx: Context, user: PageAdmin, destination: Annotated[str, Form(max_length=64)] = ""):
    with ctx.database.session() as session:
        count = actions.retry_dead_letters(session, user.name, destination or None)
    ctx.kick_outbox()
    return back("/dead-letters", msg=f"{count} deliveries queued again")


@router.get("/models")
def models_page(request: Request, ctx: Context, user: PageUser, page: PageNumber = 0):
    with ctx.database.session() as session:
        rows = models_json(ctx, session)
        recalled = {name: {"version": version, "jobs": retraction.delivered_results_of(
                        session, name, version, limit=RECALL_PAGE, offset=page * RECALL_PAGE)}
                    for name, version in retraction.recalls(session).items()}
        processes = _processes(session)
    return render(request, "models.html", user, models=rows, problems=ctx.models.problems, recalled=recalled,
                  page=page, page_size=RECALL_PAGE, max_reason=retraction.MAX_REASON, processes=processes)


def _processes(session) -> list[dict]:
    """Where jobs run: the node's processes (cluster.py), workers with their device and queues."""
    from dicom_ai_node import cluster
    from dicom_ai_node.db.models import LeaderLease, NodeProcess

    alive = {process.name for process in cluster.live_processes(session)}
    leader = session.scalar(select(LeaderLease.holder))
    rows = session.scalars(select(NodeProcess).order_by(NodeProcess.role, NodeProcess.name).limit(200)).all()
    return [{"name": p.name, "role": p.role, "device": p.device, "queues": p.queues, "concurrency": p.concurrency,
             "last_seen_at": p.last_seen_at, "alive": p.name in alive, "leader": p.name == leader} for p in rows]


# ---- retraction (jobs/retraction.py): one job from the study page, a recalled version's in bulk

RECALL_PAGE = 50  # jobs of a recalled version listed (and retracted) per page


@router.post("/models/{name}/recall")
def model_recall(ctx: Context, user: PageAdmin, name: str, version: Annotated[str, Form(max_length=64)] = ""):
    if name not in ctx.models.manifests:
        return back("/models", error=f"no model {name!r} installed")
    try:
        with ctx.database.session() as session:
            retraction.recall(session, name, version, user.name)
    except ValueError as error:
        return back("/models", error=str(error))
    return back("/models", msg=f"model {name} disabled, version {version.strip()} recalled: its delivered results are listed below")


@router.post("/models/{name}/retract")
def model_retract(ctx: Context, user: PageAdmin, name: str,
                  job_ids: Annotated[list[int], Form(max_length=retraction.MAX_BULK)] = [],  # noqa: B006
                  reason: Annotated[str, Form(max_length=retraction.MAX_REASON)] = ""):
    if not job_ids:
        return back("/models", error="tick the jobs to retract")
    try:
        outcome = retraction.retract_jobs(ctx.database, _storage(ctx), job_ids, user.name, reason)
    except ValueError as error:
        return back("/models", error=str(error))
    if outcome.retracted:
        ctx.kick_outbox()
    refused = "; ".join(f"job {job_id}: {why}" for job_id, why in list(outcome.refused.items())[:5])
    message = f"{len(outcome.retracted)} job(s) of {name} retracted: rejection notes queued"
    return back("/models", msg=message, **({"error": refused} if refused else {}))


@router.post("/jobs/{job_id}/retract")
def retract(ctx: Context, user: PageAdmin, job_id: RowId, study: Annotated[str, Form()] = "",
            reason: Annotated[str, Form(max_length=retraction.MAX_REASON)] = ""):
    try:
        with ctx.database.session() as session:
            retraction.retract(session, _storage(ctx), job_id, user.name, reason)
    except (LookupError, ValueError) as error:
        return back(f"/studies/{study}", error=str(error))
    ctx.kick_outbox()
    return back(f"/studies/{study}", msg=f"job {job_id} retracted: its rejection note is queued")


@router.post("/models/{name}/toggle")
def model_toggle(ctx: Context, user: PageAdmin, name: str, enable: Annotated[bool, Form()]):
    try:
        with ctx.database.session() as session:
            actions.set_model_enabled(ctx, session, name, enable, user.name)
    except NotFound as error:
        return back("/models", error=str(error))
    return back("/models", msg=f"model {name} {'enabled' if enable else 'disabled'}")


@router.get("/audit")
def audit_page(request: Request, ctx: Context, user: PageUser, actor: str = "", action: str = "",
               page: PageNumber = 0):
    page = max(page, 0)
    with ctx.database.session() as session:
        events = audit_events(session, actor[:64] or None, action[:64] or None, 100, page * 100)
    return render(request, "audit.html", user, events=events, actor=actor, action=action, page=page)


# ---- users and API tokens (issue 13 §5): admins manage everyone, others their own password and tokens


@router.get("/users")
def users_page(request: Request, ctx: Context, user: PageUser):
    return _users_page(request, ctx, user)


def _users_page(request: Request, ctx, user, **values) -> HTMLResponse:
    with ctx.database.session() as session:
        people = [users.user_json(u) for u in users.list_users(session)] if user.is_admin else []
        tokens = users.list_tokens(session, None if user.is_admin else user.name)
    return render(request, "users.html", user, people=people, tokens=tokens, roles=users.ROLES,
                  default_days=users.TOKEN_DAYS_DEFAULT, max_days=users.TOKEN_DAYS_MAX, **values)


def _user_change(change, done: str) -> RedirectResponse:
    try:
        change()
    except users.UserError as error:
        return back("/users", error=str(error))
    return back("/users", msg=done)


@router.post("/users")
def user_add(ctx: Context, admin: PageAdmin, name: Annotated[str, Form(max_length=64)],
             password: Annotated[str, Form(max_length=1024)], role: Annotated[str, Form()] = "viewer"):
    def add():
        with ctx.database.session() as session:
            users.create_user(session, name, password, role, admin.name)
    return _user_change(add, f"user {name} ({role}) added")


@router.post("/users/{name}/role")
def user_role(ctx: Context, admin: PageAdmin, name: str, role: Annotated[str, Form()]):
    def set_role():
        with ctx.database.session() as session:
            users.set_role(session, name, role, admin.name)
    return _user_change(set_role, f"{name} is now {role}")


@router.post("/users/{name}/disable")
def user_disable(ctx: Context, admin: PageAdmin, name: str, enable: Annotated[bool, Form()] = False):
    def disable():
        with ctx.database.session() as session:
            users.set_disabled(session, name, not enable, admin.name)
    return _user_change(disable, f"user {name} {'enabled' if enable else 'disabled'}")


@router.post("/users/{name}/delete")
def user_delete(ctx: Context, admin: PageAdmin, name: str):
    def delete():
        with ctx.database.session() as session:
            users.delete_user(session, name, admin.name)
    return _user_change(delete, f"user {name} deleted")


@router.post("/users/{name}/password")
def user_password(request: Request, ctx: Context, who: PageChanger, name: str,
                  password: Annotated[str, Form(max_length=1024)],
                  current_password: Annotated[str, Form(max_length=1024)] = ""):
    own = who.name == name
    if not own and not who.is_admin:
        raise HTTPException(403, "this needs the admin role (you are a viewer)")

    def change():
        with ctx.database.session() as session:
            users.change_password(session, name, password, who.name, current=current_password if own else None,
                                  keep_session=request.cookies.get(SESSION_COOKIE) if own else None)
    return _user_change(change, f"password of {name} changed")


@router.post("/tokens")
def token_create(request: Request, ctx: Context, who: PageChanger, owner: Annotated[str, Form(max_length=64)] = "",
                 label: Annotated[str, Form(max_length=128)] = "", days: Annotated[int | None, Form()] = None):
    """The new token is shown in this answer only (never in a URL or a redirect)."""
    owner = owner or who.name
    if owner != who.name and not who.is_admin:
        raise HTTPException(403, "this needs the admin role (you are a viewer)")
    try:
        with ctx.database.session() as session:
            token = users.create_token(session, owner, label or None, who.name, days)
    except users.UserError as error:
        return back("/users", error=str(error))
    return _users_page(request, ctx, who, new_token=token, new_token_owner=owner)


@router.post("/tokens/{token_id}/revoke")
def token_revoke(ctx: Context, who: PageChanger, token_id: RowId):
    def revoke():
        with ctx.database.session() as session:
            users.revoke_token(session, token_id, who.name, owner=None if who.is_admin else who.name)
    return _user_change(revoke, f"token {token_id} revoked")
