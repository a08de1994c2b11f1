"""One error rule: every error dbops raises is a DbopsError with one sentence and a `transient` flag, its
context declared in its constructor; a plain-Python fault at a boundary (a file where a directory must
be, JSON that is not JSON) ends a flow with a dbops sentence, not `JSONDecodeError: Expecting value`."""

from __future__ import annotations

import importlib
import inspect
import pickle
import pkgutil
import types
from pathlib import Path
from typing import Any

import pytest

import blocks
import deployments
import flows
from flows.core import errors
from flows.core.errors import DbopsError, MigrationError
from flows.core.localstore import LocalObjectStore
from flows.core.manifest import read_manifest
from flows.tasks.common import failure_sentence
from tests.conftest import make_database_block, make_local_block
from tests.harness.pg import PgCluster

ROOT = Path(__file__).resolve().parents[1]


def _modules() -> list[types.ModuleType]:
    found = []
    for package in (flows, blocks, deployments):
        found.append(package)
        for info in pkgutil.walk_packages(package.__path__, prefix=f"{package.__name__}."):
            found.append(importlib.import_module(info.name))
    return found


def _exception_classes() -> list[type[BaseException]]:
    """Every exception class defined (not merely imported) in a module under flows/, blocks/, deployments/."""
    classes = {
        obj
        for module in _modules()
        for obj in vars(module).values()
        if inspect.isclass(obj) and issubclass(obj, BaseException) and obj.__module__ == module.__name__
    }
    return sorted(classes, key=lambda c: f"{c.__module__}.{c.__qualname__}")


def _dbops_classes() -> list[type[DbopsError]]:
    _modules()  # every subclass is defined once its module is imported
    seen: list[type[DbopsError]] = []
    todo: list[type[DbopsError]] = [DbopsError]
    while todo:
        cls = todo.pop()
        if cls not in seen:
            seen.append(cls)
            todo.extend(cls.__subclasses__())
    return sorted(seen, key=lambda c: f"{c.__module__}.{c.__qualname__}")


def _name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def test_the_walk_finds_the_errors_of_every_layer() -> None:
    names = {_name(c) for c in _exception_classes()}
    # one of each: core (beside its code and in errors.py), tasks, flows
    assert {"flows.core.alembic_errors.LockTimeout", "flows.core.errors.BadWalName"} <= names
    assert {"flows.core.pg_restore.RestoreFailed", "flows.core.errors.StemTaken"} <= names
    assert len(names) >= 60


@pytest.mark.parametrize("cls", _exception_classes(), ids=_name)
def test_every_exception_class_dbops_defines_is_a_dbops_error(cls: type[BaseException]) -> None:
    assert issubclass(cls, DbopsError), f"{_name(cls)} derives from {[b.__name__ for b in cls.__mro__]}"


#: a value for each declared field, by its annotation
_SAMPLES: dict[str, object] = {
    "str": "x1",
    "int": 5432,
    "float": 1.5,
    "bool": True,
}


def _sample(annotation: object) -> object:
    text = str(annotation)
    if text == "list[CopyFault] | None":
        from flows.core.copy_outcome import CopyFault

        return [CopyFault("s3-bucket/eu", "copy", "the bucket does not exist")]
    if "RunResult" in text:
        from flows.core.alembic_runner import RunResult, StepResult

        return RunResult(start=[], target="head", steps=[StepResult("0001", "upgrade", 0.5)])
    for name, value in _SAMPLES.items():
        if text.split(" | ")[0] == name:
            return value
    raise AssertionError(f"no sample value for a field annotated {text}")


def _declared_fields(cls: type[DbopsError]) -> dict[str, Any]:
    """The constructor's fields after the message (annotations are strings: `from __future__`)."""
    values: dict[str, Any] = {}
    for name, param in inspect.signature(cls.__init__).parameters.items():
        skip = name in ("self", "message", "transient")
        if skip or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        values[name] = _sample(param.annotation)
    return values


@pytest.mark.parametrize("cls", _dbops_classes(), ids=_name)
def test_every_dbops_error_takes_its_fields_and_renders_one_line_without_a_password(
    cls: type[DbopsError],
) -> None:
    fields = _declared_fields(cls)
    message = (
        "pg_dump of imagemanager failed: connection to postgresql://app:Hunter2-secret@db:5432/im failed\n"
        "   DETAIL:  host=db password=Hunter2-secret user=app"
    )
    exc = cls(message, **fields)
    for name, value in fields.items():
        assert getattr(exc, name) == value, f"{_name(cls)}.{name} not kept"
    text = str(exc)
    assert "\n" not in text
    assert text.startswith("pg_dump of imagemanager failed: connection to postgresql://")
    assert "Hunter2" not in text
    assert "Hunter2" not in failure_sentence(exc)
    assert isinstance(exc.transient, bool)
    assert exc.transient == cls.transient
    again = pickle.loads(pickle.dumps(exc))  # a failed state may carry it across a process boundary
    assert type(again) is cls
    assert str(again) == text
    assert vars(again) == vars(exc)


