"""hash chain, suspicion states, alerts, webhooks

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22 06:57:14.185996
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

from shared.chain import GENESIS_HASH, link_records

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "alerts",
        sa.Column("id", sa.BigInteger(), nullable=False),
        sa.Column("kind", sa.String(length=50), nullable=False),
        sa.Column("severity", sa.String(length=20), nullable=False),
        sa.Column("subject_type", sa.String(length=20), nullable=False),
        sa.Column("subject_id", sa.String(length=100), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("evidence", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("occurrences", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("acknowledged_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_alerts")),
    )
    op.create_index("ix_alerts_created_at", "alerts", ["created_at"], unique=False)
    op.create_index(
        "uq_alerts_open_subject",
        "alerts",
        ["kind", "subject_type", "subject_id"],
        unique=True,
        postgresql_where=sa.text("acknowledged_at IS NULL"),
    )
    op.create_table(
        "webhooks",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("url", sa.Text(), nullable=False),
        sa.Column("signing_secret", sa.String(length=100), nullable=False),
        sa.Column("description", sa.String(length=200), nullable=False),
        sa.Column("active", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_webhooks")),
    )
    op.create_table(
        "client_chains",
        sa.Column("client_id", sa.Integer(), nullable=False),
        sa.Column("length", sa.BigInteger(), nullable=False),
        sa.Column("head_hash", sa.String(length=64), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.ForeignKeyConstraint(
            ["client_id"], ["clients.id"], name=op.f("fk_client_chains_client_id_clients")
        ),
        sa.PrimaryKeyConstraint("client_id", name=op.f("pk_client_chains")),
    )
    op.create_table(
        "suspicion_states",
        sa.Column("client_id", sa.Integer(), nullable=False),
        sa.Column("model_name", sa.String(length=100), nullable=False),
        sa.Column("detector", sa.String(length=50), nullable=False),
        sa.Column("state", sa.LargeBinary(), nullable=True),
        sa.Column("last_record_id", sa.BigInteger(), nullable=False),
        sa.Column("queries_seen", sa.BigInteger(), nullable=False),
        sa.Column("score", sa.Float(precision=53), nullable=False),
        sa.Column("threshold", sa.Float(precision=53), nullable=False),
        sa.Column("alarm", sa.Boolean(), nullable=False),
        sa.Column("explanation", sa.Text(), nullable=False),
        sa.Column("details", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("computed_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.ForeignKeyConstraint(
            ["client_id"], ["clients.id"], name=op.f("fk_suspicion_states_client_id_clients")
        ),
        sa.PrimaryKeyConstraint("client_id", "model_name", "detector", name=op.f("pk_suspicion_states")),
    )
    op.create_table(
        "webhook_deliveries",
        sa.Column("id", sa.BigInteger(), nullable=False),
        sa.Column("alert_id", sa.BigInteger(), nullable=False),
        sa.Column("webhook_id", sa.Integer(), nullable=False),
        sa.Column("alert_version", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("last_status_code", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("last_attempt_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("delivered_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["alert_id"],
            ["alerts.id"],
            name=op.f("fk_webhook_deliveries_alert_id_alerts"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["webhook_id"],
            ["webhooks.id"],
            name=op.f("fk_webhook_deliveries_webhook_id_webhooks"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_webhook_deliveries")),
        sa.UniqueConstraint("alert_id", "webhook_id", "alert_version", name="uq_webhook_deliveries_key"),
    )
    op.add_column("query_records", sa.Column("seq", sa.BigInteger(), nullable=True))
    op.add_column("query_records", sa.Column("prev_hash", sa.String(length=64), nullable=True))
    op.add_column("query_records", sa.Column("record_hash", sa.String(length=64), nullable=True))
    _chain_existing_records()
    for column in ("seq", "prev_hash", "record_hash"):
        op.alter_column("query_records", column, nullable=False)
    op.create_unique_constraint("uq_query_records_client_id_seq", "query_records", ["client_id", "seq"])


def _chain_existing_records() -> None:
    """Link records stored before the chain existed, per client in storage order."""
    connection = op.get_bind()
    client_ids = connection.execute(sa.text("SELECT DISTINCT client_id FROM query_records")).scalars().all()
    for client_id in client_ids:
        rows = (
            connection.execute(
                sa.text(
                    "SELECT id, client_id, request_id, row_index, model_name, model_version, scheme, key_id, "
                    "answered_at, input, probabilities, label_index, label FROM query_records "
                    "WHERE client_id = :client_id ORDER BY id"
                ),
                {"client_id": client_id},
            )
            .mappings()
            .all()
        )
        records = [dict(row) for row in rows]
        head = link_records(GENESIS_HASH, 1, records)
        for record in records:
            connection.execute(
                sa.text(
                    "UPDATE query_records SET seq = :seq, prev_hash = :prev_hash, "
                    "record_hash = :record_hash WHERE id = :id"
                ),
                {key: record[key] for key in ("id", "seq", "prev_hash", "record_hash")},
            )
        connection.execute(
            sa.text("INSERT INTO client_chains (client_id, length, head_hash) VALUES (:c, :n, :h)"),
            {"c": client_id, "n": len(records), "h": head},
        )


def downgrade() -> None:
    op.drop_constraint("uq_query_records_client_id_seq", "query_records", type_="unique")
    op.drop_column("query_records", "record_hash")
    op.drop_column("query_records", "prev_hash")
    op.drop_column("query_records", "seq")
    op.drop_table("webhook_deliveries")
    op.drop_table("suspicion_states")
    op.drop_table("client_chains")
    op.drop_table("webhooks")
    op.drop_index(
        "uq_alerts_open_subject", table_name="alerts", postgresql_where=sa.text("acknowledged_at IS NULL")
    )
    op.drop_index("ix_alerts_created_at", table_name="alerts")
    op.drop_table("alerts")
