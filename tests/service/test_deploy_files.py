"""Docker cannot run here: the compose file and the Dockerfile are checked to run the commands the README
documents, with the settings the service reads."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from api.cli import build_parser
from api.config import Settings

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
