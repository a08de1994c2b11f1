"""Running an application's Alembic in subprocesses, against a real throwaway PostgreSQL.

The image manager sample is migrated revision by revision on a fresh database per test; broken and
branched trees are copies of it made in tmp_path with one extra revision file.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from flows.core.alembic_errors import (
    BrokenRevisionTree,
    LockTimeout,
    MultipleHeads,
    NoDowngrade,
    TargetBehindCurrent,
    UnknownRevision,
    UnknownTarget,
)
from flows.core.alembic_process import alembic_environment
from flows.core.alembic_runner import AlembicApp
from flows.core.alembic_tree import Revision
from flows.core.errors import AuthenticationFailed, is_transient
from flows.core.postgres import ConnParams
from flows.core.sql_text import split_statements
from tests.harness.factories import conn_params
from tests.harness.pg import PgCluster

REPO_ROOT = Path(__file__).resolve().parents[1]
IMAGEMANAGER = REPO_ROOT / "examples" / "imagemanager"
REVISIONS = [
    "0001_initial",
    "0002_image_metadata",
    "0003_projects_archived",
    "0004_classifications_image_index",
]
HEAD = REVISIONS[-1]


@pytest.fixture(scope="module")
def app() -> AlembicApp:
    return AlembicApp(IMAGEMANAGER / "alembic.ini")


@pytest.fixture
def params(pg: PgCluster, unique: str) -> ConnParams:
    name = f"migrate_{unique}"
    pg.create_database(name)
    return conn_params(pg, name, application_name="dbops-migrate-test")


def _copy_tree(tmp_path: Path, extra_name: str, extra_source: str) -> AlembicApp:
    shutil.copy(IMAGEMANAGER / "alembic.ini", tmp_path / "alembic.ini")
    shutil.copytree(
        IMAGEMANAGER / "alembic", tmp_path / "alembic", ignore=shutil.ignore_patterns("__pycache__")
    )
    (tmp_path / "alembic" / "versions" / extra_name).write_text(extra_source)
    return AlembicApp(tmp_path / "alembic.ini")


def test_tree_heads_history_and_pending(app: AlembicApp) -> None:
    assert app.heads() == [HEAD]
    history = app.history()
    assert [r.id for r in reversed(history)] == REVISIONS
    first = history[-1]
    assert isinstance(first, Revision)
    assert first.down_revision is None
    assert first.has_downgrade
    assert history[0].down_revision == "0003_projects_archived"
    assert "CONCURRENTLY" in history[0].doc
    assert app.pending([], "head") == REVISIONS
    assert app.pending(["0002_image_metadata"], HEAD) == REVISIONS[2:]
    assert app.pending([HEAD], "head") == []
    with pytest.raises(TargetBehindCurrent, match="use downgrade"):
        app.pending(["0003_projects_archived"], "0001_initial")
    with pytest.raises(UnknownTarget):
        app.pending([], "9999_nope")


def test_upgrade_in_steps_with_timings_then_downgrade(app: AlembicApp, params: ConnParams) -> None:
    assert app.current(params) == []

    first = app.upgrade(params, "0002_image_metadata", lock_timeout_ms=2000, statement_timeout_ms=60000)
    assert [s.revision for s in first.steps] == REVISIONS[:2]
    assert all(s.seconds > 0 and s.direction == "upgrade" for s in first.steps)
    assert first.start == []
    assert first.end == ["0002_image_metadata"]

    second = app.upgrade(params, "head", lock_timeout_ms=2000, statement_timeout_ms=60000)
    assert second.start == ["0002_image_metadata"]
    assert [s.revision for s in second.steps] == REVISIONS[2:]
    assert second.end == [HEAD]

    back = app.downgrade(params, "0002_image_metadata")
    assert [s.revision for s in back.steps] == [HEAD, "0003_projects_archived"]
    assert back.start == [HEAD]
    assert back.end == ["0002_image_metadata"]
    assert app.downgrade(params, "base").end == []


def test_offline_sql_per_revision(app: AlembicApp) -> None:
    offline = app.offline_sql(None, "head")
    assert list(offline) == REVISIONS
    assert offline.failed == {}
    assert all("ALTER TABLE" in sql or "CREATE" in sql for sql in offline.values())
    in_tx, concurrently_outside = False, []
    for stmt in split_statements(offline[HEAD]):
        if stmt.text in ("BEGIN", "COMMIT"):
            in_tx = stmt.text == "BEGIN"
        elif "CONCURRENTLY" in stmt.text:
            concurrently_outside.append(not in_tx)
    assert concurrently_outside == [True]


def test_offline_sql_failure_is_reported_not_fatal(tmp_path: Path) -> None:
    reads_data = (
        'revision = "0005_reads_data"\ndown_revision = "0004_classifications_image_index"\n'
        "from alembic import op\nimport sqlalchemy as sa\n\n"
        "def upgrade():\n    op.get_bind().execute(sa.text('SELECT 1')).scalar_one()\n\n"
        "def downgrade():\n    pass\n"
    )
    app = _copy_tree(tmp_path, "0005_reads_data.py", reads_data)
    offline = app.offline_sql("0003_projects_archived", "head")
    assert list(offline) == [HEAD]
    assert list(offline.failed) == ["0005_reads_data"]


def test_lock_timeout_is_transient_and_names_the_revision(
    app: AlembicApp, params: ConnParams, pg: PgCluster
) -> None:
    app.upgrade(params, "0001_initial", lock_timeout_ms=2000, statement_timeout_ms=0)
    with pg.connect(params.database, autocommit=False) as blocker:
        blocker.execute("LOCK TABLE data_instances IN ACCESS EXCLUSIVE MODE")
        t0 = time.monotonic()
        with pytest.raises(LockTimeout) as caught:
            app.upgrade(params, "head", lock_timeout_ms=300, statement_timeout_ms=0)
        elapsed = time.monotonic() - t0
        blocker.rollback()
    assert is_transient(caught.value)
    assert caught.value.revision == "0002_image_metadata"
    assert "lock_timeout" in str(caught.value)
    waited = caught.value.seconds
    assert waited is not None, "the failed step's duration is declared on the error"
    assert 0.3 <= waited < 5, f"the failed step ran {waited:.1f} s: roughly lock_timeout plus start-up"
    assert elapsed < 20, "two subprocesses and 0.3 s of waiting, not PostgreSQL's endless default wait"
    assert pg.password not in str(caught.value)
    assert app.current(params) == ["0001_initial"], "the revision was rolled back as a whole"
    assert app.upgrade(params, "head", lock_timeout_ms=2000, statement_timeout_ms=0).end == [HEAD]


def _stamp(pg: PgCluster, database: str, revision: str) -> None:
    """What `alembic stamp` leaves behind, without a subprocess."""
    pg.sql(
        "CREATE TABLE IF NOT EXISTS alembic_version (version_num varchar(32) PRIMARY KEY);"
        "DELETE FROM alembic_version;",
        dbname=database,
    )
    pg.sql("INSERT INTO alembic_version VALUES (%s)", dbname=database, params=[revision])


def test_database_stamped_with_unknown_revision(app: AlembicApp, params: ConnParams, pg: PgCluster) -> None:
    _stamp(pg, params.database, "ffff_from_the_future")
    with pytest.raises(UnknownRevision, match="ffff_from_the_future") as caught:
        app.upgrade(params, "head", lock_timeout_ms=2000, statement_timeout_ms=0)
    message = str(caught.value)
    assert "does not know" in message
    assert message.count(". ") == 0
    assert "\n" not in message


def test_wrong_password_is_authentication_failed_without_the_password(
    app: AlembicApp, params: ConnParams
) -> None:
    """The password reaches Alembic through a private passfile (tests/test_alembic_guards.py shows the
    child's environment); a wrong one is named, never shown."""
    wrong = replace(params, password="not-the-Secret-42")
    with pytest.raises(AuthenticationFailed) as caught:
        app.current(wrong)
    assert "not-the-Secret-42" not in str(caught.value)


def test_multiple_heads_are_refused(tmp_path: Path) -> None:
    branch = (
        '"""A second branch off 0003."""\n'
        'revision = "0005_branch"\ndown_revision = "0003_projects_archived"\n\n'
        "def upgrade():\n    pass\n\n\ndef downgrade():\n    pass\n"
    )
    app = _copy_tree(tmp_path, "0005_branch.py", branch)
    assert sorted(app.heads()) == sorted([HEAD, "0005_branch"])
    with pytest.raises(MultipleHeads, match="merge them") as caught:
        app.pending([], "head")
    assert "0005_branch" in str(caught.value)


@pytest.mark.parametrize(
    ("source", "reason"),
    [
        (
            'revision = "0005_bad"\ndown_revision = "0004_classifications_image_index"\ndef upgrade(:\n',
            "syntax",
        ),
        (
            'revision = "0005_orphan"\ndown_revision = "0099_missing"\ndef upgrade():\n    pass\n',
            "0099_missing",
        ),
    ],
)
def test_broken_tree_is_one_sentence(tmp_path: Path, source: str, reason: str) -> None:
    app = _copy_tree(tmp_path, "0005_broken.py", source)
    with pytest.raises(BrokenRevisionTree) as caught:
        app.heads()
    message = str(caught.value)
    assert reason in message
    assert "before migrating" in message
    assert message.count("; ") == 1
    assert "\n" not in message


def test_downgrade_refuses_revision_without_downgrade(
    tmp_path: Path, params: ConnParams, pg: PgCluster
) -> None:
    no_down = (
        'revision = "0005_one_way"\ndown_revision = "0004_classifications_image_index"\n\n'
        "def upgrade():\n    pass\n\n\ndef downgrade():\n    pass\n"
    )
    app = _copy_tree(tmp_path, "0005_one_way.py", no_down)
    assert app.history()[0].has_downgrade is False
    _stamp(pg, params.database, "0005_one_way")
    with pytest.raises(NoDowngrade, match="0005_one_way"):
        app.downgrade(params, "0003_projects_archived")


INSTALLED_ELSEWHERE = """
import os, sys
from pathlib import Path
import flows
from flows.core.alembic_runner import AlembicApp
assert Path(flows.__file__).resolve().is_relative_to(Path(sys.argv[1]).resolve()), flows.__file__
app = AlembicApp(Path(sys.argv[2]), pass_env=("DRIVER_MARK",))
print(",".join(r.id for r in reversed(app.history())))
"""


def test_driver_runs_with_python_m_from_a_copy_of_dbops_installed_elsewhere(tmp_path: Path) -> None:
    """The child runs `python -m flows.core.alembic_driver`: it must find the same dbops as the worker,
    whatever the working directory, even when dbops is not the checkout on the interpreter's path."""
    site = tmp_path / "site"
    shutil.copytree(REPO_ROOT / "flows", site / "flows", ignore=shutil.ignore_patterns("__pycache__"))
    driver = site / "flows" / "core" / "alembic_driver.py"
    mark = tmp_path / "driver-ran-from-the-copy"
    driver.write_text(
        driver.read_text() + '\nimport os\nopen(os.environ["DRIVER_MARK"], "w").close()\n', encoding="utf-8"
    )
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "DRIVER_MARK": str(mark)}
    done = subprocess.run(
        [sys.executable, "-c", INSTALLED_ELSEWHERE, str(site), str(IMAGEMANAGER / "alembic.ini")],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ",".join(REVISIONS)
    assert mark.exists(), "the child ran the driver of the dbops that launched it, not another copy"


def test_alembic_environment_puts_the_folder_of_flows_first_on_pythonpath(tmp_path: Path) -> None:
    root = str(REPO_ROOT)
    env = alembic_environment(None, None, base={"PYTHONPATH": f"/opt/app{os.pathsep}{root}"})
    assert env["PYTHONPATH"].split(os.pathsep) == [root, "/opt/app"]
    listed = alembic_environment(None, None, pass_env=("PYTHONPATH",), base={"PYTHONPATH": "/opt/app"})
    assert listed["PYTHONPATH"].split(os.pathsep)[0] == root, "a listed PYTHONPATH does not hide the driver"
    assert alembic_environment(None, None, base={})["PYTHONPATH"] == root
