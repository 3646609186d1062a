"""Static checks of the container setup: Dockerfile, .dockerignore, docker-compose.yml and .env.example.

No Docker daemon is needed: the files are parsed and checked against the code they start (the
`modelprint` command line, the Celery worker node names, the paths shared/migrate.py expects).
"""

from __future__ import annotations

import argparse
import ast
import fnmatch
import functools
import importlib
import importlib.util
import json
import re
import shlex
import socket
import sys
from pathlib import Path, PurePosixPath
from types import ModuleType, SimpleNamespace
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from celery.utils.nodenames import host_format

from modelprint import cli
from shared import embedded
from shared.config import SecretsError, check_secret_strength

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
ENV_EXAMPLE = REPO / ".env.example"

# Each service that runs our code, and the `modelprint` subcommand it must run.
APP_SERVICES: dict[str, list[str]] = {
    "migrate": ["migrate"],
    "gateway": ["serve", "gateway"],
    "auditor-api": ["serve", "auditor"],
    "inference-worker": ["worker", "inference"],
    "audit-worker": ["worker", "audit"],
    "scoring-worker": ["worker", "scoring"],
    "scan-worker": ["worker", "scans"],
    "beat": ["beat"],
}
LONG_RUNNING = [name for name in APP_SERVICES if name != "migrate"]
HTTP_SERVICES = {"gateway": "/v2/health/ready", "auditor-api": "/healthz"}
WORKER_SERVICES = {
    "inference-worker": "inference",
    "audit-worker": "audit",
    "scoring-worker": "scoring",
    "scan-worker": "scans",
}
SECRET_VARS = ("MODELPRINT_ADMIN_TOKEN", "MODELPRINT_FINGERPRINT_KEYS")

# Compose interpolation: ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, ${VAR?error},
# ${VAR:+alt}, ${VAR+alt} and $VAR; "$$" is a literal dollar sign.
BRACED_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?+])([^}]*))?\}")
BARE_VAR = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*)")
ENV_LINE = re.compile(r"^\s*(#\s*)?([A-Za-z_][A-Za-z0-9_]*)=(.*)$")


# -- parsing helpers -------------------------------------------------------------------------------------


@functools.cache
def load_compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(data, dict), "docker-compose.yml must be a mapping"
    return data


def services() -> dict[str, dict[str, Any]]:
    return load_compose()["services"]


def environment(service: dict[str, Any]) -> dict[str, str]:
    """A service's environment as a mapping (compose accepts a mapping or a list of KEY=VALUE)."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        return dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {key: "" if value is None else str(value) for key, value in env.items()}


def interpolated_vars(value: Any) -> list[tuple[str, str | None]]:
    """(name, operator) of every variable compose would interpolate in a parsed YAML value."""
    found: list[tuple[str, str | None]] = []
    if isinstance(value, dict):
        for key, item in value.items():
            found += interpolated_vars(key) + interpolated_vars(item)
    elif isinstance(value, list):
        for item in value:
            found += interpolated_vars(item)
    elif isinstance(value, str):
        text = value.replace("$$", "")
        found += [(match[1], match[2]) for match in BRACED_VAR.finditer(text)]
        found += [(match[1], None) for match in BARE_VAR.finditer(BRACED_VAR.sub("", text))]
    return found


def parse_env_file(text: str) -> tuple[dict[str, str], set[str]]:
    """(the KEY=VALUE assignments, every key documented, including commented-out `# KEY=...` lines)."""
    values: dict[str, str] = {}
    documented: set[str] = set()
    for line in text.splitlines():
        match = ENV_LINE.match(line)
        if not match:
            continue
        commented, key, value = match.groups()
        documented.add(key)
        if not commented:
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
                value = value[1:-1]
            values[key] = value
    return values, documented


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, with continuation lines joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        if raw.lstrip().startswith("#"):
            continue
        if raw.rstrip().endswith("\\"):
            pending += raw.rstrip()[:-1] + " "
            continue
        line = (pending + raw).strip()
        pending = ""
        if line:
            keyword, _, args = line.partition(" ")
            instructions.append((keyword.upper(), args.strip()))
    assert not pending, "Dockerfile ends inside a continued line"
    return instructions


def copy_sources_and_dest(args: str) -> tuple[list[str], str, dict[str, str]]:
    """COPY's sources, destination and --flags (shell or JSON form)."""
    words = json.loads(args) if args.startswith("[") else shlex.split(args)
    flags = dict(w[2:].split("=", 1) if "=" in w else (w[2:], "") for w in words if w.startswith("--"))
    paths = [w for w in words if not w.startswith("--")]
    assert len(paths) >= 2, f"COPY needs a source and a destination: {args!r}"
    return paths[:-1], paths[-1], flags


