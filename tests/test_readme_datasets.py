"""The README's "Auto-labelling and evaluation" example runs as written, in order, on the trained checkpoint:
a folder to labels, to COCO, YOLO and Label Studio files, then to an accuracy table."""

from __future__ import annotations

import json
import re
import shlex
import shutil

import pytest
from cli_helpers import ROOT, invoke, quick  # noqa: F401  (fixture)

trained = pytest.importorskip("trained")
pytestmark = pytest.mark.usefixtures("quick")


def section_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Auto-labelling and evaluation", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.S)[:2]  # the folder example and eval
    return [line.strip() for block in blocks for line in block.splitlines() if line.startswith("kosmos2 ")]


def test_the_readme_example_runs_from_a_folder_to_coco_and_an_accuracy_table(trained_dir, tmp_path, monkeypatch):
    commands = section_commands()
    assert [shlex.split(c)[1] for c in commands] == ["batch", "export", "export", "export", "eval", "eval"]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "photos").mkdir()
    for name in ("snowman.png", "man_ball.png"):
        shutil.copy(trained.IMAGES / name, tmp_path / "photos" / name)
    (tmp_path / "classes.txt").write_text("a snowman\na fire\na glove\n")
    x1, y1, x2, y2 = (v * 1024 for v in trained.cell_box(44, 863))
    (tmp_path / "my_boxes.jsonl").write_text(
        json.dumps({"image": "snowman.png", "phrase": "a snowman", "boxes": [[x1, y1, x2, y2]]}) + "\n"
        + json.dumps({"image": "man_ball.png", "phrase": "a snowman", "boxes": [[0, 0, 50, 50]]}) + "\n")
    outputs = []
    for line in commands:
        args = shlex.split(line)[1:]
        if args[0] in ("batch", "eval"):
            args += ["--model", trained_dir, "--max-new-tokens", str(trained.MAX_NEW_TOKENS)]
        result = invoke(args)
        assert result.exit_code == 0, (line, result.stderr)
        outputs.append(result.stdout)
    assert json.loads((tmp_path / "dataset.json").read_text())["annotations"]
    assert (tmp_path / "yolo" / "data.yaml").is_file() and (tmp_path / "yolo" / "images" / "snowman.png").is_file()
    assert json.loads((tmp_path / "tasks.json").read_text())[0]["predictions"][0]["result"]
    assert "grounding accuracy" in outputs[4] and "50.0%" in outputs[4]
    report = json.loads(outputs[5])
    assert (report["n"], report["found"], report["correct"]) == (2, 1, 1)
