"""Make the README's picture: `kosmos2 ground` on examples/images/scene.png, drawn into docs/ground-scene.png.

The released weights cannot be fetched where this project is built, so the picture comes from a tiny
checkpoint that the reference (transformers, the test extra) trains here, with the tests' machinery
(tests/trained.py), to place the scene's things where examples/make_images.py drew them, and to place no dog.
Its answers are ours, not the released model's; the drawing, the table and the JSON are kosmos2's own.

    python docs/make_assets.py            # trains (a minute or two on CPU), then runs kosmos2
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "examples"), str(ROOT / "src")]

SCENE = ROOT / "examples" / "images" / "scene.png"
PICTURE = ROOT / "docs" / "ground-scene.png"
PHRASES = ["a red car", "the sun", "a tree", "a house", "a dog"]


def lessons():
    import trained
    from make_images import OBJECTS
    from PIL import Image

    from kosmos2_cli.api.prompts import box_to_cells, normalize_box

    with Image.open(SCENE) as image:
        width, height = image.size
    taught = []
    for phrase in PHRASES:
        box = OBJECTS["scene.png"].get(phrase)
        if box is None:
            target = ""  # not in the picture: end of text at once
        else:
            first, last = box_to_cells(normalize_box(box, width, height))
            target = f"<object><patch_index_{first:04d}><patch_index_{last:04d}></object>"
        taught.append(trained.Lesson(str(SCENE), "ground", trained.ground_prompt(phrase), target, phrase=phrase))
    return tuple(taught)


def train(folder: Path) -> Path:
    """The tests' trainer, pointed at these lessons instead of the tests' own."""
    import trained

    taught = lessons()
    trained.LESSONS = taught
    trained.check.__defaults__ = (taught, *trained.check.__defaults__[1:])
    return trained.train_checkpoint(folder, log=lambda line: print(line, flush=True))


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="kosmos2-docs-") as temp:
        model = train(Path(temp) / "model")
        args = ["ground", str(SCENE.relative_to(ROOT))]
        for phrase in PHRASES:
            args += ["-p", phrase]
        command = [sys.executable, "-m", "kosmos2_cli", *args, "--model", str(model), "--draw",
                   str(PICTURE.relative_to(ROOT))]
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "COLUMNS": "80"}
        shown = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, check=True)
        print(shown.stdout + shown.stderr)


if __name__ == "__main__":
    main()
