"""Docker cannot run here: the compose file and the Dockerfile are checked to run the commands the README
documents, with the settings the service reads."""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import time
from pathlib import Path

import pytest
import redis
import yaml

from api.cli import build_parser
from api.config import Settings
from tests.processes import free_port

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
DOCKERFILE = (ROOT / "Dockerfile").read_text()
README = (ROOT / "README.md").read_text()


def readme_production_commands() -> list[str]:
    section = README.split("### Production", 1)[1]
    block = section.split("```sh\n", 1)[1].split("```", 1)[0]
    return [line.split("#", 1)[0].strip() for line in block.splitlines() if line.strip()]


def compose_command(service: str) -> str:
    return " ".join(COMPOSE["services"][service]["command"])


def test_compose_runs_the_readme_commands() -> None:
    services = COMPOSE["services"]
    assert {"postgres", "redis", "migrate", "api", "worker"} <= set(services)
    commands = readme_production_commands()
    assert [compose_command(s) for s in ("migrate", "api", "worker")] == commands
    for command in commands:  # each is a valid `greentrainer` invocation
        words = command.split()
        assert words[0] == "greentrainer"
        build_parser().parse_args(words[1:])


def test_compose_wiring() -> None:
    services = COMPOSE["services"]
    assert services["postgres"]["image"].startswith("postgres") and services["redis"]["image"].startswith(
        "redis"
    )
    assert services["api"]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert services["worker"]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    devices = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert any("gpu" in d["capabilities"] and d["driver"] == "nvidia" for d in devices)
    known = {f"GT_{name.upper()}" for name in Settings.model_fields}
    for name in ("migrate", "api", "worker"):
        env = services[name]["environment"]
        assert set(env) <= known, set(env) - known
        assert env["GT_DATABASE_URL"].startswith("postgresql+psycopg://")
        assert env["GT_BROKER_URL"].startswith("redis://")
    # The API and the workers share the artifacts (uploads, checkpoints) and the models.
    assert {v.split(":")[0] for v in services["api"]["volumes"]} == {
        v.split(":")[0] for v in services["worker"]["volumes"]
    }


def test_a_multi_gpu_worker_runs_each_job_on_every_gpu_it_reserves() -> None:
    services = COMPOSE["services"]
    multi, single = services["worker-multi-gpu"], services["worker"]
    assert multi["profiles"] == ["multi-gpu"]  # started on request only: `--profile multi-gpu`
    for key in ("image", "command", "volumes", "depends_on", "restart"):
        assert multi[key] == single[key], key
    env = multi["environment"]
    assert set(env) <= {f"GT_{name.upper()}" for name in Settings.model_fields}
    assert {k: v for k, v in env.items() if k != "GT_WORKER_NPROC"} == single["environment"]
    (gpus,) = multi["deploy"]["resources"]["reservations"]["devices"]
    assert gpus["driver"] == "nvidia" and "gpu" in gpus["capabilities"] and gpus["count"] > 1
    # One rank per GPU it reserves, read as the worker reads its settings.
    nproc = Settings.model_validate({"worker_nproc": str(env["GT_WORKER_NPROC"])}).worker_nproc
    assert nproc == gpus["count"]
    assert (
        Settings.model_fields["worker_nproc"].default == 1 and "GT_WORKER_NPROC" not in single["environment"]
    )


def test_dockerfile_installs_torch_first_and_serves_the_api() -> None:
    lines = DOCKERFILE.splitlines()
    torch_line = next(i for i, line in enumerate(lines) if "torch==2.13.0" in line and line.startswith("RUN"))
    project_line = next(i for i, line in enumerate(lines) if re.match(r"RUN pip install \.$", line))
    assert torch_line < project_line
    cmd = next(line for line in lines if line.startswith("CMD"))
    assert " ".join(json.loads(cmd[3:])) == compose_command("api")
    assert COMPOSE["services"]["worker"]["build"]["args"]["TORCH_INDEX"].endswith(("cu128", "cu126", "cu124"))


def test_readme_configuration_table_lists_every_setting() -> None:
    section = README.split("### Configuration", 1)[1].split("\n### ", 1)[0]
    listed = set(re.findall(r"^\| `(GT_[A-Z0-9_]+)` \|", section, flags=re.M))
    assert listed == {f"GT_{name.upper()}" for name in Settings.model_fields}


