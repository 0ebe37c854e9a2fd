"""Kernels compiled ahead (`fast.precompile`, `fast.ahead`): the model's first launch waits for that work, the
work itself never waits for itself, a failed probe costs nothing, and the probes launch every kernel the fast
path uses, at the model's widths. On a GPU: after a load, a run compiles nothing on its own threads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import types

import pytest
import torch

from kosmos2_cli.fast import ahead, early, precompile
from kosmos2_cli.model.config import Kosmos2Config


@pytest.fixture
def clean(monkeypatch):
    monkeypatch.setattr(ahead, "_begun", [])


def test_ready_waits_for_the_work_begun_ahead(clean):
    release, finished, threads = threading.Event(), [], []

    def work(n):
        threads.append(threading.current_thread().name)
        release.wait(10)
        time.sleep(0.05)
        finished.append(n)

    ahead.begin([lambda n=n: work(n) for n in range(3)])
    assert ahead.pending() == 3
    threading.Timer(0.1, release.set).start()
    ahead.ready()
    assert sorted(finished) == [0, 1, 2] and ahead.pending() == 0
    assert all(name.startswith("kosmos2-ahead") for name in threads) and len(set(threads)) == 3


def test_the_work_does_not_wait_for_itself_and_a_failure_is_dropped(clean):
    done = []

    def uses_a_kernel():  # a probe's launch passes through the same `ready` as the model's
        ahead.ready()
        done.append(True)

    def fails():
        raise RuntimeError("no compiler here")

    ahead.begin([uses_a_kernel, fails])
    ahead.ready()  # neither hangs nor raises
    assert done == [True]
    ahead.ready()  # afterwards: nothing to wait for


def test_precompile_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("KOSMOS2_PRECOMPILE", "0")
    assert not precompile.enabled()
    monkeypatch.setenv("KOSMOS2_PRECOMPILE", "1")
    assert precompile.enabled()


def test_the_probes_launch_every_kernel_at_the_models_widths(monkeypatch):
    """With a recording stand-in for the kernels module: every public kernel is launched, with the widths, dtype
    and layouts the config gives (what selects the compiled specialisation)."""
    seen: list[tuple] = []

    def record(name):
        def launch(*args, **kwargs):
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            seen.append((name, tuple(tuple(t.shape) for t in tensors), tuple(t.stride() for t in tensors),
                         {t.dtype for t in tensors if t.is_floating_point()}, kwargs.get("l2_normalize"),
                         kwargs.get("block"), kwargs.get("activation"), "residual" in kwargs))
        return launch

    names = ["layer_norm", "add_layer_norm", "gelu_layer_norm", "quick_gelu", "argmax_log_softmax",
             "decode_attention_append", "linear_row"]
    fake = types.SimpleNamespace(**{name: record(name) for name in names})
    monkeypatch.setitem(sys.modules, "kosmos2_cli.fast.kernels", fake)
    monkeypatch.setattr(sys.modules["kosmos2_cli.fast"], "kernels", fake, raising=False)
    config = Kosmos2Config.from_dict({"text_config": {"embed_dim": 64, "ffn_dim": 128, "attention_heads": 4,
                                                      "vocab_size": 1000},
                                      "vision_config": {"hidden_size": 32, "intermediate_size": 48}})
    for call in precompile.probes(config, torch.device("cpu"), torch.bfloat16):
        call()
    assert {s[0] for s in seen} == set(names)
    assert all(s[3] == {torch.bfloat16} for s in seen)
    widths = {(s[0], s[1][0][-1], s[4]) for s in seen if s[0] in ("layer_norm", "add_layer_norm", "gelu_layer_norm",
                                                                   "quick_gelu")}
    assert widths == {("layer_norm", 32, None), ("layer_norm", 32, True), ("add_layer_norm", 32, None),
                      ("quick_gelu", 48, None), ("layer_norm", 64, None), ("add_layer_norm", 64, None),
                      ("gelu_layer_norm", 128, None)}
    logits = next(s for s in seen if s[0] == "argmax_log_softmax")
    assert logits[1] == ((2, 1000),) and logits[2] == ((1024, 1),)  # the head's rows padded to 64
    attention = [s for s in seen if s[0] == "decode_attention_append"]
    assert {s[5] for s in attention} == {64, 128}  # both of the kernel's block sizes (many rows, few)
    q = attention[0]
    assert q[1][0] == (2, 4, 1, 16) and q[2][0][:2] == (192, 16)  # a view of the fused q/k/v projection
    assert q[1][5] == (2, 1) and q[2][5] == (1, 1)  # each row's slot
    products = sorted((s[1][1], s[6], s[7]) for s in seen if s[0] == "linear_row")
    assert products == sorted([((192, 64), None, False), ((64, 64), None, True), ((128, 64), "gelu", False),
                               ((64, 128), None, True), ((1000, 64), None, False)])


def test_a_load_on_the_cpu_compiles_nothing_ahead(monkeypatch, tmp_path):
    from oracle import save_reference_checkpoint, tiny_config

    from kosmos2_cli import Kosmos2ForConditionalGeneration

    started = []
    monkeypatch.setattr(precompile, "start", lambda *args: started.append(args))
    save_reference_checkpoint(tmp_path, tiny_config())
    Kosmos2ForConditionalGeneration.from_pretrained(tmp_path, device="cpu")
    assert started == [] and early._begun.get("kernels") is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton kernels compile for CUDA only")
@pytest.mark.parametrize("images", [1, 3])
def test_after_a_load_the_model_compiles_no_kernel_itself(tmp_path, images):
    """A new process on an empty Triton cache: every kernel the run compiles is compiled on a thread begun ahead
    (the start-up marks name the thread of each compile), for a single image (the one-row kernels) and a batch."""
    import cli_helpers

    folder = cli_helpers.random_checkpoint()
    photos = [cli_helpers.save(cli_helpers.photo(seed=n), tmp_path / "in" / f"{n}.png") for n in range(images)]
    marks = tmp_path / "marks.jsonl"
    env = {**os.environ, "KOSMOS2_MARKS": str(marks), "TRITON_CACHE_DIR": str(tmp_path / "triton"),
           "PYTHONPATH": str(cli_helpers.SRC)}
    command = ([sys.executable, "-m", "kosmos2_cli", "caption", str(photos[0])] if images == 1 else
               [sys.executable, "-m", "kosmos2_cli", "batch", str(tmp_path / "in"), "-o", str(tmp_path / "o.jsonl")])
    done = subprocess.run([*command, "--model", str(folder), "--device", "cuda", *cli_helpers.FAST, "--json"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    compiles = [json.loads(line) for line in marks.read_text().splitlines() if '"triton: ' in line]
    assert compiles, "no kernel compiled at all"
    own = [(c["phase"], c["thread"], c["detail"][1]) for c in compiles if not c["thread"].startswith("kosmos2-ahead")]
    assert own == []