def copied_paths() -> dict[str, PurePosixPath]:
    """Repository path (no trailing slash) -> where the Dockerfile puts it in the image."""
    workdir = PurePosixPath("/")
    placed: dict[str, PurePosixPath] = {}
    for keyword, args in dockerfile_instructions(DOCKERFILE.read_text()):
        if keyword == "WORKDIR":
            workdir = workdir / args
        elif keyword in ("COPY", "ADD"):
            sources, dest, flags = copy_sources_and_dest(args)
            if "from" in flags:
                continue
            target = workdir / dest
            for source in sources:
                name = source.rstrip("/")
                is_dir = (REPO / name).is_dir()
                into_dir = dest.endswith("/") or dest in (".", "./") or len(sources) > 1
                placed[name] = target if is_dir or not into_dir else target / PurePosixPath(name).name
    return placed


def worker_argv(monkeypatch: pytest.MonkeyPatch, queue: str) -> list[str]:
    """The argv `modelprint worker QUEUE` hands to Celery, with the Celery app replaced by a recorder."""
    recorded: list[list[str]] = []
    fake = ModuleType(f"services.{'inference' if queue == 'inference' else 'auditor'}.tasks")
    fake.app = SimpleNamespace(worker_main=recorded.append)  # type: ignore[attr-defined]
    fake.settings = SimpleNamespace(  # type: ignore[attr-defined]
        inference_concurrency=2,
        audit_concurrency=1,
        scan_worker_concurrency=1,
        scoring_concurrency=1,
        scoring_nice=0,
        inference_pool="prefork",
        audit_pool="prefork",
    )
    monkeypatch.setitem(sys.modules, fake.__name__, fake)
    args = argparse.Namespace(queue=queue, concurrency=None, index=0)
    cli.cmd_worker(args, SimpleNamespace(log_level="INFO"))  # type: ignore[arg-type]
    assert len(recorded) == 1
    return recorded[0]


def healthcheck_code(service: dict[str, Any]) -> str:
    """The Python source of a `["CMD", "python", "-c", CODE]` health check."""
    test = service.get("healthcheck", {}).get("test")
    assert isinstance(test, list), f"health check must be a list: {test!r}"
    assert test[:3] == ["CMD", "python", "-c"], f"expected CMD python -c CODE: {test!r}"
    assert len(test) == 4, f"expected CMD python -c CODE: {test!r}"
    return test[3]


def parse_modelprint(command: list[str]) -> argparse.Namespace:
    try:
        return cli.build_parser().parse_args(command[1:])
    except SystemExit as exc:
        pytest.fail(f"`{shlex.join(command)}` is not a valid modelprint command line (exit {exc.code})")


# -- docker-compose.yml: the commands --------------------------------------------------------------------


def test_every_service_of_ours_exists_and_runs_its_subcommand() -> None:
    assert "x-modelprint" in load_compose(), "share build/environment through the x-modelprint anchor"
    for name, subcommand in APP_SERVICES.items():
        assert name in services(), f"docker-compose.yml has no {name!r} service"
        command = services()[name].get("command")
        assert isinstance(command, list), f"{name}: command must be a list"
        assert command[0] == "modelprint", f"{name}: command must start with modelprint"
        assert command[1 : 1 + len(subcommand)] == subcommand, f"{name} must run modelprint {subcommand}"


