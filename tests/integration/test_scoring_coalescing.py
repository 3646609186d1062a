"""Suspicion scoring is queued at most once per client while one is waiting (real Redis)."""

from __future__ import annotations

import uuid

import pytest
import redis

from shared.names import REDIS_SCORING_PENDING_PREFIX
from tests.conftest import RunningStack

pytestmark = pytest.mark.integration


def test_a_waiting_scoring_absorbs_later_triggers_until_it_starts(running_stack: RunningStack) -> None:
    from services.auditor.tasks import claim_scoring  # its module needs the stack's Redis URL at import

    client = redis.Redis.from_url(running_stack.stack.redis_url or "")
    client_id = int(uuid.uuid4().int % 10**9) + 10**9  # no real client: nothing else touches this mark
    try:
        assert claim_scoring(client, client_id)
        assert not claim_scoring(client, client_id)
        assert 0 < client.ttl(f"{REDIS_SCORING_PENDING_PREFIX}{client_id}") <= 60  # a lost task cannot block
        client.delete(f"{REDIS_SCORING_PENDING_PREFIX}{client_id}")  # what the task does when it starts
        assert claim_scoring(client, client_id)
    finally:
        client.delete(f"{REDIS_SCORING_PENDING_PREFIX}{client_id}")
        client.close()
