"""Auditor ingest benchmark: query records per second into PostgreSQL through the real store path.

Runs `services.auditor.service.store_query_batch` (hash chain + COPY, one transaction per request)
against an embedded PostgreSQL (or MODELPRINT_DATABASE_URL), for several request sizes, and prints
a table. Usage:

    .venv/bin/python -m bench.audit_ingest [--rows 200000] [--features 80]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from tqdm import tqdm

from services.auditor import service
from shared.db import Client, session_scope
from shared.embedded import EmbeddedPostgres
from shared.migrate import upgrade_to_head
from shared.schemas import QueryBatch


def _batch(client_id: int, inputs: np.ndarray, probabilities: np.ndarray) -> QueryBatch:
    labels = probabilities.argmax(axis=1)
    return QueryBatch(
        request_id=uuid.uuid4().hex,
        client_id=client_id,
        model="bench",
        version=1,
        scheme="hmac-second-class",
        key_id="k1",
        answered_at=datetime.now(UTC),
        inputs=inputs.tolist(),
        probabilities=probabilities.tolist(),
        label_indices=labels.tolist(),
        labels=[f"class-{label}" for label in labels],
    )


def run(
    database_url: str, total_rows: int, features: int, request_sizes: list[int]
) -> list[tuple[int, int, float]]:
    """Store `total_rows` rows per request size; return (request size, rows, rows per second)."""
    rng = np.random.default_rng(0)
    results = []
    for size in request_sizes:
        with session_scope(database_url) as session:
            client = Client(
                name=f"bench-{size}", api_key_hash=uuid.uuid4().hex * 2, api_key_prefix="mp_bench"
            )
            session.add(client)
            session.flush()
            client_id = client.id
        requests = max(1, total_rows // size)
        batches = []
        for _ in range(requests):
            logits = rng.normal(size=(size, 4))
            probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
            batches.append(_batch(client_id, rng.normal(size=(size, features)), probabilities))
        started = time.perf_counter()
        for batch in tqdm(batches, desc=f"{size:>5} rows/request", unit="req", leave=False):
            with session_scope(database_url) as session:
                service.store_query_batch(session, batch)
        elapsed = time.perf_counter() - started
        results.append((size, requests * size, requests * size / elapsed))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=100_000, help="rows stored per request size")
    parser.add_argument("--features", type=int, default=80)
    parser.add_argument("--sizes", default="1,80,1000", help="rows per request, comma-separated")
    args = parser.parse_args()
    sizes = [int(size) for size in args.sizes.split(",")]
    database_url = os.environ.get("MODELPRINT_DATABASE_URL")
    postgres = None
    if not database_url:
        postgres = EmbeddedPostgres(Path(tempfile.mkdtemp(prefix="modelprint-bench-")) / "postgres")
        database_url = postgres.start()
    try:
        upgrade_to_head(database_url)
        results = run(database_url, args.rows, args.features, sizes)
    finally:
        if postgres is not None:
            postgres.stop()
    print(
        f"\nauditor ingest into PostgreSQL ({args.features} features/row, hash chain + COPY, "
        "one transaction/request)"
    )
    print(f"{'rows/request':>14} {'rows stored':>12} {'rows/s':>10}")
    for size, rows, rate in results:
        print(f"{size:>14} {rows:>12} {rate:>10.0f}")


if __name__ == "__main__":
    main()
