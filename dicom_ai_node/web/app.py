"""The FastAPI application: REST API under /api (OpenAPI at /docs), admin pages, health and
metrics. Built from a WebContext so tests can run it in-process on a temp database."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from sqlalchemy import text

from dicom_ai_node.web import api, metrics, pages, stow
from dicom_ai_node.web.auth import LoginRequired
from dicom_ai_node.web.context import WebContext

HERE = Path(__file__).parent


def create_app(context: WebContext) -> FastAPI:
    app = FastAPI(title="dicom-ai-node", version="1",
                  description="Admin API of a DICOM AI node. Log in on the admin page (session cookie, "
                              "then send X-CSRF-Token on changes) or send `Authorization: Bearer <token>` "
                              "(`dicom-ai-node users token NAME`). Role viewer reads, admin changes.")
    app.state.context = context
    app.include_router(api.router)
    app.include_router(pages.router)
    if context.config.dicomweb.stow_enabled:  # STOW-RS in: a second way in beside C-STORE
        app.include_router(stow.router)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")

    @app.exception_handler(LoginRequired)
    def to_login(request: Request, _error: LoginRequired):
        return RedirectResponse(f"/login?next={request.url.path}", status_code=303)

    @app.get("/healthz", tags=["health"], summary="The process answers")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"], summary="The database answers and the node's parts run",
             responses={503: {"description": "not ready; the body says which part"}})
    def readyz():
        checks = dict(context.ready())
        try:
            with context.database.session() as session:
                session.execute(text("SELECT 1"))
            checks["database"] = True
        except Exception:  # any database error means "not ready", never a 500
            checks["database"] = False
        ready = all(checks.values())
        from fastapi.responses import JSONResponse

        return JSONResponse({"ready": ready, "checks": checks}, status_code=200 if ready else 503)

    @app.get("/metrics", tags=["health"], response_class=PlainTextResponse,
             summary="Prometheus metrics (no login: no patient data in them)")
    def prometheus() -> Response:
        return Response(metrics.render(context.database, context.config.node.storage_dir),
                        media_type="text/plain; version=0.0.4")

    return app
