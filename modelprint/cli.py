"""The `modelprint` command: run the stack and its services, deploy models, manage clients."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from shared.config import SecretsError, Settings, get_settings, load_secrets
from shared.logs import configure_logging

logger = logging.getLogger("modelprint")


class CliError(RuntimeError):
    """A failure the user can act on; printed without a traceback."""


def _operator(settings: Settings) -> Any:
    from modelprint.client import OperatorClient

    return OperatorClient(settings.auditor_url, load_secrets(settings).admin_token)


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, default=str))


# -- running the system ------------------------------------------------------------------------------


def cmd_up(args: argparse.Namespace, settings: Settings) -> int:
    from modelprint.stack import Stack, StackOptions

    stack = Stack(
        settings,
        StackOptions(inference_workers=args.inference_workers, inference_concurrency=args.concurrency),
    )
    print(f"modelprint: starting on data dir {settings.data_dir} ...", flush=True)
    stack.start()
    if stack.generated_secrets is not None:
        print(
            f"modelprint: generated an admin token and a fingerprint key in {stack.generated_secrets} "
            "(mode 0600)"
        )
    print(
        "\n".join(
            [
                "modelprint is up:",
                f"  gateway (public API)     {settings.gateway_url}",
                f"  operator API (auditor)   {settings.auditor_url}",
                f"  redis                    {'embedded' if stack.redis else 'external'}",
                f"  postgresql               {'embedded' if stack.postgres else 'external'}",
                f"  admin token              in {settings.secrets_path} (or MODELPRINT_ADMIN_TOKEN)",
                f"  logs                     {stack.log_dir}",
                "Press Ctrl-C to stop.",
            ]
        ),
        flush=True,
    )
    try:
        stack.supervise()
    finally:
        print("modelprint: stopping ...", flush=True)
        stack.stop()
        print("modelprint: stopped; data kept in", settings.data_dir, flush=True)
    return 0


def cmd_migrate(_: argparse.Namespace, settings: Settings) -> int:
    from shared.migrate import upgrade_to_head

    upgrade_to_head(settings.require_database_url())
    print("database schema is at head")
    return 0


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    import uvicorn

    if args.service == "gateway":
        target, host, port = "services.gateway.api:create_app", settings.gateway_host, settings.gateway_port
    else:
        target, host, port = "services.auditor.api:create_app", settings.auditor_host, settings.auditor_port
    uvicorn.run(
        target,
        factory=True,
        host=args.host or host,
        port=args.port or port,
        workers=args.workers,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=10,
    )
    return 0


def cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    from shared.names import QUEUE_AUDIT, QUEUE_INFERENCE

    if args.queue == "inference":
        from services.inference.tasks import app
        from services.inference.tasks import settings as inference_settings

        queue, default_concurrency = QUEUE_INFERENCE, inference_settings.inference_concurrency
    else:
        from services.auditor.tasks import app  # type: ignore[no-redef]
        from services.auditor.tasks import settings as auditor_settings

        queue, default_concurrency = QUEUE_AUDIT, auditor_settings.audit_concurrency
    concurrency = args.concurrency or default_concurrency
    app.worker_main(
        [
            "worker",
            "--queues",
            queue,
            "--concurrency",
            str(concurrency),
            "--hostname",
            f"{args.queue}-%i@%h" if args.queue == "inference" else "audit@%h",
            "--without-gossip",
            "--without-mingle",
            "--loglevel",
            settings.log_level,
        ]
    )
    return 0


def cmd_beat(_: argparse.Namespace, settings: Settings) -> int:
    from services.auditor.tasks import app

    schedule = settings.data_dir / "celerybeat-schedule"
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    app.start(["beat", "--schedule", str(schedule), "--loglevel", settings.log_level])
    return 0


def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from modelprint.demo import run_demo

    return run_demo(settings, keep_running=args.keep_running)


# -- models and clients --------------------------------------------------------------------------------


def cmd_models_add(args: argparse.Namespace, settings: Settings) -> int:
    with _operator(settings) as operator:
        _print_json(
            operator.deploy_model(
                args.name, Path(args.file), Path(args.reference_data) if args.reference_data else None
            )
        )
    return 0


def cmd_models_list(_: argparse.Namespace, settings: Settings) -> int:
    with _operator(settings) as operator:
        _print_json(operator.list_models())
    return 0


def cmd_models_train(args: argparse.Namespace, settings: Settings) -> int:
    from modelprint.training import (
        save_model,
        save_reference_data,
        train_breast_cancer_model,
        train_ecg_model,
    )

    trained = train_ecg_model() if args.dataset == "ecg" else train_breast_cancer_model()
    name = args.name or trained.name
    out_dir = Path(args.out) if args.out else settings.data_dir / "models"
    out_dir.mkdir(parents=True, exist_ok=True)
    model_path = out_dir / f"{name}.skops"
    reference_path = out_dir / f"{name}-reference.npz"
    sha256 = save_model(trained.estimator, model_path)
    save_reference_data(trained.X_test, trained.y_test, reference_path)
    print(f"trained {trained.description}: test accuracy {trained.test_accuracy:.4f}")
    print(f"saved {model_path} (sha256 {sha256}) and held-out reference data {reference_path}")
    if args.no_deploy:
        return 0
    with _operator(settings) as operator:
        deployed = operator.deploy_model(name, model_path, reference_path)
    print(f"deployed {name} version {deployed['version']}")
    return 0


def cmd_clients_create(args: argparse.Namespace, settings: Settings) -> int:
    with _operator(settings) as operator:
        created = operator.create_client(args.name)
    _print_json(created)
    print("store the api_key now: it is not shown again", file=sys.stderr)
    return 0


def cmd_clients_list(_: argparse.Namespace, settings: Settings) -> int:
    with _operator(settings) as operator:
        _print_json(operator.list_clients())
    return 0


def cmd_clients_disable(args: argparse.Namespace, settings: Settings) -> int:
    with _operator(settings) as operator:
        _print_json(operator.set_client_disabled(args.id, disabled=not args.enable))
    return 0


def cmd_clients_queries(args: argparse.Namespace, settings: Settings) -> int:
    with _operator(settings) as operator:
        _print_json(operator.queries(args.id, after_id=args.after_id, limit=args.limit))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The full command-line interface."""
    parser = argparse.ArgumentParser(prog="modelprint", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    up = commands.add_parser(
        "up", help="run the whole system in the foreground (embedded servers by default)"
    )
    up.add_argument("--inference-workers", type=int, default=1, help="inference worker processes")
    up.add_argument("--concurrency", type=int, default=2, help="pool size of each inference worker")
    up.set_defaults(handler=cmd_up)

    demo = commands.add_parser("demo", help="bring the stack up and walk through a fingerprinted prediction")
    demo.add_argument("--keep-running", action="store_true", help="leave the stack running afterwards")
    demo.set_defaults(handler=cmd_demo)

    commands.add_parser("migrate", help="apply database migrations (alembic upgrade head)").set_defaults(
        handler=cmd_migrate
    )

    serve = commands.add_parser("serve", help="run one HTTP service (as docker-compose does)")
    serve.add_argument("service", choices=["gateway", "auditor"])
    serve.add_argument("--host", default=None)
    serve.add_argument("--port", type=int, default=None)
    serve.add_argument("--workers", type=int, default=1, help="uvicorn worker processes")
    serve.set_defaults(handler=cmd_serve)

    worker = commands.add_parser("worker", help="run a Celery worker for one queue")
    worker.add_argument("queue", choices=["inference", "audit"])
    worker.add_argument("--concurrency", type=int, default=None)
    worker.set_defaults(handler=cmd_worker)

    commands.add_parser("beat", help="run the auditor's Celery beat scheduler").set_defaults(handler=cmd_beat)

    models = commands.add_parser("models", help="deploy and list models").add_subparsers(
        dest="models_command", required=True
    )
    add = models.add_parser("add", help="deploy a skops file as the model's next version")
    add.add_argument("name")
    add.add_argument("file")
    add.add_argument(
        "--reference-data", help=".npz with arrays X and y (held-out data from the model's domain)"
    )
    add.set_defaults(handler=cmd_models_add)
    models.add_parser("list", help="list deployed models").set_defaults(handler=cmd_models_list)
    for dataset, help_text in (
        ("ecg", "train the paper's synthetic-ECG MLP (64, 32) and deploy it"),
        ("breast-cancer", "train an MLP on scikit-learn's breast-cancer data and deploy it"),
    ):
        train = models.add_parser(f"train-{dataset}", help=help_text)
        train.add_argument("--name", default=None, help="model name (default: ecg-mlp / breast-cancer-mlp)")
        train.add_argument("--out", default=None, help="where to save the files (default: <data dir>/models)")
        train.add_argument("--no-deploy", action="store_true", help="only train and save")
        train.set_defaults(handler=cmd_models_train, dataset=dataset)

    clients = commands.add_parser("clients", help="manage API clients").add_subparsers(
        dest="clients_command", required=True
    )
    create = clients.add_parser("create", help="create a client and print its API key (once)")
    create.add_argument("name")
    create.set_defaults(handler=cmd_clients_create)
    clients.add_parser("list", help="list clients").set_defaults(handler=cmd_clients_list)
    disable = clients.add_parser("disable", help="disable a client: its key stops working at once")
    disable.add_argument("id", type=int)
    disable.set_defaults(handler=cmd_clients_disable, enable=False)
    enable = clients.add_parser("enable", help="re-enable a disabled client")
    enable.add_argument("id", type=int)
    enable.set_defaults(handler=cmd_clients_disable, enable=True)
    queries = clients.add_parser("queries", help="show a page of a client's query history")
    queries.add_argument("id", type=int)
    queries.add_argument("--after-id", type=int, default=0)
    queries.add_argument("--limit", type=int, default=20)
    queries.set_defaults(handler=cmd_clients_queries)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `modelprint` console script."""
    args = build_parser().parse_args(argv)
    try:
        settings = get_settings()
    except Exception as exc:  # pydantic's ValidationError names the bad variable
        print(f"modelprint: invalid configuration: {exc}", file=sys.stderr)
        return 2
    service_name = {
        "serve": getattr(args, "service", "serve"),
        "worker": f"{getattr(args, 'queue', '')}-worker",
    }
    configure_logging(
        service_name.get(args.command, args.command),
        settings.log_level,
        settings.log_format if args.command in ("serve", "worker", "beat") else "text",
    )
    handler: Callable[[argparse.Namespace, Settings], int] = args.handler
    from modelprint.client import ApiCallError
    from modelprint.stack import AlreadyRunningError

    try:
        return handler(args, settings)
    except (CliError, SecretsError, AlreadyRunningError, ApiCallError) as exc:
        print(f"modelprint: {exc}", file=sys.stderr)
        return 1
    except httpx.TransportError as exc:
        print(f"modelprint: cannot reach the service ({exc}); is `modelprint up` running?", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