@pytest.mark.parametrize(
    "name", [name for name, svc in load_compose()["services"].items() if "command" in svc]
)
def test_service_command_parses(name: str) -> None:
    service = services()[name]
    command = service["command"]
    assert isinstance(command, list), f"{name}: use the list form of command"
    if "build" in service:
        assert command[0] == "modelprint", f"{name} runs our image: its command must start with modelprint"
    if command[0] == "modelprint":
        args = parse_modelprint(command)
        assert callable(getattr(args, "handler", None)), f"{name}: {command} selects no handler"


def test_parse_check_catches_a_bad_command() -> None:
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["serve", "inference"])
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["worker", "inference", "--concurrency", "two"])


def test_celery_app_paths_and_healthcheck_imports_resolve() -> None:
    """Any `-A module:app` names an importable module; python -c health checks import what exists."""
    for name, service in services().items():
        words: list[str] = list(service.get("command") or [])
        test = (service.get("healthcheck") or {}).get("test") or []
        if isinstance(test, list):
            shell = test[:1] == ["CMD-SHELL"]
            words += [part for item in test[1:] for part in shlex.split(item)] if shell else test
        for flag, value in zip(words, words[1:], strict=False):
            if flag in ("-A", "--app"):
                module = value.split(":")[0]
                assert importlib.util.find_spec(module) is not None, f"{name}: celery app {value!r} not found"
        if isinstance(test, list) and test[:3] == ["CMD", "python", "-c"]:
            for node in ast.walk(ast.parse(test[3])):
                if isinstance(node, ast.Import):
                    for alias in node.names:
                        importlib.import_module(alias.name)
                elif isinstance(node, ast.ImportFrom) and node.module:
                    module = importlib.import_module(node.module)
                    for alias in node.names:
                        assert hasattr(module, alias.name), f"{name}: {node.module} has no {alias.name}"


# -- docker-compose.yml: infrastructure, ordering, health, ports ------------------------------------------


def test_redis_and_postgres_images_and_health() -> None:
    redis, postgres = services()["redis"], services()["postgres"]
    assert redis["image"] == "redis:7"
    assert postgres["image"] == "postgres:16"
    assert "--appendonly" in redis["command"]
    assert redis["command"][redis["command"].index("--appendonly") + 1] == "yes"
    # The embedded Redis's persistence settings, in production too.
    assert redis["command"][redis["command"].index("--save") + 1] == ""
    rewrite_size = redis["command"][redis["command"].index("--auto-aof-rewrite-min-size") + 1]
    assert rewrite_size == embedded.AOF_REWRITE_MIN_SIZE
    assert "redis-cli ping" in " ".join(redis["healthcheck"]["test"])
    assert "pg_isready" in postgres["healthcheck"]["test"]
    env = environment(postgres)
    assert {"POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB"} <= env.keys()
    declared_volumes = load_compose().get("volumes") or {}
    for volume in postgres["volumes"]:
        source, _, target = volume.partition(":")
        assert target == "/var/lib/postgresql/data"
        assert source in declared_volumes, f"postgres data must be on a named volume, not {source!r}"


@pytest.mark.parametrize("name", LONG_RUNNING)
def test_app_service_waits_for_servers_and_migrations(name: str) -> None:
    depends_on = services()[name].get("depends_on")
    assert isinstance(depends_on, dict), f"{name}: depends_on needs the long form with conditions"
    assert depends_on.get("redis", {}).get("condition") == "service_healthy"
    assert depends_on.get("postgres", {}).get("condition") == "service_healthy"
    assert depends_on.get("migrate", {}).get("condition") == "service_completed_successfully"
    assert services()[name].get("restart") in ("unless-stopped", "always", "on-failure")


def test_migrate_is_one_off_after_postgres() -> None:
    migrate = services()["migrate"]
    assert migrate["restart"] == "no"
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert "migrate" not in migrate["depends_on"]
    assert "MODELPRINT_DATABASE_URL" in environment(migrate)


