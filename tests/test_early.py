"""Start-up work begun early (`kosmos2_cli.fast.early`): which devices start it, and that it never gets in the way."""

from __future__ import annotations

import pytest
import torch

from kosmos2_cli.fast import early


@pytest.mark.parametrize(("device", "index"), [("auto", 0), (None, 0), ("cuda", 0), ("CUDA:1", 1),
                                               (torch.device("cuda", 2), 2), ("cpu", None), ("mps", None),
                                               (torch.device("cpu"), None), ("cuda:x", None)])
def test_cuda_index(device, index):
    assert early.cuda_index(device) == index


def test_the_cpu_starts_nothing(monkeypatch):
    monkeypatch.setattr(early, "_begun", {})
    early.start_cuda("cpu")
    assert early._begun == {}


def test_starting_cuda_without_a_driver_is_harmless(monkeypatch):
    monkeypatch.setattr(early, "_begun", {})
    monkeypatch.setattr(early, "_DRIVERS", ("libno-such-driver.so.1",))
    early.start_cuda("auto")
    early.start_cuda("auto")  # once a process
    assert list(early._begun) == ["cuda"]
    early._begun["cuda"].join(timeout=10)
    assert not early._begun["cuda"].is_alive()


def test_loading_on_the_cpu_starts_nothing(monkeypatch, tmp_path):
    from oracle import save_reference_checkpoint, tiny_config

    from kosmos2_cli import Kosmos2ForConditionalGeneration

    started = []
    monkeypatch.setattr(early, "_begin", lambda name, *args: started.append(name))
    save_reference_checkpoint(tmp_path, tiny_config())
    Kosmos2ForConditionalGeneration.from_pretrained(tmp_path, device="cpu")
    assert started == []
