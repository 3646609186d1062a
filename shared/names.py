"""Contracts between services: queue names, task names and Redis key names."""

from typing import Final

QUEUE_INFERENCE: Final = "inference"
QUEUE_AUDIT: Final = "audit"
QUEUE_SCANS: Final = "scans"
# Suspicion scoring has its own queue and worker, so storing answered rows never waits behind it.
QUEUE_SCORING: Final = "scoring"
ALL_QUEUES: Final = (QUEUE_INFERENCE, QUEUE_AUDIT, QUEUE_SCANS, QUEUE_SCORING)

TASK_PREDICT: Final = "inference.predict"
TASK_RECORD_QUERIES: Final = "audit.record_queries"
TASK_SYNC_REGISTRY: Final = "audit.sync_registry"
TASK_DELIVER_WEBHOOK: Final = "audit.deliver_webhook"
TASK_SCORE_CLIENT: Final = "audit.score_client"
TASK_DRAIN_AUDIT: Final = "audit.drain_outbox"
TASK_WAKE_AUDIT: Final = "audit.wake_drain"
TASK_SCORE_ALL: Final = "audit.score_all"
TASK_RUN_SCAN: Final = "scans.run"
TASK_DISPATCH_SCANS: Final = "scans.dispatch_due"

# Redis keys. The auditor publishes the registry (API keys, deployed model versions) here from
# PostgreSQL, which stays the source of truth; the gateway only reads them.
REDIS_API_KEYS: Final = "modelprint:apikeys"
REDIS_MODELS: Final = "modelprint:models"
# A message goes out on this channel with every change of those two hashes, in the same transaction;
# gateways empty their copy of registry entries on it (services/gateway/registry_cache.py).
REDIS_REGISTRY_CHANNEL: Final = "modelprint:registry-changed"
REDIS_REPLY_CHANNEL_PREFIX: Final = "modelprint:replies:"
# How far behind the audit trail is: each audit worker process writes "<lag seconds> <unix time>" to
# its own field after every commit (lag: from the oldest answer of the message to its commit).
REDIS_AUDIT_LAG: Final = "modelprint:audit-lag"
# The audit outbox (shared/audit_outbox.py): audit messages by id until their rows are committed; the
# time from which each may be claimed by a drain; the flag set while a drain task is queued.
REDIS_AUDIT_OUTBOX: Final = "modelprint:audit-outbox"
REDIS_AUDIT_OUTBOX_INDEX: Final = "modelprint:audit-outbox-index"
REDIS_AUDIT_DRAIN_QUEUED: Final = "modelprint:audit-drain-queued"
# Outbox messages that could not be parsed, moved aside for an operator (an error is logged).
REDIS_AUDIT_OUTBOX_REJECTED: Final = "modelprint:audit-outbox-rejected"
# Set while a scoring of the client waits on the scoring queue (the auditor's own bookkeeping).
REDIS_SCORING_PENDING_PREFIX: Final = "modelprint:scoring-pending:"
