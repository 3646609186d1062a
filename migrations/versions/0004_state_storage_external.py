"""store detector states uncompressed

Detector states are np.savez archives of float32 queries (about 3 MB per client and model). PostgreSQL
tried to compress each one with pglz on every scoring job, which failed (float data does not compress)
and cost about a twentieth of its CPU under batch-80 load. EXTERNAL keeps them out of line, uncompressed.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-24 21:40:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute("ALTER TABLE suspicion_states ALTER COLUMN state SET STORAGE EXTERNAL")


def downgrade() -> None:
    op.execute("ALTER TABLE suspicion_states ALTER COLUMN state SET STORAGE EXTENDED")
