"""Storage: SQLAlchemy models, sessions, Alembic migrations and the group-commit writer."""
