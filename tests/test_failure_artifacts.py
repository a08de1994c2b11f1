"""A failed run says why where people look: the flow's artifact (latest version) starts with the one
sentence, and the run's final state message is that same sentence, without Prefect's prefix."""

from __future__ import annotations

import pytest

from flows.nightly_dump import nightly_dump
from flows.restore import list_backups, restore
from flows.tasks.common import artifact_key, failure_sentence
from tests.conftest import make_s3_block
from tests.harness.factories import sample_database
from tests.harness.pg import PgCluster, free_port
from tests.harness.runs import artifact, artifact_table, failure_message
from tests.harness.s3 import S3Endpoint


def latest_artifact(key: str) -> str:
    data = artifact(key).data
    assert isinstance(data, str)
    return data


def test_unexpected_error_is_type_and_first_line_without_the_password() -> None:
    exc = RuntimeError("could not connect: host=db password=hunter2 user=app\n  at line 2 PGPASSWORD=x")
    assert failure_sentence(exc) == "RuntimeError: could not connect: host=db password=******** user=app"
    assert failure_sentence(KeyError()) == "KeyError"


@pytest.mark.usefixtures("prefect_api")
def test_wrong_password_dump_publishes_the_sentence_first_and_ends_with_it(
    pg: PgCluster, s3: S3Endpoint, bucket: str, unique: str
) -> None:
    from blocks import PostgresDatabase

    name = sample_database(pg, f"im_{unique}", rows=10)
    secret = "not-the-password-" + unique
    PostgresDatabase(host=pg.host, port=pg.port, database=name, user="postgres", password=secret).save(
        f"bad-{unique}"
    )
    storage = make_s3_block(s3, f"s3-{unique}", bucket, folder="dbops")
    state = nightly_dump(database=f"bad-{unique}", storage=storage, return_state=True)
    assert state.is_failed()
    sentence = failure_message(state)  # the exception a direct call raises is still the dbops error
    assert "rejected the password" in sentence
    assert state.message == sentence  # no "Flow run encountered an exception: AuthenticationFailed:"
    markdown = latest_artifact(artifact_key("nightly-dump", name))  # the success artifact's key
    assert markdown.splitlines()[0] == f"**Failed**: {sentence}"
    assert secret not in markdown
    assert secret not in (state.message or "")


@pytest.mark.usefixtures("prefect_api")
def test_refused_restore_and_listing_publish_their_refusal(unique: str, s3: S3Endpoint, bucket: str) -> None:
    from blocks import PostgresDatabase

    target_db = f"prod_{unique}"
    PostgresDatabase(
        host="127.0.0.1", port=free_port(), database=target_db, user="u", password="p", protected=True
    ).save(f"prot-{unique}")
    storage = make_s3_block(s3, f"s3-{unique}", bucket, folder="dbops")
    state = restore(
        storage=storage, source_database=target_db, target=f"prot-{unique}", mode="replace", return_state=True
    )
    assert state.is_failed()
    assert "is protected" in (state.message or "")
    assert state.message == failure_message(state)
    markdown = latest_artifact(artifact_key("restore", target_db))
    assert markdown.splitlines()[0] == f"**Failed**: {state.message}"

    listed = list_backups(storage=storage, database=f"db_{unique}", prefix="../x", return_state=True)
    assert listed.is_failed()
    assert listed.message == failure_message(listed)
    assert latest_artifact(artifact_key("backups", f"db_{unique}")).startswith(
        f"**Failed**: {listed.message}"
    )


@pytest.mark.usefixtures("prefect_api")
def test_judged_failure_keeps_its_table_and_ends_with_the_sentence(
    unique: str, s3: S3Endpoint, bucket: str
) -> None:

    from flows.restore_drill import restore_drill

    storage = make_s3_block(s3, f"s3-{unique}", bucket, folder="dbops")
    state = restore_drill(
        storage=storage, source_database=f"none_{unique}", scratch="unused", return_state=True
    )
    assert state.is_failed()
    assert state.message == failure_message(state)
    assert not state.message.startswith("Flow run encountered")
    table = artifact_table(artifact_key("restore-drill", f"none_{unique}"))
    assert {row["item"]: row["value"] for row in table}["result"] == "FAILED"
    # the latest version of the table says why on top: the Artifacts list shows it without opening rows
    latest = artifact(artifact_key("restore-drill", f"none_{unique}"))
    assert latest.description is not None
    assert latest.description.startswith(f"**Failed**: {state.message}")