@pytest.mark.parametrize(("name", "path"), sorted(HTTP_SERVICES.items()))
def test_http_service_healthcheck_matches_its_port(name: str, path: str) -> None:
    service = services()[name]
    code = healthcheck_code(service)
    compile(code, f"<{name} healthcheck>", "exec")
    urls = re.findall(r"http://[^'\"]+", code)
    assert len(urls) == 1, f"{name}: expected one URL in the health check"
    url = urlsplit(urls[0])
    command = service["command"]
    port = command[command.index("--port") + 1] if "--port" in command else None
    assert port is not None, f"{name}: pass --port so the health check and the published port agree"
    assert url.hostname == "127.0.0.1"
    assert str(url.port) == port
    assert url.path == path
    container_ports = [str(p).rsplit(":", 1)[-1] for p in service.get("ports", [])]
    assert container_ports == [port], f"{name}: publish the port it serves on"
    host_var = "MODELPRINT_GATEWAY_HOST" if name == "gateway" else "MODELPRINT_AUDITOR_HOST"
    assert environment(service).get(host_var) == "0.0.0.0", f"{name} must listen on all container interfaces"


@pytest.mark.parametrize(("name", "queue"), sorted(WORKER_SERVICES.items()))
def test_worker_healthcheck_pings_the_workers_node_name(
    monkeypatch: pytest.MonkeyPatch, name: str, queue: str
) -> None:
    """Run the health check's code against a recording Celery app: it must ping this container's node."""
    service = services()[name]
    assert "healthcheck" in service, f"{name} has no health check; depends_on: service_healthy needs one"
    code = healthcheck_code(service)
    argv = worker_argv(monkeypatch, queue)
    container_hostname = "0123456789ab"
    node = host_format(argv[argv.index("--hostname") + 1], host=container_hostname)

    pings: list[dict[str, Any]] = []
    replies: list[dict[str, Any]] = []

    def ping(
        destination: list[str] | None = None, timeout: float = 1.0, **kwargs: Any
    ) -> list[dict[str, Any]]:
        pings.append({"destination": destination, "timeout": timeout, **kwargs})
        return list(replies)

    app = SimpleNamespace(control=SimpleNamespace(ping=ping))
    monkeypatch.setattr("shared.celery_app.create_celery_app", lambda *_args, **_kwargs: app)
    monkeypatch.setattr("shared.config.Settings", SimpleNamespace)
    monkeypatch.setattr(socket, "gethostname", lambda: container_hostname)
    for answer, expected_exit in (([{node: {"ok": "pong"}}], 0), ([], 1)):
        replies[:] = answer
        with pytest.raises(SystemExit) as exited:
            exec(compile(code, f"<{name} healthcheck>", "exec"), {})
        assert exited.value.code == expected_exit, (
            f"{name}: exit {exited.value.code} when the ping got {answer}"
        )
    assert [p["destination"] for p in pings] == [[node], [node]], f"{name} must ping exactly {node}"
    assert all(0 < p["timeout"] <= 10 for p in pings)


def test_published_ports_bind_to_localhost_only() -> None:
    published = 0
    for name, service in services().items():
        for port in service.get("ports", []):
            published += 1
            if isinstance(port, dict):
                assert port.get("host_ip") == "127.0.0.1", f"{name}: {port}"
            else:
                assert str(port).startswith("127.0.0.1:"), f"{name}: {port!r} is not bound to 127.0.0.1"
    assert published >= 2


def test_inference_worker_is_scalable() -> None:
    worker = services()["inference-worker"]
    assert "container_name" not in worker
    assert not worker.get("ports")
    assert "hostname" not in worker, "a fixed hostname would give every replica the same Celery node name"


def test_only_the_scoring_worker_yields_the_cpu() -> None:
    """Nice values do not weigh across containers (cgroups): the scoring worker's CPU weight is lowered
    in compose, to the share nice 10 gives a process, and no other service of ours is lowered."""
    assert services()["scoring-worker"].get("cpu_shares") == 110
    for name in APP_SERVICES:
        if name != "scoring-worker":
            assert "cpu_shares" not in services()[name], f"{name} should keep the default CPU weight"


