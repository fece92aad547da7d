"""The REST API under /api (OpenAPI at /docs): one module per resource."""

from fastapi import APIRouter

from . import audit, destinations, jobs, models, rules, studies

router = APIRouter(prefix="/api")
for module in (studies, jobs, rules, destinations, models, audit):
    router.include_router(module.router)
