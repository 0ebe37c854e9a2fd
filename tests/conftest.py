from __future__ import annotations

import pytest
from oracle import FIXTURES, SHARED


def pytest_configure(config):
    config.addinivalue_line("markers", "needs_shared: needs ../shared/fixtures beside the project")


@pytest.fixture(scope="session")
def shared_fixtures():
    """../shared/fixtures, or a skip that says why."""
    if not FIXTURES.is_dir():
        pytest.skip(f"{SHARED} is absent: the released tokenizer and demo images live there")
    return FIXTURES
