"""drop the unused (client_id, answered_at) index of query_records

No query filters or orders query records by answer time: histories, chains and scoring all go by
`seq` or `id`. The index was still maintained on every stored row: without it PostgreSQL spends 17.2-17.5
instead of 20.0-20.1 µs of CPU per stored row (80-row requests, 8 per transaction, embedded PostgreSQL,
two runs each), and the table's indexes take less space.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-25 02:10:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.drop_index("ix_query_records_client_id_answered_at", table_name="query_records")


def downgrade() -> None:
    op.create_index(
        "ix_query_records_client_id_answered_at", "query_records", ["client_id", "answered_at"], unique=False
    )
