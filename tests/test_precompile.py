"""Kernels compiled ahead (`fast.precompile`, `fast.ahead`, `fast.compile_worker`): the model's first launch waits
for that work, the work never waits for itself, a failed piece costs nothing, the workers start once with the
model's config, and the probes launch every kernel the fast path uses, at the model's widths. On a GPU: a new
process on an empty Triton cache builds every kernel in the workers, none itself."""

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


class _Worker:
    """Stands in for a compile worker's process."""

    started: list[list[str]] = []

    def __init__(self, command, **_kwargs):
        self.command = command
        _Worker.started.append(command)
        self.waited = False

    def wait(self, timeout=None):
        time.sleep(0.05)
        self.waited = True


@pytest.fixture
def workers(monkeypatch, clean, tmp_path):
    monkeypatch.setattr(precompile, "_started", [])
    monkeypatch.setattr(precompile.subprocess, "Popen", _Worker)
    monkeypatch.setattr(precompile.os, "cpu_count", lambda: 16)
    monkeypatch.delenv("KOSMOS2_PRECOMPILE", raising=False)
    _Worker.started = []
    (tmp_path / "config.json").write_text("{}")
    return tmp_path


def test_the_workers_start_once_with_the_models_config(workers):
    assert precompile.start(workers, torch.device("cuda", 1), torch.bfloat16)
    assert not precompile.start(workers, "cuda", "auto")  # once a process
    assert len(_Worker.started) == precompile.WORKERS
    for part, command in enumerate(_Worker.started):
        assert command[1:] == ["-m", "kosmos2_cli.fast.compile_worker", str(workers / "config.json"), "cuda:1",
                               "bfloat16", str(part), str(precompile.WORKERS)]
    assert ahead.pending() == precompile.WORKERS
    ahead.ready()  # waits for every worker
    assert ahead.pending() == 0


def test_no_workers_without_a_config_or_when_turned_off(workers, monkeypatch, tmp_path):
    assert not precompile.start(tmp_path / "elsewhere")
    monkeypatch.setenv("KOSMOS2_PRECOMPILE", "0")
    assert not precompile.start(workers)
    assert _Worker.started == []


def test_the_command_line_starts_them_once_the_gpu_driver_is_up(monkeypatch):
    """`then` runs on the driver's thread after the context is there; without a driver it never runs."""
    called = []
    monkeypatch.setattr(early, "_begun", {})
    monkeypatch.setattr(early, "_DRIVERS", ("libno-such-driver.so.1",))
    early.start_cuda("auto", lambda: called.append(True))
    early._begun["cuda"].join(timeout=10)
    assert called == []


def test_a_worker_compiles_without_launching(monkeypatch):
    """`_CompileOnly`: `kernel[grid](...)` becomes Triton's `warmup` with the same arguments, then the launcher."""
    from kosmos2_cli.fast import compile_worker

    calls = []

    class Kernel:
        def warmup(self, *args, grid, **kwargs):
            calls.append(("warmup", args, grid, kwargs))
            return types.SimpleNamespace(src="src", metadata="metadata")

    driver = types.SimpleNamespace(active=types.SimpleNamespace(
        launcher_cls=lambda src, metadata: calls.append(("launcher", src, metadata))))
    monkeypatch.setitem(sys.modules, "triton", types.SimpleNamespace(runtime=types.SimpleNamespace(driver=driver)))
    monkeypatch.setitem(sys.modules, "triton.runtime", types.SimpleNamespace(driver=driver))
    compile_worker._CompileOnly(Kernel())[(4, 2)](1, "x", BLOCK=64, num_warps=4)
    assert calls == [("warmup", (1, "x"), (4, 2), {"BLOCK": 64, "num_warps": 4}), ("launcher", "src", "metadata")]


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
def test_a_new_process_builds_no_kernel_itself(tmp_path, images):
    """A new process on an empty Triton cache: every kernel that was not in the disk cache was built by a compile
    worker (the start-up marks name the process of each build), for a single image (the one-row kernels) and a
    batch; the answers are the same as with the workers off."""
    import cli_helpers
    import oracle

    folder = tmp_path / "model"  # head widths that are powers of two, as the decode kernel needs
    oracle.save_reference_checkpoint(folder, oracle.tiny_config(
        text={"embed_dim": 64, "ffn_dim": 128}, vision={"hidden_size": 64, "intermediate_size": 128},
        latent_query_num=64))
    photos = [cli_helpers.save(cli_helpers.photo(seed=n), tmp_path / "in" / f"{n}.png") for n in range(images)]
    marks = tmp_path / "marks.jsonl"
    env = {**os.environ, "KOSMOS2_MARKS": str(marks), "TRITON_CACHE_DIR": str(tmp_path / "triton"),
           "PYTHONPATH": str(cli_helpers.SRC)}

    def run(output: str, **extra: str) -> tuple[subprocess.CompletedProcess, str]:
        command = ([sys.executable, "-m", "kosmos2_cli", "caption", str(photos[0])] if images == 1 else
                   [sys.executable, "-m", "kosmos2_cli", "batch", str(tmp_path / "in"), "-o", str(tmp_path / output)])
        done = subprocess.run([*command, "--model", str(folder), "--device", "cuda", *cli_helpers.FAST, "--json"],
                              env={**env, **extra}, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        records = done.stdout if images == 1 else sorted((tmp_path / output).read_text().splitlines())
        return done, records

    _, records = run("on.jsonl")
    lines = [json.loads(line) for line in marks.read_text().splitlines()]
    built = [line for line in lines if line["phase"].startswith("triton built: ")]
    assert len({line["thread"] for line in built}) > 1, "the kernels were not built by several workers"
    assert [line for line in built if not line["thread"].startswith("kosmos2-compile-")] == []
    workers = [line["detail"] for line in lines if line["phase"] == "compile worker done"]
    assert workers and all(worker["context"] is False for worker in workers)  # no GPU memory taken
    used = {line["phase"].split(": ")[1] for line in lines if line["phase"].startswith("triton: ")
            and not line["thread"].startswith("kosmos2-compile-")}
    assert used >= {"_layer_norm_kernel", "_decode_attention_append_kernel"}  # the model took them from the cache
    assert run("off.jsonl", KOSMOS2_PRECOMPILE="0", KOSMOS2_MARKS="")[1] == records


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
