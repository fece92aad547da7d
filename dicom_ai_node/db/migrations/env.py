"""Alembic environment: runs on the connection the node hands over (Database.upgrade)."""

from alembic import context

from dicom_ai_node.db.models import Base

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations through dicom-ai-node (Database.upgrade / `dicom-ai-node db upgrade`)")
context.configure(connection=connection, target_metadata=Base.metadata,
                  render_as_batch=connection.dialect.name == "sqlite")
with context.begin_transaction():
    context.run_migrations()
