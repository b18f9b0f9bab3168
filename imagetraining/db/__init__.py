"""PostgreSQL: models, engine (embedded pgserver or DATABASE_URL) and Alembic migrations."""