def test_migration_errors_carry_their_context_and_progress_as_declared_fields() -> None:
    from flows.core.alembic_runner import LockTimeout, RunResult, StepResult

    result = RunResult(start=["0001"], target="0003", steps=[StepResult("0002", "upgrade", 0.25)])
    exc = LockTimeout("revision 0003 waited", revision="0003", result=result, log_tail="tail", seconds=2.0)
    assert (exc.revision, exc.result, exc.log_tail, exc.seconds) == ("0003", result, "tail", 2.0)
    assert exc.transient
    assert exc.applied_seconds is None
    exc.record_progress({"0002": 0.25}, {"0003": 3})
    assert (exc.applied_seconds, exc.applied_attempts) == ({"0002": 0.25}, {"0003": 3})
    lost = errors.MigrationConnectionLost("cannot reach PostgreSQL", transient=True, revision="0002")
    assert isinstance(lost, MigrationError)
    assert lost.transient
    assert not MigrationError("x").transient


def test_no_source_sets_attributes_on_an_error_after_creating_it() -> None:
    offenders = [
        f"{path.relative_to(ROOT)}:{n}"
        for folder in ("flows", "blocks", "deployments")
        for path in (ROOT / folder).rglob("*.py")
        for n, line in enumerate(path.read_text().splitlines(), start=1)
        if line.lstrip().startswith(("exc.", "err.", "error."))
        and "=" in line.split("(")[0]
        and "==" not in line
    ]
    assert offenders == []


def test_unreadable_manifest_is_named_not_a_json_error(tmp_path: Path) -> None:
    store = LocalObjectStore(tmp_path)
    store.put_bytes("db/x.manifest.json", b"{not json")
    with pytest.raises(errors.ManifestUnreadable) as caught:
        read_manifest(store, "db/x.manifest.json")
    assert caught.value.key == "db/x.manifest.json"
    assert str(caught.value).startswith(f"{store.url}/db/x.manifest.json is not a readable dbops manifest")


