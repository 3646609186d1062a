"""Celery tasks of the inference worker: thin wrappers around service functions."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import redis
from celery.signals import worker_init, worker_process_init

from services.inference.config import InferenceSettings
from services.inference.service import ModelCache, run_predict_job
from shared import audit_outbox
from shared.celery_app import create_celery_app
from shared.config import Secrets, load_secrets
from shared.fingerprint import FingerprintScheme, get_scheme
from shared.gc_tuning import tune_garbage_collector
from shared.logs import configure_logging
from shared.names import QUEUE_AUDIT, QUEUE_INFERENCE, TASK_DRAIN_AUDIT, TASK_PREDICT
from shared.schemas import PredictJob, PredictReplies, PredictReply

logger = logging.getLogger(__name__)

settings = InferenceSettings()
# A solo worker takes jobs without acknowledgements. Late acknowledgement would put a job back in the
# queue when its worker died, but only after the visibility timeout (300 s), by when the job has
# expired (the gateway's timeout, 10 s) and is discarded unrun. The acknowledgement bookkeeping
# (the whole message copied into a Redis hash, then deleted: two round trips per job) would buy
# nothing. A prefork worker keeps it: it puts a killed child's job back at once.
app = create_celery_app(
    settings,
    main="modelprint-inference",
    no_ack_queues=(QUEUE_INFERENCE,) if settings.inference_pool == "solo" else (),
)


@dataclass
class WorkerRuntime:
    """Per-process state: loaded models, key material, the reply connection."""

    cache: ModelCache
    scheme: FingerprintScheme
    secrets: Secrets
    redis: redis.Redis


@lru_cache(maxsize=1)
def runtime() -> WorkerRuntime:
    """Built lazily in each worker process (after the prefork), then reused."""
    return WorkerRuntime(
        cache=ModelCache(settings.require_database_url(), compile_models=settings.compile_models),
        scheme=get_scheme(settings.fingerprint_scheme, settings.fingerprint_alpha),
        secrets=load_secrets(settings),
        redis=redis.Redis.from_url(settings.require_redis_url()),
    )


@worker_init.connect
def _compile_fingerprint_kernels(**_: Any) -> None:
    """Compile the fingerprint kernels before the first task (inherited by prefork children)."""
    from shared import fingerprint_kernels

    fingerprint_kernels.warm_up()


@worker_process_init.connect
def _init_worker_process(**_: Any) -> None:
    configure_logging("inference", settings.log_level, settings.log_format, settings.log_each_task)
    runtime()
    tune_garbage_collector()


@app.task(
    name=TASK_PREDICT,
    autoretry_for=(redis.ConnectionError, redis.TimeoutError),
    retry_backoff=True,
    max_retries=5,
)
def predict(**payload: Any) -> None:
    """Predict and fingerprint a job, enqueue its audit batches, then reply (no answer goes unrecorded)."""
    job = PredictJob.model_validate(payload)
    state = runtime()
    try:
        replies, batches = run_predict_job(job, state.cache, state.scheme, state.secrets)
    except Exception:
        logger.exception("prediction failed", extra={"job_id": job.job_id, "model": job.model})
        replies = [
            PredictReply(request_id=request.request_id, ok=False, status=500, error="inference failed")
            for request in job.requests
        ]
        batches = []
    reply = PredictReplies(replies=replies).to_message()
    if batches:
        # One audit message per job, kept in the outbox until its rows are committed; the auditor
        # drains waiting messages several per transaction, woken by one task per burst
        # (shared/audit_outbox.py). The reply is published in the same atomic step, after the
        # message is kept: no answer goes out unrecorded.
        audit = {"batches": [batch.to_message() for batch in batches]}
        if audit_outbox.put(state.redis, job.job_id, audit, reply=(job.reply_to, reply)):
            app.send_task(TASK_DRAIN_AUDIT, queue=QUEUE_AUDIT)
    else:
        state.redis.publish(job.reply_to, reply)
