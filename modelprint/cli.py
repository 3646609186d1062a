"""The `modelprint` command: run the stack and its services, deploy models, manage clients."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from shared.config import SecretsError, Settings, get_settings, load_secrets
from shared.fingerprint import SCHEMES, NoFingerprintScheme
from shared.logs import configure_logging
from shared.priority import lower_cpu_priority

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

    chosen = {"inference_workers": args.inference_workers, "inference_concurrency": args.concurrency}
    stack = Stack(
        settings,
        StackOptions(
            gateway_workers=args.gateway_workers,
            **{option: value for option, value in chosen.items() if value is not None},
        ),
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
    from shared.names import QUEUE_AUDIT, QUEUE_INFERENCE, QUEUE_SCANS, QUEUE_SCORING

    if args.queue == "inference":
        from services.inference.tasks import app
        from services.inference.tasks import settings as inference_settings

        queue, default_concurrency = QUEUE_INFERENCE, inference_settings.inference_concurrency
        pool = inference_settings.inference_pool
    else:
        from services.auditor.tasks import app
        from services.auditor.tasks import settings as auditor_settings

        if args.queue == "scans":
            queue, default_concurrency = QUEUE_SCANS, auditor_settings.scan_worker_concurrency
            pool = "prefork"  # scans need the hard time limit, which only a pool child can get
        elif args.queue == "scoring":
            queue, default_concurrency = QUEUE_SCORING, auditor_settings.scoring_concurrency
            pool = "prefork"
            # Inherited by the pool's children; also the session's scheduling group (shared/priority.py).
            outcome = lower_cpu_priority(auditor_settings.scoring_nice)
            logger.info(
                "scoring worker priority",
                extra={"nice": outcome.nice, "group_nice": outcome.group_nice, "detail": outcome.reason},
            )
        else:
            queue, default_concurrency = QUEUE_AUDIT, auditor_settings.audit_concurrency
            pool = auditor_settings.audit_pool
    concurrency = args.concurrency or default_concurrency
    from shared.gc_tuning import tune_garbage_collector

    tune_garbage_collector()
    if pool == "solo":
        # Celery enforces time limits only in prefork children; a solo worker enforces its own.
        from shared.solo_limits import enforce_time_limits

        enforce_time_limits()
    app.worker_main(
        [
            "worker",
            "--queues",
            queue,
            "--concurrency",
            str(concurrency),
            "--pool",
            pool,
            "--hostname",
            f"{args.queue}-{args.index}@%h" if args.queue == "inference" else f"{args.queue}@%h",
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


def cmd_experiment(args: argparse.Namespace, settings: Settings) -> int:
    command = "modelprint " + " ".join(sys.argv[1:])
    running = settings if args.use_running else None
    # Without --scheme: the setting's own default, or the running stack's scheme with --use-running.
    scheme_name = args.scheme or (settings.fingerprint_scheme if args.use_running else None)
    scheme = {} if scheme_name is None else {"scheme": scheme_name}
    if scheme_name is not None:
        from modelprint.experiments.common import check_scheme

        try:
            check_scheme(scheme_name, running)
        except ValueError as exc:
            raise CliError(str(exc)) from exc
    if args.setting == "calibrate":
        from modelprint.experiments import calibration

        if args.use_running:
            raise CliError("`experiment calibrate` runs offline, without a stack; drop --use-running")
        dataset = args.dataset or "ecg"
        if dataset not in calibration.PLANS:
            raise CliError(f"`experiment calibrate` runs on {' or '.join(calibration.PLANS)}, not {dataset}")
        out = Path(args.out or f"results/calibration-{dataset}")
        calibrate = calibration.CalibrationConfig.make(
            dataset, trials=args.trials, quick=args.quick, command=command, **scheme
        )
        paths = calibration.write_outputs(calibration.run_calibration(calibrate), out)
        print((out / "table.md").read_text())
        print("wrote " + ", ".join(str(path) for path in paths))
        return 0
    if args.setting == "attacks":
        from modelprint.experiments import attack_suite

        if args.dataset not in (None, "ecg") or args.trials is not None:
            raise CliError("`experiment attacks` runs the ECG setting once; drop --dataset and --trials")
        out = Path(args.out or "results/attacks")
        suite = attack_suite.SuiteConfig.make(quick=args.quick, command=command, **scheme)
        results = attack_suite.run_suite(suite, running)
        paths = attack_suite.write_outputs(results, out)
        failed = results["summary"]["scans_failed"]
    else:
        from modelprint.experiments import paper

        dataset = args.dataset or "ecg"
        out = Path(args.out or ("results/paper" if dataset == "ecg" else f"results/{dataset}"))
        config = paper.ExperimentConfig.make(
            dataset, trials=args.trials, quick=args.quick, command=command, **scheme
        )
        results = paper.run_experiment(config, running)
        paths = paper.write_outputs(results, out)
        failed = results["summary"]["scans_failed"]
    print((out / "table.md").read_text())
    print("wrote " + ", ".join(str(path) for path in paths))
    return 0 if failed == 0 else 1


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


def cmd_clients_suspicion(args: argparse.Namespace, settings: Settings) -> int:
    with _operator(settings) as operator:
        _print_json(operator.suspicion(args.id))
    return 0


def cmd_clients_queries(args: argparse.Namespace, settings: Settings) -> int:
    with _operator(settings) as operator:
        _print_json(operator.queries(args.id, after_id=args.after_id, limit=args.limit))
    return 0


def cmd_audit_verify(args: argparse.Namespace, settings: Settings) -> int:
    with _operator(settings) as operator:
        client_ids = [args.client] if args.client is not None else [c["id"] for c in operator.list_clients()]
        broken = 0
        for client_id in client_ids:
            result = operator.verify_history(client_id)
            if result["ok"]:
                print(
                    f"client {client_id}: OK, {result['records_checked']} records, head {result['head_hash']}"
                )
            else:
                broken += 1
                print(
                    f"client {client_id}: BROKEN at record #{result['first_broken_seq']} "
                    f"(request {result['first_broken_request_id']}): {result['reason']}"
                )
    return 1 if broken else 0


def cmd_alerts_list(args: argparse.Namespace, settings: Settings) -> int:
    with _operator(settings) as operator:
        for alert in operator.list_alerts(status=args.status):
            print(_alert_line(alert))
    return 0


def cmd_alerts_ack(args: argparse.Namespace, settings: Settings) -> int:
    with _operator(settings) as operator:
        print(_alert_line(operator.acknowledge_alert(args.id)))
    return 0


def cmd_alerts_watch(_: argparse.Namespace, settings: Settings) -> int:
    print("watching alerts (Ctrl-C to stop) ...", file=sys.stderr, flush=True)
    with _operator(settings) as operator:
        for event, alert in operator.watch_alerts():
            print(f"{event:<20}{_alert_line(alert)}", flush=True)
    return 0


def _alert_line(alert: dict[str, Any]) -> str:
    subject = f"{alert['subject']['type']} {alert['subject']['id']}"
    return (
        f"#{alert['id']} [{alert['severity']}] {alert['kind']} ({subject}, x{alert['occurrences']}, "
        f"{alert['status']}) {alert['message']}"
    )


def cmd_webhooks_add(args: argparse.Namespace, settings: Settings) -> int:
    with _operator(settings) as operator:
        _print_json(operator.create_webhook(args.url, args.description))
    print("store the signing_secret now: it is not shown again", file=sys.stderr)
    return 0


def cmd_webhooks_list(_: argparse.Namespace, settings: Settings) -> int:
    with _operator(settings) as operator:
        _print_json(operator.list_webhooks())
    return 0


def cmd_webhooks_remove(args: argparse.Namespace, settings: Settings) -> int:
    with _operator(settings) as operator:
        _print_json(operator.deactivate_webhook(args.id))
    return 0


def cmd_suspects_add(args: argparse.Namespace, settings: Settings) -> int:
    headers = dict(header.split(":", 1) for header in args.header)
    body = {
        "name": args.name,
        "url": args.url,
        "protocol": args.protocol,
        "model": args.model,
        "remote_model": args.remote_model,
        "suspected_client_id": args.client,
        "interval_seconds": args.interval,
        "headers": {name.strip(): value.strip() for name, value in headers.items()},
    }
    with _operator(settings) as operator:
        _print_json(operator.create_suspect(body))
    return 0


def cmd_suspects_list(_: argparse.Namespace, settings: Settings) -> int:
    with _operator(settings) as operator:
        _print_json(operator.list_suspects())
    return 0


def cmd_suspects_scan(args: argparse.Namespace, settings: Settings) -> int:
    from tqdm import tqdm

    with _operator(settings) as operator:
        scan = operator.scan_suspect(args.id)
        print(f"scan {scan['id']} {scan['status']}", file=sys.stderr)
        if args.no_wait:
            _print_json(scan)
            return 0
        with tqdm(desc=f"scan {scan['id']}", bar_format="{desc}: {elapsed} {postfix}") as progress:
            while scan["status"] in ("queued", "running"):
                progress.set_postfix_str(scan["status"])
                time.sleep(1.0)
                scan = operator.get_scan(scan["id"])
                progress.update()
    print(
        f"scan {scan['id']}: {scan['status']}, verdict {scan['verdict']}, p-value {scan['p_value']}"
        + (f", error: {scan['error']}" if scan["error"] else "")
    )
    print(f"evidence report: modelprint scans report {scan['id']} > scan-{scan['id']}.html")
    return 0 if scan["status"] == "done" else 1


def cmd_scans_report(args: argparse.Namespace, settings: Settings) -> int:
    with _operator(settings) as operator:
        report = operator.scan_report(args.id, args.format)
    sys.stdout.write(report)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The full command-line interface."""
    parser = argparse.ArgumentParser(prog="modelprint", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    up = commands.add_parser(
        "up", help="run the whole system in the foreground (embedded servers by default)"
    )
    up.add_argument(
        "--inference-workers",
        type=int,
        default=None,
        help="inference worker processes (default 2; one per core serves best)",
    )
    up.add_argument(
        "--concurrency",
        type=int,
        default=None,
        help="pool size of each inference worker (MODELPRINT_INFERENCE_POOL=prefork only; default 2)",
    )
    up.add_argument("--gateway-workers", type=int, default=1, help="gateway (uvicorn) worker processes")
    up.set_defaults(handler=cmd_up)

    demo = commands.add_parser("demo", help="bring the stack up and walk through a fingerprinted prediction")
    demo.add_argument("--keep-running", action="store_true", help="leave the stack running afterwards")
    demo.set_defaults(handler=cmd_demo)

    experiment = commands.add_parser(
        "experiment",
        help="reproduce the paper's Table 1 (paper, the default), run the attack suite (attacks) or "
        "calibrate the scans' output_replay null offline on independent models (calibrate)",
    )
    experiment.add_argument("setting", nargs="?", choices=["paper", "attacks", "calibrate"], default="paper")
    experiment.add_argument(
        "--dataset",
        choices=["ecg", "breast-cancer", "digits"],
        default=None,
        help="paper and calibrate (default ecg; calibrate: ecg or digits)",
    )
    experiment.add_argument(
        "--trials", type=int, default=None, help="paper and calibrate: trials (default 5; --quick: 1)"
    )
    experiment.add_argument(
        "--quick",
        action="store_true",
        help="a short run: 1 trial / a small grid / calibrate: 1 trial, 1 budget, 1 seed per family "
        "(what the tests run)",
    )
    experiment.add_argument(
        "--out",
        default=None,
        help="output dir (default results/paper, results/<dataset>, results/attacks or "
        "results/calibration-<dataset>)",
    )
    experiment.add_argument(
        "--scheme",
        choices=[name for name in SCHEMES if name != NoFingerprintScheme.name],
        default=None,
        help="fingerprint scheme of the experiment's stack (default: paper and calibrate hmac-second-class, "
        "the paper's; attacks hmac-all-classes, modelprint's)",
    )
    experiment.add_argument(
        "--use-running",
        action="store_true",
        help="use the stack the settings point at (default: start one on a temporary data dir)",
    )
    experiment.set_defaults(handler=cmd_experiment)

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
    worker.add_argument("queue", choices=["inference", "audit", "scoring", "scans"])
    worker.add_argument(
        "--concurrency", type=int, default=None, help="pool processes (prefork; a solo worker runs one task)"
    )
    worker.add_argument(
        "--index",
        type=int,
        default=0,
        help="number in the node name (inference-N@host): distinct for workers sharing a host",
    )
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
    suspicion = clients.add_parser("suspicion", help="show a client's extraction-suspicion scores")
    suspicion.add_argument("id", type=int)
    suspicion.set_defaults(handler=cmd_clients_suspicion)

    audit = commands.add_parser("audit", help="verify the hash-chained query histories").add_subparsers(
        dest="audit_command", required=True
    )
    verify = audit.add_parser("verify", help="recompute every client's chain (or one) and report breaks")
    verify.add_argument("--client", type=int, default=None)
    verify.set_defaults(handler=cmd_audit_verify)

    alert_commands = commands.add_parser("alerts", help="list, acknowledge and watch alerts").add_subparsers(
        dest="alerts_command", required=True
    )
    alert_list = alert_commands.add_parser("list", help="list alerts, newest first")
    alert_list.add_argument("--status", choices=["open", "acknowledged"], default=None)
    alert_list.set_defaults(handler=cmd_alerts_list)
    ack = alert_commands.add_parser("ack", help="acknowledge an alert")
    ack.add_argument("id", type=int)
    ack.set_defaults(handler=cmd_alerts_ack)
    alert_commands.add_parser("watch", help="print alerts as they arrive").set_defaults(
        handler=cmd_alerts_watch
    )

    webhooks = commands.add_parser("webhooks", help="manage alert webhooks").add_subparsers(
        dest="webhooks_command", required=True
    )
    webhook_add = webhooks.add_parser("add", help="register a URL; prints its signing secret once")
    webhook_add.add_argument("url")
    webhook_add.add_argument("--description", default="")
    webhook_add.set_defaults(handler=cmd_webhooks_add)
    webhooks.add_parser("list", help="list webhooks").set_defaults(handler=cmd_webhooks_list)
    webhook_remove = webhooks.add_parser("remove", help="stop sending to a webhook")
    webhook_remove.add_argument("id", type=int)
    webhook_remove.set_defaults(handler=cmd_webhooks_remove)

    suspects = commands.add_parser("suspects", help="register and scan suspect endpoints").add_subparsers(
        dest="suspects_command", required=True
    )
    suspect_add = suspects.add_parser("add", help="register an endpoint suspected of serving a copy")
    suspect_add.add_argument("name")
    suspect_add.add_argument("url")
    suspect_add.add_argument("--model", required=True, help="our model it is thought to copy")
    suspect_add.add_argument("--protocol", choices=["v2", "modelprint"], default="v2")
    suspect_add.add_argument("--remote-model", default=None, help="the suspect's model name (default: ours)")
    suspect_add.add_argument("--client", type=int, default=None, help="the client suspected of the theft")
    suspect_add.add_argument("--interval", type=int, default=None, help="scan every N seconds")
    suspect_add.add_argument(
        "--header", action="append", default=[], help="'Name: value' sent to the suspect"
    )
    suspect_add.set_defaults(handler=cmd_suspects_add)
    suspects.add_parser("list", help="list suspects").set_defaults(handler=cmd_suspects_list)
    suspect_scan = suspects.add_parser("scan", help="scan a suspect now and wait for the verdict")
    suspect_scan.add_argument("id", type=int)
    suspect_scan.add_argument("--no-wait", action="store_true")
    suspect_scan.set_defaults(handler=cmd_suspects_scan)

    scans = commands.add_parser("scans", help="scan results").add_subparsers(
        dest="scans_command", required=True
    )
    report = scans.add_parser("report", help="print a scan's evidence report (HTML or JSON)")
    report.add_argument("id", type=int)
    report.add_argument("--format", choices=["html", "json"], default="html")
    report.set_defaults(handler=cmd_scans_report)
    return parser


BLAS_THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def limit_blas_threads(threads: int) -> None:
    """Cap the BLAS and OpenMP thread pools of this process and of the processes it starts.

    The loaded libraries are capped at run time (threadpoolctl); the environment variables cover
    processes that load them afresh (uvicorn's spawned workers). Forked pool children inherit both.
    """
    from threadpoolctl import threadpool_limits

    for variable in BLAS_THREAD_VARIABLES:
        os.environ[variable] = str(threads)
    threadpool_limits(limits=threads)


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
        settings.log_each_task,
    )
    if args.command in ("serve", "worker", "beat"):
        limit_blas_threads(settings.blas_threads)
        from shared.db import set_application_name  # sqlalchemy: not for the quick commands

        set_application_name(service_name.get(args.command, args.command))
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
