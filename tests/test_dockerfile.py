"""The worker image's Dockerfile, read as text: there is no Docker daemon here (nor in CI) to build it.

What these tests hold the file to is what the flows need at run time in a container: Python 3.11 on
Debian (the version pyproject.toml requires), exactly uv.lock's dependencies, every PostgreSQL tool dbops
looks up with find_tool in the server's major version, zstd, a non-root user, and the working directory
the Docker/Kubernetes deployments' pull step moves to.
"""

from __future__ import annotations

import fnmatch
import os
import re
import shlex
import shutil
import subprocess
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from deployments.pools import VARIANTS

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions in order, continuation lines joined and comments dropped (Dockerfile syntax)."""
    instructions: list[Instruction] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        keyword, _, args = line.partition(" ")
        instructions.append(Instruction(keyword.upper(), args.strip()))
    assert not pending, "the Dockerfile ends inside a continued line"
    return instructions


DOCKERFILE = parse_dockerfile((ROOT / "Dockerfile").read_text())


def of(keyword: str) -> list[str]:
    return [i.args for i in DOCKERFILE if i.keyword == keyword]


def build_args() -> dict[str, str]:
    args: dict[str, str] = {}
    for arg in of("ARG"):
        name, _, default = arg.partition("=")
        args[name] = default
    return args


def run_lines() -> str:
    return "\n".join(of("RUN"))


def tools_dbops_looks_up() -> set[str]:
    """Every PostgreSQL tool the code finds through pgtools.find_tool (or names literally as one)."""
    found: set[str] = set()
    for path in (ROOT / "flows").rglob("*.py"):
        found |= set(re.findall(r'find_tool\(\s*"([a-z_]+)"', path.read_text()))
    return found


def test_the_base_is_debian_python_of_the_version_pyproject_requires() -> None:
    [base] = of("FROM")
    assert re.fullmatch(r"python:3\.11(\.\d+)?-slim-bookworm", base), base
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert ">=3.11" in requires
    assert "<3.12" in requires


def test_dependencies_are_exactly_the_lock_without_dev_tools() -> None:
    runs = of("RUN")
    syncs = [r for r in runs if "uv sync" in r]
    assert syncs, "no `uv sync` in the Dockerfile"
    for sync in syncs:
        argv = shlex.split(sync[sync.index("uv sync") :].split("&&")[0])
        assert "--frozen" in argv, sync  # uv.lock as committed, never re-resolved during a build
        assert "--no-dev" in argv, sync
    copies = of("COPY")
    assert "pyproject.toml uv.lock ./" in copies
    assert ". ." in copies
    # the final sync (the project itself) runs after the whole repository is in the image
    order = [(i.keyword, i.args) for i in DOCKERFILE]
    last_sync = max(n for n, (k, a) in enumerate(order) if k == "RUN" and "uv sync" in a)
    assert order.index(("COPY", ". .")) < last_sync
    assert "--no-install-project" in syncs[0]


def test_postgresql_tools_of_the_build_arg_major_and_zstd_are_installed() -> None:
    assert build_args()["PG_MAJOR"] == "15"
    installs = [r for r in of("RUN") if "apt-get install" in r]
    packages = set(shlex.split(" ".join(installs)))
    assert {"postgresql-${PG_MAJOR}", "postgresql-client-${PG_MAJOR}", "zstd"} <= packages
    # PGDG (all majors), set up with the script and key that Debian's postgresql-common ships
    assert "/usr/share/postgresql-common/pgdg/apt.postgresql.org.sh -y" in run_lines()
    # no cluster is created inside the image
    assert "create_main_cluster = false" in run_lines()
    assert any("/usr/lib/postgresql/${PG_MAJOR}/bin" in env for env in of("ENV"))


def test_the_build_runs_every_tool_dbops_looks_up() -> None:
    """A tool added to the code (find_tool("pg_waldump", ...)) fails this until the image checks it."""
    loop = re.search(
        r"for tool in ([a-z_ ]+); do\s+/usr/lib/postgresql/\$\{PG_MAJOR\}/bin/\$\{tool\} --version",
        run_lines(),
    )
    assert loop, "the Dockerfile no longer runs each PostgreSQL tool's --version"
    checked = set(loop.group(1).split())
    needed = tools_dbops_looks_up() | {"pg_dump", "pg_restore", "psql", "pg_basebackup", "pg_verifybackup"}
    assert {"pg_basebackup", "pg_verifybackup", "pg_archivecleanup", "pg_ctl", "pg_amcheck"} <= needed
    assert needed - checked == set()
    assert "zstd --version" in run_lines()


def test_flow_runs_are_not_root() -> None:
    users = of("USER")
    assert users, "no USER: flow runs would be root (and PostgreSQL refuses to start as root for PITR)"
    final = users[-1]
    assert final not in {"root", "0", "0:0"}
    assert re.fullmatch(r"\d+", final), "a numeric uid lets Kubernetes' runAsNonRoot verify it"
    assert f"--uid {final}" in run_lines()
    # the PITR data directories' parent belongs to that user
    assert "install -d -o dbops -g dbops /var/lib/dbops" in run_lines()


def test_analytics_are_off_in_the_image() -> None:
    assert any("PREFECT_SERVER_ANALYTICS_ENABLED=false" in env for env in of("ENV"))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_the_deployments_pull_step_moves_into_the_images_workdir(variant: str) -> None:
    [workdir] = of("WORKDIR")
    data = yaml.safe_load((ROOT / variant).read_text())
    image_pull = data["definitions"]["image_pull"]
    assert image_pull == [{"prefect.deployments.steps.set_working_directory": {"directory": workdir}}]
    # the deployments' image is this Dockerfile's, built for its default server major
    image = data["definitions"]["work_pool"]["job_variables"]["image"]
    assert image.endswith(f":pg{build_args()['PG_MAJOR']}")


def test_dockerignore_keeps_local_state_out_and_the_package_in() -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]

    def ignored(path: str) -> bool:
        return any(fnmatch.fnmatch(path, p) or path.startswith(p.rstrip("/") + "/") for p in patterns)

    for kept_out in (".venv", ".git", ".state", "bench/out", ".venv/bin/python"):
        assert ignored(kept_out), kept_out
    wheel = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["hatch"]["build"]["targets"]["wheel"]
    for needed in ["pyproject.toml", "uv.lock", "README.md", *wheel["packages"]]:
        assert not ignored(needed), f"{needed} is needed to build the image"


def test_the_images_dependency_set_runs_every_deployed_flow(tmp_path: Path) -> None:
    """What the image's `uv sync --frozen --no-dev` installs, into a fresh environment here: every flow of
    prefect.yaml imports from it (none leans on a dev-only package such as moto or the Docker SDK), and the
    test tools and the pool collections stay out of the image."""
    uv = shutil.which("uv") or str(Path.home() / ".local/bin/uv")
    venv = tmp_path / "venv"
    env = {**os.environ, "UV_PROJECT_ENVIRONMENT": str(venv)}
    env.pop("VIRTUAL_ENV", None)
    sync = subprocess.run(
        [uv, "sync", "--frozen", "--no-dev", "--quiet"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert sync.returncode == 0, sync.stderr
    entrypoints = [
        d["entrypoint"] for d in yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]
    ]
    modules = sorted({e.split(":")[0].removesuffix(".py").replace("/", ".") for e in entrypoints})
    probe = (
        "import importlib, importlib.util, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "print(sorted(m for m in ('pytest', 'moto', 'prefect_docker', 'prefect_kubernetes', 'mypy')"
        " if importlib.util.find_spec(m)))\n"
    )
    python = venv / "bin" / "python"
    run_env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(tmp_path),
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    out = subprocess.run([str(python), "-c", probe], cwd=ROOT, env=run_env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"
    assert len(modules) >= 10
