"""Expanding INPUTS: files, folders (recursive), globs; extensions case-insensitive; no duplicates."""

from __future__ import annotations

import os

import pytest
from cli_helpers import not_an_image, photo, save

from kosmos2_cli.runtime.inputs import InputError, expand_inputs


@pytest.fixture
def tree(tmp_path):
    for name in ["b.jpg", "a.PNG", "c.Jpeg", "sub/d.webp", "sub/deeper/e.tif", ".hidden/f.png", "sub/.g.png"]:
        save(photo(), tmp_path / name)
    not_an_image(tmp_path / "notes.txt")
    not_an_image(tmp_path / "sub" / "readme.md")
    return tmp_path


def test_folder_is_searched_recursively_in_order(tree):
    names = expand_inputs([str(tree)])
    rel = [os.path.relpath(n, tree) for n in names]
    assert rel == ["a.PNG", "b.jpg", "c.Jpeg", "sub/d.webp", "sub/deeper/e.tif"]


def test_paths_keep_the_users_spelling(tree, monkeypatch):
    monkeypatch.chdir(tree)
    assert expand_inputs(["sub"]) == ["sub/d.webp", "sub/deeper/e.tif"]
    assert expand_inputs(["./sub/"]) == ["sub/d.webp", "sub/deeper/e.tif"]


def test_globs_and_case(tree, monkeypatch):
    monkeypatch.chdir(tree)
    assert expand_inputs(["*.png"]) == ["a.PNG"]  # a glob's extension matches in any case
    assert expand_inputs(["*.JPEG", "*.JPG"]) == ["c.Jpeg", "b.jpg"]
    assert expand_inputs(["*.*"]) == ["a.PNG", "b.jpg", "c.Jpeg"]  # notes.txt: not an image extension
    assert expand_inputs(["**/*.tif"]) == ["sub/deeper/e.tif"]


def test_explicit_files_are_taken_whatever_their_extension(tree, monkeypatch):
    monkeypatch.chdir(tree)
    assert expand_inputs(["notes.txt", "b.jpg"]) == ["notes.txt", "b.jpg"]


def test_each_image_once(tree, monkeypatch):
    monkeypatch.chdir(tree)
    assert expand_inputs(["b.jpg", ".", "./b.jpg", "sub/d.webp"]) == [
        "b.jpg", "a.PNG", "c.Jpeg", "sub/d.webp", "sub/deeper/e.tif"]


def test_symlink_loops_end(tree):
    os.symlink(tree / "sub", tree / "sub" / "deeper" / "loop")
    assert len(expand_inputs([str(tree / "sub")])) == 2


@pytest.mark.parametrize("given, message", [
    ("missing.jpg", "missing.jpg: no such file or directory"),
    ("empty", "empty: no images in this folder"),
    ("*.gif", "*.gif: no images in this glob"),
])
def test_inputs_that_name_nothing(tree, monkeypatch, given, message):
    monkeypatch.chdir(tree)
    (tree / "empty").mkdir()
    with pytest.raises(InputError, match="^" + message.replace("*", r"\*").replace(".", r"\.")):
        expand_inputs(["b.jpg", given])
