"""`Kosmos2.stream` cancels by request key: the cancelled request's rows stop at the next step, its waiting
prompts never start, no Started comes for it, its key is forgotten, and the other requests' answers are what
they get alone (trained tiny checkpoint)."""

from __future__ import annotations

import pytest
from oracle import IMAGES

trained = pytest.importorskip("trained")


@pytest.fixture(scope="module")
def kosmos(trained_dir):
    import torch

    from kosmos2_cli.api.pipeline import Kosmos2

    torch.set_num_threads(1)
    return Kosmos2.from_pretrained(trained_dir, device="cpu", dtype="float32")


def _requests(kosmos, names, spec):
    from kosmos2_cli.api.pipeline import Request
    from kosmos2_cli.processing.images import load_image

    images = [load_image(IMAGES / name) for name in names]
    embeds = kosmos.encode_images(images).clone()
    return [Request(i, name, image, spec.jobs(0), embeds[i]) for i, (name, image) in enumerate(zip(names, images,
                                                                                                   strict=True))]


@pytest.mark.parametrize("when", ["on-a-row", "waiting"])
def test_a_cancelled_request_stops_and_the_others_are_exact(kosmos, when, monkeypatch):
    """Four detailed captions on two rows: the longer of the first two is cancelled mid-answer when the other's
    row is refilled, or the last one is cancelled while it still waits for a row."""
    from kosmos2_cli.api.options import GenerationOptions
    from kosmos2_cli.api.tasks import TaskSpec

    spec = TaskSpec.build("caption", detailed=True)
    names = ["snowman.png", "corgi.jpg", "snowman.png", "corgi.jpg"]
    options = GenerationOptions(max_new_tokens=trained.MAX_NEW_TOKENS)

    def run(requests, rows, cancelled=None):
        pending = [requests]
        out = {}
        for started in kosmos.stream(lambda count, wait: pending.pop() if pending else None, rows, options=options,
                                     cancelled=cancelled):
            out[started.key] = spec.record(kosmos.finish(started)).to_dict()
        return out

    alone = {}
    for request in _requests(kosmos, names, spec):
        alone.update(run([request], 1))
    longer = max((0, 1), key=lambda key: len(alone[key]["raw"]))  # still decoding when the other's row refills
    victim, at_prefill = (longer, 2) if when == "on-a-row" else (3, 1)
    cancelled: set = set()
    prefills = []
    original = kosmos.model.prefill

    def prefill(ids, *args, **kwargs):
        prefills.append(ids.shape[0])
        if len(prefills) == at_prefill:
            cancelled.add(victim)
        return original(ids, *args, **kwargs)

    monkeypatch.setattr(kosmos.model, "prefill", prefill)
    done = run(_requests(kosmos, names, spec), 2, cancelled)
    assert set(done) == {0, 1, 2, 3} - {victim}
    assert not cancelled  # forgotten once its rows were gone
    for key, record in done.items():
        assert record == alone[key]
    # a prompt cancelled while waiting never takes a row
    assert sum(prefills) == (4 if when == "on-a-row" else 3)
