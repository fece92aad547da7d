"""The index: SQLAlchemy models, engine set-up and Alembic migrations."""

from dicom_ai_node.db.engine import Database
from dicom_ai_node.db.models import (AuditEvent, Base, Delivery, Instance, Job, JobState,
                                     ResultObject, RoutingDecision, RuleSetVersion, Series, Study)

__all__ = ["AuditEvent", "Base", "Database", "Delivery", "Instance", "Job", "JobState",
           "ResultObject", "RoutingDecision", "RuleSetVersion", "Series", "Study"]