def test_local_store_faults_are_storage_errors(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("not a directory")
    with pytest.raises(errors.StorageError, match="is a file, not a directory"):
        LocalObjectStore(tmp_path / "a-file").put_bytes("k", b"x")
    store = LocalObjectStore(tmp_path)
    with pytest.raises(errors.StorageError, match=r"a file in .* stands where a directory must be"):
        store.put_bytes("a-file/below", b"x")
    (tmp_path / "dir").mkdir()
    with pytest.raises(errors.StorageError, match="cannot read"):
        store.get_bytes("dir")


# -- flows end with the sentence ------------------------------------------------------------------------


def _final_exception(state: object) -> BaseException:
    try:
        state.result()  # type: ignore[attr-defined]
    except BaseException as exc:  # the exception the flow ended with
        return exc
    raise AssertionError("expected a failed run")


def _small_database(pg: PgCluster, name: str) -> str:
    pg.create_database(name)
    with pg.connect(name) as conn:
        conn.execute("CREATE TABLE items (id bigint PRIMARY KEY, code text)")
        conn.execute("CREATE INDEX items_code_idx ON items (code)")
        conn.execute("INSERT INTO items SELECT g, md5(g::text) FROM generate_series(1, 2000) g")
        conn.execute("ANALYZE items")
    return name


@pytest.mark.usefixtures("prefect_api")
def test_dump_into_a_prefix_taken_by_a_file_ends_with_a_storage_sentence(
    pg: PgCluster, tmp_path: Path, unique: str
) -> None:
    """Before: `FileExistsError: [Errno 17] File exists: '.../prod'` from the preflight's mkdir."""
    from flows.nightly_dump import nightly_dump

    block = make_database_block(pg, f"err-{unique}", _small_database(pg, f"err_{unique}"))
    storage = make_local_block(f"local-{unique}", tmp_path / "store")
    (tmp_path / "store" / "prod").write_text("someone's notes, not a directory")
    state = nightly_dump(database=block, storage=storage, prefix="prod", return_state=True)
    assert state.is_failed()
    exc = _final_exception(state)
    assert isinstance(exc, errors.StorageError)
    assert not exc.transient
    assert state.message == str(exc)
    assert "stands where a directory must be" in (state.message or "")
    assert not (state.message or "").startswith(("FileExistsError", "NotADirectoryError"))
    assert list((tmp_path / "store").iterdir()) == [tmp_path / "store" / "prod"]  # nothing was written


@pytest.mark.usefixtures("prefect_api")
def test_reindex_with_a_baseline_variable_that_is_not_json_ends_with_a_sentence_naming_it(
    pg: PgCluster, unique: str
) -> None:
    """Before: `JSONDecodeError: Expecting property name enclosed in double quotes`."""
    from prefect.variables import Variable

    from flows.core.index_baseline import state_variable_name
    from flows.weekly_reindex import weekly_reindex

    dbname = _small_database(pg, f"errx_{unique}")
    block = make_database_block(pg, f"errx-{unique}", dbname)
    system_identifier = int(pg.sql("SELECT system_identifier FROM pg_control_system()")[0][0])
    variable = state_variable_name(system_identifier, dbname)
    Variable.set(variable, "{not json", overwrite=True)
    state = weekly_reindex(database=block, dry_run=True, min_index_size=8192, return_state=True)
    assert state.is_failed()
    exc = _final_exception(state)
    assert isinstance(exc, errors.UnreadableDocument)
    assert exc.source == variable
    assert state.message == str(exc)
    assert (state.message or "").startswith(f"Prefect Variable {variable} (index size baselines) is not")
    assert Variable.get(variable) == "{not json"  # left for a person to look at, not overwritten


@pytest.mark.usefixtures("prefect_api")
def test_a_stored_block_that_no_longer_validates_is_named_invalid_not_missing(unique: str) -> None:
    """Before: `RuntimeError: Unable to load 'drift-...' of block type 'block' due to failed validation`."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import BlockDocumentUpdate

    from blocks import PostgresDatabase
    from blocks.storage import load_block

    name = f"drift-{unique}"
    PostgresDatabase(host="db.example", database="im", user="app", password="Hunter2-secret").save(name)
    with get_client(sync_client=True) as client:
        document = client.read_block_document_by_name(name, "postgres-database", include_secrets=False)
        client.update_block_document(
            document.id, BlockDocumentUpdate(data={**document.data, "port": 99999}, merge_existing_data=True)
        )
    with pytest.raises(errors.ConfigurationError) as caught:
        load_block(f"postgres-database/{name}", PostgresDatabase)
    assert str(caught.value).startswith(f"block 'postgres-database/{name}' is not valid (port: ")
    assert "does not exist" not in str(caught.value)
    assert "Hunter2" not in str(caught.value)


def test_a_cut_short_answer_of_the_alembic_driver_is_an_alembic_error(tmp_path: Path) -> None:
    """Before: `JSONDecodeError: Unterminated string` ended the migrate flow."""
    from flows.core.alembic_errors import AlembicError
    from flows.core.alembic_process import read_driver_answer

    answer = tmp_path / "answer.json"
    answer.write_text('{"steps": [{"rev": "0002", "seco')
    with pytest.raises(AlembicError, match="alembic migrate left an unreadable answer"):
        read_driver_answer(answer, "migrate")
    answer.write_text('{"steps": [], "end": ["0002"]}')
    assert read_driver_answer(answer, "migrate") == {"steps": [], "end": ["0002"]}


@pytest.mark.usefixtures("prefect_api")
def test_restore_with_globals_of_a_backup_without_roles_file_ends_with_the_sentence(
    pg: PgCluster, tmp_path: Path, unique: str
) -> None:
    """Before: the run ended with `FileNotFoundError: backup ... has no roles file`."""
    from flows.nightly_dump import nightly_dump
    from flows.restore import restore

    source = _small_database(pg, f"noroles_{unique}")
    block = make_database_block(pg, f"noroles-{unique}", source)
    storage = make_local_block(f"local-{unique}", tmp_path / "store")
    dumped = nightly_dump(database=block, storage=storage, globals=False)
    target_db = f"noroles_copy_{unique}"
    target = make_database_block(pg, f"noroles-copy-{unique}", target_db)
    state = restore(
        storage=storage,
        source_database=source,
        target=target,
        globals=True,
        confirm=target_db,
        return_state=True,
    )
    assert state.is_failed()
    exc = _final_exception(state)
    assert isinstance(exc, errors.RolesFileMissing)
    assert isinstance(exc, errors.ConfigurationError)
    assert state.message == str(exc)
    message = state.message or ""
    assert message.startswith("backup ")
    assert not message.startswith("FileNotFoundError")
    assert "has no roles file; run without globals" in (state.message or "")
    assert (state.message or "").split()[1] in dumped.key  # names the backup it chose
    assert not pg.sql("SELECT 1 FROM pg_database WHERE datname = %s", params=(target_db,))  # nothing created