def test_app_services_run_in_production_mode_with_least_secrets() -> None:
    for name in APP_SERVICES:
        env = environment(services()[name])
        assert env.get("MODELPRINT_ENV") == "production", name
        assert env.get("MODELPRINT_REDIS_URL", "").startswith("redis://redis:"), name
    for name in ("auditor-api", "inference-worker", "scan-worker"):
        env = environment(services()[name])
        for var in (*SECRET_VARS, "MODELPRINT_FINGERPRINT_ACTIVE_KEY", "MODELPRINT_DATABASE_URL"):
            assert var in env, f"{name} needs {var}"
    for name in ("gateway", "audit-worker", "scoring-worker", "beat", "migrate"):
        env = environment(services()[name])
        assert not set(SECRET_VARS) & env.keys(), f"{name} must not receive secrets it does not use"
    assert "MODELPRINT_DATABASE_URL" not in environment(services()["gateway"])


def test_beat_has_a_writable_data_volume() -> None:
    beat = services()["beat"]
    data_dir = environment(beat)["MODELPRINT_DATA_DIR"]
    mounts = [str(v).split(":")[:2] for v in beat.get("volumes", [])]
    assert [volume for volume, target in mounts if target == data_dir], f"mount a volume on {data_dir}"
    for volume, target in mounts:
        if target == data_dir:
            assert volume in (load_compose().get("volumes") or {}), "use a named volume (owned by the image)"
    # The image must create the data dir for its user: a new named volume copies that ownership.
    runs = " ".join(
        args for keyword, args in dockerfile_instructions(DOCKERFILE.read_text()) if keyword == "RUN"
    )
    assert re.search(rf"mkdir [^&;]*{re.escape(data_dir)}\b", runs), f"the Dockerfile must create {data_dir}"
    assert re.search(rf"chown [^&;]*{re.escape(data_dir)}\b", runs), f"the Dockerfile must chown {data_dir}"


# -- Dockerfile and .dockerignore --------------------------------------------------------------------------


def test_dockerfile_base_image_and_user() -> None:
    instructions = dockerfile_instructions(DOCKERFILE.read_text())
    froms = [args for keyword, args in instructions if keyword == "FROM"]
    assert froms, "Dockerfile has no FROM"
    final_image = froms[-1].split()[0]
    assert fnmatch.fnmatch(froms[0].split()[0], "python:3.11*")
    assert fnmatch.fnmatch(final_image, "python:3.11*")
    users = [args for keyword, args in instructions if keyword == "USER"]
    assert users, "Dockerfile must switch to a non-root USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), f"final USER is {users[-1]!r}"
    env_text = " ".join(args for keyword, args in instructions if keyword == "ENV")
    assert re.search(r"\bPYTHONUNBUFFERED=1\b", env_text)
    assert ("WORKDIR", "/app") in instructions


def test_dockerfile_copies_only_existing_paths() -> None:
    copies = [args for keyword, args in dockerfile_instructions(DOCKERFILE.read_text()) if keyword == "COPY"]
    assert copies
    for args in copies:
        sources, _, flags = copy_sources_and_dest(args)
        if "from" in flags:
            continue
        matched = 0
        for source in sources:
            assert source.rstrip("/") not in (".", ""), "do not COPY the whole context (secrets, .venv...)"
            if any(char in source for char in "*?["):
                matched += len(list(REPO.glob(source)))
            else:
                assert (REPO / source).exists(), f"COPY source {source!r} does not exist in the repository"
                matched += 1
        assert matched, f"COPY {args!r} copies nothing"
    for needed in ("pyproject.toml", "alembic.ini", "modelprint", "services", "shared", "migrations"):
        assert needed in copied_paths(), f"the image needs {needed}"


