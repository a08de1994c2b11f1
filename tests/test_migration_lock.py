"""The migration lock: a second migration of the same database fails at once and names the first."""

from __future__ import annotations

import time
from dataclasses import replace

import pytest

from flows.core.errors import is_transient
from flows.core.migration_lock import MigrationLockHeld, lock_key, migration_lock
from flows.core.postgres import ConnParams
from tests.harness.factories import conn_params
from tests.harness.pg import PgCluster


@pytest.fixture
def params(pg: PgCluster, unique: str) -> ConnParams:
    name = f"lock_{unique}"
    pg.create_database(name)
    return conn_params(pg, name)


def test_lock_key_is_stable_and_per_database() -> None:
    assert lock_key("imagemanager") == lock_key("imagemanager")
    assert lock_key("imagemanager") != lock_key("imagemanager2")
    assert -(2**63) <= lock_key("imagemanager") < 2**63
    # sha256-derived, not Python's per-process salted hash(): the value never changes between runs
    assert lock_key("imagemanager") == int.from_bytes(
        __import__("hashlib").sha256(b"dbops-migrate:imagemanager").digest()[:8], "big", signed=True
    )


def test_second_acquirer_fails_fast_naming_the_holder(params: ConnParams) -> None:
    first = replace(params, application_name="dbops-migrate-first")
    second = replace(params, application_name="dbops-migrate-second")
    with migration_lock(first) as lock:
        assert lock.still_held()
        t0 = time.monotonic()
        with pytest.raises(MigrationLockHeld) as caught, migration_lock(second):
            pytest.fail("two migrations held the lock at once")
        assert time.monotonic() - t0 < 5
        assert caught.value.pid == lock.pid
        assert caught.value.application_name == "dbops-migrate-first"
        message = str(caught.value)
        assert f"pid {lock.pid}" in message
        assert "dbops-migrate-first" in message
        assert params.database in message
        assert params.password
        assert params.password not in message
        assert not is_transient(caught.value)
    with migration_lock(second) as again:  # released on exit
        assert again.still_held()


def test_lock_is_per_database(params: ConnParams, pg: PgCluster, unique: str) -> None:
    other = f"lock_other_{unique}"
    pg.create_database(other)
    with migration_lock(params), migration_lock(params.with_database(other)) as lock:
        assert lock.still_held()


def test_lock_dies_with_its_session(params: ConnParams, pg: PgCluster) -> None:
    with migration_lock(params) as lock:
        pg.sql("SELECT pg_terminate_backend(%s)", params=[lock.pid])
        assert not lock.still_held()
        with migration_lock(params) as successor:
            assert successor.pid != lock.pid
