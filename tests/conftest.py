from __future__ import annotations

from pathlib import Path

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


@pytest.fixture(scope="session")
def trained_dir(shared_fixtures):
    """The tiny Kosmos-2 checkpoint that the reference trained to answer `trained.LESSONS` exactly (hub layout);
    trained on first use (a few minutes on CPU), then cached under the system temp dir. KOSMOS2_TRAINED_DIR names
    a ready one instead (e.g. carried to a GPU machine whose transformers would train it differently)."""
    import os

    if os.environ.get("KOSMOS2_TRAINED_DIR"):
        return Path(os.environ["KOSMOS2_TRAINED_DIR"])
    from trained import trained_checkpoint_dir

    return trained_checkpoint_dir()
