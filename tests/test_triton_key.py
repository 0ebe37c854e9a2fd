"""triton_key: Triton's compiler fingerprint is computed once per install and read back by later processes.

A stand-in `triton` package (its runtime/cache.py counts how often the fingerprint is computed) keeps this test
independent of a real Triton, which CI's CPU machines do not have.
"""

from __future__ import annotations

import importlib
import os
import sys

import pytest

from kosmos2_cli.fast import triton_key

FAKE_CACHE = '''
CALLS = []

def triton_key():
    CALLS.append(1)
    return "fingerprint-" + open(__file__.replace("runtime/cache.py", "_C/libtriton.so")).read()
'''


@pytest.fixture
def fake_triton(tmp_path, monkeypatch):
    root = tmp_path / "site" / "triton"
    for folder in ("runtime", "compiler", "backends", "language", "_C"):
        (root / folder).mkdir(parents=True)
        (root / folder / "__init__.py").write_text("")
    (root / "__init__.py").write_text('__version__ = "9.9.9"\n')
    (root / "runtime" / "cache.py").write_text(FAKE_CACHE)
    (root / "_C" / "libtriton.so").write_text("v1")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("KOSMOS2_TRITON_KEY", raising=False)
    for name in [n for n in sys.modules if n == "triton" or n.startswith("triton.")]:
        monkeypatch.delitem(sys.modules, name)
    yield root
    for name in [n for n in sys.modules if n == "triton" or n.startswith("triton.")]:
        del sys.modules[name]


def new_process():
    """The fake Triton as a new process sees it: modules imported afresh, nothing remembered in memory."""
    for name in [n for n in sys.modules if n == "triton" or n.startswith("triton.")]:
        del sys.modules[name]
    return importlib.import_module("triton.runtime.cache")


def test_computed_once_then_read_back(fake_triton, tmp_path):
    cache = new_process()
    assert triton_key.remember()
    assert cache.triton_key() == "fingerprint-v1"
    assert cache.triton_key() == "fingerprint-v1"
    assert len(cache.CALLS) == 1
    stored = list((tmp_path / "cache").glob("kosmos2-triton-key-*.txt"))
    assert len(stored) == 1 and stored[0].read_text() == "fingerprint-v1"

    cache = new_process()
    assert triton_key.remember()
    assert cache.triton_key() == "fingerprint-v1"
    assert cache.CALLS == []  # read from the file: Triton's own fingerprint was not computed


def test_a_changed_triton_file_computes_it_again(fake_triton, tmp_path):
    cache = new_process()
    triton_key.remember()
    cache.triton_key()
    library = fake_triton / "_C" / "libtriton.so"
    library.write_text("v2")
    os.utime(library, ns=(library.stat().st_atime_ns, library.stat().st_mtime_ns + 10**9))

    cache = new_process()
    triton_key.remember()
    assert cache.triton_key() == "fingerprint-v2"
    assert len(cache.CALLS) == 1
    assert len(list((tmp_path / "cache").glob("kosmos2-triton-key-*.txt"))) == 2


def test_switched_off(fake_triton, monkeypatch):
    monkeypatch.setenv("KOSMOS2_TRITON_KEY", "0")
    cache = new_process()
    assert not triton_key.remember()
    cache.triton_key()
    cache.triton_key()
    assert len(cache.CALLS) == 2  # untouched: the stand-in has no lru_cache, so each call computes


def test_unwritable_cache_folder_still_gives_the_fingerprint(fake_triton, tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("TRITON_CACHE_DIR", str(blocker / "cache"))
    cache = new_process()
    triton_key.remember()
    assert cache.triton_key() == "fingerprint-v1"