def test_make_run_runs_greentrainer_serve() -> None:
    makefile = (ROOT / "Makefile").read_text()
    recipe = makefile.split("\nrun:", 1)[1].split("\n\n", 1)[0]
    assert "$(BIN)/greentrainer serve" in recipe


def test_long_running_services_restart_and_the_migration_runs_once() -> None:
    services = COMPOSE["services"]
    for name in ("postgres", "redis", "api", "worker", "worker-multi-gpu", "proxy"):
        assert services[name].get("restart") == "unless-stopped", name
    assert services["migrate"].get("restart", "no") == "no"  # one-shot: run again, it would migrate again


def test_redis_requires_the_password_the_broker_url_carries(tmp_path: Path) -> None:
    services = COMPOSE["services"]
    sh, flag, script = services["redis"]["command"]
    environment = services["redis"]["environment"]
    password = environment["REDIS_PASSWORD"]
    assert re.fullmatch(r"\$\{REDIS_PASSWORD:\?[^}]+\}", password)  # compose refuses to start without it
    for name in ("migrate", "api", "worker"):
        url = services[name]["environment"]["GT_BROKER_URL"]
        assert re.fullmatch(r"redis://:\$\{REDIS_PASSWORD(:\?[^}]+)?\}@redis:6379/0", url), url
    # The healthcheck authenticates too (redis-cli reads REDISCLI_AUTH) and fails unless Redis answers PONG.
    assert environment["REDISCLI_AUTH"] == password
    assert "PONG" in " ".join(services["redis"]["healthcheck"]["test"])

    # The same script, run here (compose's $$ is the shell's $; no image entrypoint; a port of this test's
    # own): Redis refuses a client without the password, takes the right one, and no command line shows it.
    assert (sh, flag) == ("sh", "-c") and "--requirepass" not in script
    port, secret = free_port(), secrets.token_hex(16)
    local = (
        script.replace("$$", "$")
        .replace("docker-entrypoint.sh ", "")
        .replace("redis-server -", f"redis-server - --port {port} --dir {tmp_path} --save ''", 1)
    )
    proc = subprocess.Popen(["sh", "-c", local], env={**os.environ, "REDIS_PASSWORD": secret})
    try:
        client = redis.Redis(port=port, password=secret, socket_timeout=2)
        deadline = time.monotonic() + 20
        while True:
            try:
                assert client.ping()
                break
            except redis.ConnectionError:
                assert proc.poll() is None and time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.1)
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=port, socket_timeout=2).ping()
        assert secret.encode() not in Path(f"/proc/{proc.pid}/cmdline").read_bytes()
        client.close()
    finally:
        proc.kill()
        proc.wait()


def test_only_the_tls_proxy_publishes_ports_and_it_points_at_the_api() -> None:
    services = COMPOSE["services"]
    published = {name for name, service in services.items() if service.get("ports")}
    assert published == {"proxy"}
    proxy = services["proxy"]
    assert proxy["image"].split(":")[0] == "caddy" and proxy["image"].startswith("caddy:2")
    assert {p.split("/")[0] for p in proxy["ports"]} == {"80:80", "443:443"}
    assert "api" in proxy["depends_on"]
    assert proxy["environment"]["GT_DOMAIN"].startswith("${GT_DOMAIN:?")
    mounts = {v.split(":")[1]: v.split(":")[0] for v in proxy["volumes"]}
    caddyfile = (ROOT / mounts["/etc/caddy/Caddyfile"]).resolve()
    assert caddyfile.is_relative_to(ROOT) and caddyfile.is_file()
    assert mounts["/data"] in COMPOSE["volumes"]  # certificates survive a restart
    # The site is GT_DOMAIN (automatic HTTPS) and its one handler proxies to the API's port.
    lines = [line.split("#", 1)[0].strip() for line in caddyfile.read_text().splitlines()]
    lines = [line for line in lines if line]
    api_port = COMPOSE["services"]["api"]["command"][-1]
    assert lines == ["{$GT_DOMAIN} {", f"reverse_proxy api:{api_port}", "}"]
    assert api_port in [str(p) for p in services["api"].get("expose", [])]
