"""Suspicion scoring is queued at most once per client while one is waiting (real Redis)."""

from __future__ import annotations

import uuid

import pytest
import redis

from shared.names import REDIS_SCORING_PENDING_PREFIX
from tests.conftest import RunningStack

pytestmark = pytest.mark.integration


def test_a_waiting_scoring_absorbs_later_triggers_until_it_starts(running_stack: RunningStack) -> None:
    # its module needs the stack's Redis URL at import
    from services.auditor.tasks import claim_scoring, scoring_mark_seconds

    client = redis.Redis.from_url(running_stack.stack.redis_url or "")
    client_id = int(uuid.uuid4().int % 10**9) + 10**9  # no real client: nothing else touches this mark
    try:
        assert claim_scoring(client, client_id)
        assert not claim_scoring(client, client_id)
        # A lost task cannot block: the mark expires, after the job's delay and its longest yield.
        assert 60 < scoring_mark_seconds() < 120
        assert 0 < client.ttl(f"{REDIS_SCORING_PENDING_PREFIX}{client_id}") <= scoring_mark_seconds()
        client.delete(f"{REDIS_SCORING_PENDING_PREFIX}{client_id}")  # what the task does when it starts
        assert claim_scoring(client, client_id)
    finally:
        client.delete(f"{REDIS_SCORING_PENDING_PREFIX}{client_id}")
        client.close()
