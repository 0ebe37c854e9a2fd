from __future__ import annotations

import signal
from pathlib import Path

import pytest
from oracle import FIXTURES, SHARED

# A shell's background job starts with SIGINT ignored, and so would every process the Ctrl-C tests start: give them
# Python's own handler back so those tests test the code, not how pytest was launched.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


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
