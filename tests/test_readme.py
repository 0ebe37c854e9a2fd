"""Every `kosmos2` command line of the README runs as written (on the random tiny checkpoint, in a folder that
holds the files the README names)."""

from __future__ import annotations

import re
import shlex

import pytest
from cli_helpers import (
    ROOT,
    invoke,
    photo,
    quick,  # noqa: F401  (fixture)
    random_checkpoint,
    save,
)

pytestmark = pytest.mark.usefixtures("quick")
TASKS = {"caption", "ground", "refer", "ask", "batch"}


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    lines = []
    for block in blocks:
        joined = block.replace("\\\n", " ")
        for line in joined.splitlines():
            line = line.split(" #")[0].strip()
            if line.startswith("kosmos2 "):
                lines.append(line)
    return lines


def test_the_readme_has_commands():
    commands = readme_commands()
    assert len(commands) >= 10
    assert {shlex.split(c)[1] for c in commands} >= TASKS | {"info", "download"}


@pytest.mark.parametrize("line", [c for c in readme_commands() if shlex.split(c)[1] in TASKS | {"info"}])
def test_readme_command_runs(line, tmp_path, monkeypatch, shared_fixtures):
    model = random_checkpoint()
    monkeypatch.chdir(tmp_path)
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    save(photo(120, 90, seed=1), tmp_path / "snowman.png")
    save(photo(80, 60, seed=2), tmp_path / "photos" / "a.jpg")
    save(photo(60, 80, seed=3), tmp_path / "photos" / "b.png")
    save(photo(64, 64, seed=4), tmp_path / "more" / "c.jpg")
    (tmp_path / "classes.txt").write_text("a snowman\na fire\n")  # batch --phrases-file
    args = shlex.split(line)[1:]
    if args[0] != "info":
        args += ["--max-new-tokens", "4"]
    result = invoke([*args, "--model", model])
    assert result.exit_code == 0, (line, result.stderr)