def test_dockerfile_keeps_migrations_where_shared_migrate_looks() -> None:
    """shared/migrate.py looks for alembic.ini and migrations/ beside the `shared` package."""
    placed = copied_paths()
    package_root = placed["shared"].parent
    assert placed["alembic.ini"] == package_root / "alembic.ini"
    assert placed["migrations"] == package_root / "migrations"
    # ... and the installed `modelprint` must import that tree, not a copy in site-packages.
    instructions = dockerfile_instructions(DOCKERFILE.read_text())
    editable = any(
        keyword == "RUN" and re.search(r"pip install[^&;]*\s(-e|--editable)\s+\.", args)
        for keyword, args in instructions
    )
    pythonpath = any(
        keyword == "ENV" and re.search(rf"PYTHONPATH=[^ ]*{re.escape(str(package_root))}\b", args)
        for keyword, args in instructions
    )
    assert editable or pythonpath, f"install editable (pip install -e .) or set PYTHONPATH={package_root}"


def test_dockerignore_keeps_secrets_and_local_state_out() -> None:
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    for needed in (".env", ".venv", ".git", ".modelprint", "**/__pycache__", ".pytest_cache"):
        assert needed in patterns, f".dockerignore must exclude {needed}"

    def ignored(path: str) -> bool:
        result = False
        for pattern in patterns:
            negate = pattern.startswith("!")
            pattern = pattern.lstrip("!").rstrip("/")
            if fnmatch.fnmatch(path, pattern) or fnmatch.fnmatch(path, pattern.removeprefix("**/")):
                result = not negate
        return result

    for path in copied_paths():
        assert not ignored(path), f".dockerignore excludes {path}, which the Dockerfile copies"


# -- .env.example ------------------------------------------------------------------------------------------


def test_interpolation_helpers() -> None:
    found = interpolated_vars(["${A:?x}", "${B:-1}@${C}", "$D and $$E", {"k": "${F-y}"}])
    assert sorted(found) == [("A", ":?"), ("B", ":-"), ("C", None), ("D", None), ("F", "-")]
    values, documented = parse_env_file('A=1\n# B=2\nC=\'{"k":"v"}\'\n# comment\n')
    assert values == {"A": "1", "C": '{"k":"v"}'}
    assert documented == {"A", "B", "C"}


def test_every_compose_variable_has_a_default_or_is_in_env_example() -> None:
    values, documented = parse_env_file(ENV_EXAMPLE.read_text())
    referenced = interpolated_vars(load_compose())
    assert referenced, "docker-compose.yml should take its secrets from .env"
    for name, operator in referenced:
        if operator in ("-", ":-"):
            continue
        assert name in values, f"${{{name}}} is used in docker-compose.yml but not set in .env.example"
    missing_message = [name for name, operator in referenced if operator in ("?", ":?")]
    for secret in ("POSTGRES_PASSWORD", *SECRET_VARS):
        assert secret in missing_message, f"use ${{{secret}:?message}} so compose fails clearly without it"
    unused = documented - {name for name, _ in referenced}
    assert not unused, f".env.example documents variables docker-compose.yml does not use: {sorted(unused)}"


def test_env_example_holds_only_placeholders_production_refuses() -> None:
    text = ENV_EXAMPLE.read_text()
    assert "secrets.token_hex(32)" in text, ".env.example must say how to generate the secrets"
    values, _ = parse_env_file(text)
    keys = json.loads(values["MODELPRINT_FINGERPRINT_KEYS"])
    assert isinstance(keys, dict)
    assert keys
    assert values["MODELPRINT_FINGERPRINT_ACTIVE_KEY"] in keys
    for name, secret in [
        ("POSTGRES_PASSWORD", values["POSTGRES_PASSWORD"]),
        ("MODELPRINT_ADMIN_TOKEN", values["MODELPRINT_ADMIN_TOKEN"]),
        *[(f"fingerprint key {key_id}", secret) for key_id, secret in keys.items()],
    ]:
        with pytest.raises(SecretsError):
            check_secret_strength(name, secret)
