"""index query records by (client_id, model_name, id) for scoring

Scoring reads a client's rows of one model after its last scored id, in id order, a block at a time.
With only (client_id, id) to go by, the model had to be filtered on the heap, and until autovacuum first
analysed the table PostgreSQL planned that read as a bitmap scan of the client's whole backlog
followed by a sort spilled to disk, to keep 20,000 of its rows: under batch-80 load, 2 s per job for a
262,000-row backlog, growing with the backlog. With this index the read is one ordered range scan
that stops at the limit whatever the statistics say, and the client's models are listed by skipping
through it. Built concurrently: a deployment keeps storing queries meanwhile.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-07 14:20:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

INDEX = "ix_query_records_client_id_model_name_id"


def upgrade() -> None:
    with op.get_context().autocommit_block():
        op.create_index(
            INDEX,
            "query_records",
            ["client_id", "model_name", "id"],
            unique=False,
            postgresql_concurrently=True,
            if_not_exists=True,
        )


def downgrade() -> None:
    with op.get_context().autocommit_block():
        op.drop_index(INDEX, table_name="query_records", postgresql_concurrently=True, if_exists=True)
