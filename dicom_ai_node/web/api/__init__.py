"""The REST API under /api (OpenAPI at /docs): one module per resource."""

from fastapi import APIRouter

from . import audit, dead_letters, destinations, jobs, models, retractions, rules, studies, users

router = APIRouter(prefix="/api")
for module in (studies, jobs, retractions, dead_letters, rules, destinations, models, audit, users):
    router.include_router(module.router)
