"""Alembic environment: the URL comes from the config (set by shared.migrate) or MODELPRINT_DATABASE_URL."""

from alembic import context
from sqlalchemy import create_engine, pool

from shared.config import Settings
from shared.db import Base

config = context.config
target_metadata = Base.metadata


def _database_url() -> str:
    url = config.get_main_option("sqlalchemy.url")
    return url or Settings().require_database_url()


def run_migrations_offline() -> None:
    context.configure(url=_database_url(), target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = create_engine(
        _database_url(), poolclass=pool.NullPool, connect_args={"application_name": "modelprint migrate"}
    )
    with engine.connect() as connection:
        context.configure(connection=connection, target_metadata=target_metadata)
        with context.begin_transaction():
            context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
