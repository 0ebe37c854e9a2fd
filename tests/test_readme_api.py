"""The README's Python API examples run as written, on a tiny checkpoint in place of the released weights."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from oracle import IMAGES, save_reference_checkpoint, tiny_config

README = Path(__file__).resolve().parents[1] / "README.md"


def api_examples() -> list[str]:
    """The Python blocks of the "Python API" section, except the pipeline's (its default is the hub model)."""
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Python API"): text.index("### For scripts")]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_python_api_examples_run(tmp_path, shared_fixtures):
    folder = tmp_path / "model"
    # 64 latent queries: the processor's default number of image tokens, as in the released model.
    save_reference_checkpoint(folder, tiny_config(latent_query_num=64), text_scale=5, vision_scale=5,
                              projection_scale=5)
    blocks = api_examples()
    assert len(blocks) >= 5
    namespace: dict = {}
    for block in blocks:
        code = (block.replace('"microsoft/kosmos-2-patch14-224"', repr(str(folder)))
                .replace('"snowman.png"', repr(str(IMAGES / "snowman.png")))
                .replace('"out/"', repr(str(tmp_path / "out"))))
        exec(compile(code, str(README), "exec"), namespace)  # noqa: S102 - our own README
    out = namespace["out"]
    assert out.loss is not None and torch.isfinite(out.loss)
    assert namespace["inputs"]["input_ids"].shape[1] > 0
    assert (tmp_path / "out" / "model.safetensors").is_file()
