"""Alembic environment: runs against the engine the node hands over."""

from __future__ import annotations

from alembic import context

from node.store import models  # noqa: F401 (registers the tables)
from node.store.db import Base, make_engine

config = context.config
engine = config.attributes.get("engine")
if engine is None:
    engine = make_engine(config.get_main_option("sqlalchemy.url") or "sqlite://")

with engine.connect() as connection:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()
    connection.commit()
