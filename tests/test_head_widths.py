"""The fast path takes the Triton decode kernel only where attention heads are a power of two wide (its block
needs one): other checkpoints decode with PyTorch's attention instead of failing to compile."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from kosmos2_cli.fast.fuse import power_of_two


def test_power_of_two():
    assert [n for n in range(1, 70) if power_of_two(n)] == [1, 2, 4, 8, 16, 32, 64]
    assert not power_of_two(0) and not power_of_two(12)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fast path's kernels run on CUDA only")
def test_heads_of_other_widths_decode_without_the_kernel(tmp_path):
    """Attention heads 12 wide (not a power of two, which the decode kernel's block needs): the fast path decodes
    with PyTorch's attention instead of failing to compile."""
    import cli_helpers

    photo = cli_helpers.save(cli_helpers.photo(), tmp_path / "p.png")
    done = subprocess.run([sys.executable, "-m", "kosmos2_cli", "caption", str(photo), "--model",
                           str(cli_helpers.random_checkpoint()), "--device", "cuda", *cli_helpers.FAST, "--json"],
                          env={**os.environ, "PYTHONPATH": str(cli_helpers.SRC)}, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[0])["task"] == "caption"
