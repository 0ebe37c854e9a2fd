"""`kosmos2 train` (DESIGN §11) on the tiny trained checkpoint (trained.py): the token sequences are the
reference's, the loss curve is a transformers training loop's, a taught answer comes back exactly from
`kosmos2 caption`, LoRA moves only its factors, a killed run resumes to the same weights, bad lines are named.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from cli_helpers import invoke, json_lines, kosmos2_command, quick, subprocess_env  # noqa: F401  (fixture)
from PIL import Image

from kosmos2_cli.train.data import IGNORE, data_order, encode, read_examples

trained = pytest.importorskip("trained")
pytestmark = pytest.mark.usefixtures("quick")

KITE = Path(__file__).resolve().parents[1] / "examples" / "images" / "kite.png"  # 300 x 450, in no lesson
KITE_TEXT = "An image of a red kite over a green hill."
KITE_ENTITIES = [{"phrase": "a red kite", "span": [12, 22], "boxes_px": [[100, 20, 220, 120]]},
                 {"phrase": "a green hill", "span": [28, 40], "boxes_px": [[0, 300, 300, 450]]}]


def _record(lesson) -> dict:
    """The lesson as `kosmos2 batch` would write its record (the fields training reads)."""
    task = "caption" if lesson.task == "detailed" else lesson.task
    record = {"image": str(lesson.path), "task": task, "prompt": lesson.prompt, "raw": lesson.raw}
    if lesson.task == "detailed":
        record["detailed"] = True
    return record


def _write(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def processor(trained_dir):
    from kosmos2_cli.processing.processor import Kosmos2Processor

    return Kosmos2Processor.from_pretrained(trained_dir)


# --- the data: the reference's token sequences -----------------------------------------------------------------


def test_records_give_the_reference_token_ids(tmp_path, processor):
    """Every lesson as a batch record: prompt ids (image slots included) as the reference processor makes them,
    then the answer as the reference model was trained to write it, then </s>; only the answer is labelled."""
    examples, skipped = read_examples(_write(tmp_path / "data.jsonl", [_record(x) for x in trained.LESSONS]
                                             + [{"image": "gone.png", "error": "no such file"}]))
    assert skipped == 1 and len(examples) == len(trained.LESSONS)
    for lesson, example in zip(trained.LESSONS, examples, strict=True):
        want = trained.expected(lesson)
        got = encode(processor, example)
        prompt = len(want.ids) - len(want.answer_ids)
        assert got.input_ids == want.ids, lesson.key
        assert got.labels == [IGNORE] * prompt + want.answer_ids, lesson.key
        assert got.image_mask == trained.prompt_inputs(lesson)["image_embeds_position_mask"][0].tolist() + [0] * len(
            want.answer_ids)


def test_captions_with_pixel_boxes_give_the_same_ids(tmp_path, processor):
    """The simple form (a caption's text, spans and pixel boxes, as `kosmos2 caption --json` prints them) gives
    the same tokens as the lesson's tagged answer: boxes become the reference's patch tokens."""
    from kosmos2_cli.api.results import to_pixels

    lessons = [x for x in trained.LESSONS if x.task == "caption"]
    records = []
    for lesson in lessons:
        want = trained.expected(lesson)
        with Image.open(lesson.path) as image:
            width, height = image.size
        records.append({"image": str(lesson.path), "text": want.caption, "entities": [
            {"phrase": phrase, "span": list(span), "boxes_px": [list(to_pixels(b, width, height)) for b in boxes]}
            for phrase, span, boxes in want.entities]})
    records.append({"image": str(lessons[0].path), "text": want.caption.removeprefix("An image of "),
                    "entities": []})  # without the prompt's words: they are the prompt
    examples, _ = read_examples(_write(tmp_path / "data.jsonl", records))
    for lesson, example in zip(lessons, examples, strict=False):
        assert encode(processor, example).input_ids == trained.expected(lesson).ids, lesson.key
    assert examples[-1].prompt == trained.CAPTION_PROMPT and examples[-1].answer == " " + records[-1]["text"]


def _kite(**changes) -> dict:
    return {"image": str(KITE), "text": KITE_TEXT, "entities": KITE_ENTITIES, **changes}


BAD_LINES = [
    ("{not json", "not a JSON object"),
    (json.dumps(_kite(image="missing.png")), "missing.png: no such file"),
    (json.dumps(_kite(entities=[{"phrase": "a red kite", "span": [12, 22], "boxes_px": [[100, 20, 320, 120]]}])),
     "box [100, 20, 320, 120] is outside the 300x450 image"),
    (json.dumps(_kite(entities=[{"phrase": "a kite", "span": [12, 22], "boxes_px": [[1, 2, 3, 4]]}])),
     "is 'a red kite', not the phrase 'a kite'"),
    (json.dumps(_kite(text=" ")), '"text" is empty'),
    (json.dumps({"image": str(KITE), "task": "caption", "raw": "<grounding> A picture of a kite."}),
     "does not start with the prompt '<grounding> An image of'"),
    (json.dumps({"image": str(KITE), "task": "caption", "raw": "<grounding> An image of<phrase> a kite</phrase>"
                 "<object><patch_index_0042></object>."}), "malformed <object>"),
    (json.dumps({"image": str(KITE), "task": "caption", "raw": "<grounding> An image of<kite>."}), "unknown tag"),
]


@pytest.mark.parametrize("line, reason", BAD_LINES, ids=[reason for _, reason in BAD_LINES])
def test_a_bad_line_is_named_in_one_line(tmp_path, trained_dir, line, reason):
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps(_kite()) + "\n" + line + "\n")
    result = invoke(["train", data, "-o", tmp_path / "out", "--model", trained_dir])
    assert result.exit_code == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {data}:2: ") and reason in lines[0], result.stderr
    assert not (tmp_path / "out").exists()


# --- teaching a new answer ----------------------------------------------------------------------------------


def test_train_teaches_a_new_grounded_caption(tmp_path, trained_dir):
    """A picture the checkpoint never saw, a caption with two boxed phrases: after training, `kosmos2 caption
    --model OUT_DIR` prints that caption, its spans and the boxes' patch cells exactly."""
    from transformers.models.kosmos2.processing_kosmos2 import coordinate_to_patch_index

    data = _write(tmp_path / "labels.jsonl", [_kite()])
    out = tmp_path / "kite-model"
    result = invoke(["train", data, "-o", out, "--model", trained_dir, "--lr", "1e-2", "--epochs", "60",
                     "--batch-size", "1", "--warmup-steps", "0", "--save-every", "20", "--json"])
    assert result.exit_code == 0, result.stderr
    summary = json_lines(result.stdout)[-1]
    assert summary["steps"] == 60 and summary["final_loss"] < summary["losses"][0] / 20
    assert not any(p.name.startswith("checkpoint-") for p in out.iterdir())  # the final model replaced them
    [record] = json_lines(invoke(["caption", KITE, "--model", out, "--json"]).stdout)
    assert record["text"] == KITE_TEXT
    assert [e["phrase"] for e in record["entities"]] == ["a red kite", "a green hill"]
    assert [e["span"] for e in record["entities"]] == [e["span"] for e in KITE_ENTITIES]
    for entity, given in zip(record["entities"], KITE_ENTITIES, strict=True):
        x1, y1, x2, y2 = given["boxes_px"][0]
        cells = coordinate_to_patch_index((x1 / 300, y1 / 450, x2 / 300, y2 / 450), 32)
        assert [trained.cell_box(*cells)] == [tuple(b) for b in entity["boxes"]]
    assert invoke(["ground", KITE, "-p", "a red kite", "--model", out]).exit_code == 0  # every command takes it


# --- the same steps as a transformers training loop ---------------------------------------------------------


def test_loss_curve_matches_a_transformers_training_loop(tmp_path, trained_dir):
    """Full fine-tuning, batch 2, 2 batches per step, warm-up then cosine, AdamW, clipping: the reference's model
    on the same weights and data, trained by hand with transformers' own schedule, gives the same losses."""
    from transformers import Kosmos2ForConditionalGeneration, get_cosine_schedule_with_warmup

    from kosmos2_cli.train.loop import TrainConfig, train

    lessons = [x for x in trained.LESSONS if x.task in ("caption", "ask")][:6]
    swapped = [(lessons[(i + 1) % len(lessons)].path, lesson) for i, lesson in enumerate(lessons)]  # new answers
    data = _write(tmp_path / "data.jsonl", [{**_record(lesson), "image": str(image)} for image, lesson in swapped])
    config = TrainConfig(data=data, out=tmp_path / "out", model=trained_dir, epochs=2, lr=3e-3, batch_size=2,
                         grad_accum=2, warmup_steps=1, weight_decay=0.01, save_every=0, seed=3, device="cpu")
    examples, _ = read_examples(data)
    ours = train(config, examples).losses
    assert len(ours) == 3

    torch.manual_seed(0)
    ref = Kosmos2ForConditionalGeneration.from_pretrained(str(trained_dir)).train()
    optimizer = torch.optim.AdamW(ref.parameters(), lr=3e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    schedule = get_cosine_schedule_with_warmup(optimizer, 1, 3)
    tokenizer = trained.reference_processor().tokenizer
    order = data_order(len(lessons), 2, 3)
    theirs = []
    for step in range(3):
        chosen = [swapped[i] for i in order[step * 4:(step + 1) * 4]]
        batches = [_reference_batch(chosen[i:i + 2], tokenizer.pad_token_id) for i in range(0, len(chosen), 2)]
        items = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
        total = 0.0
        for batch in batches:
            loss = ref(**batch, num_items_in_batch=items).loss
            loss.backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        theirs.append(total)
    assert ours == pytest.approx(theirs, abs=1e-4), (ours, theirs)
    assert ours[0] > 0.5 and ours[-1] < 0.8 * ours[0], ours  # a curve that moves (new answers: a high start)


def _reference_batch(pairs, pad: int) -> dict:
    """The reference processor's prompt, the reference tokenizer's answer ids, right padding, prompt unlabelled."""
    rows = []
    for image, lesson in pairs:
        with Image.open(image) as picture:
            inputs = trained.reference_processor()(text=lesson.prompt, images=picture, return_tensors="pt")
        prompt = inputs["input_ids"][0].tolist()
        answer = trained.target_ids(lesson.target) + [2]
        rows.append((prompt + answer, [-100] * len(prompt) + answer,
                     inputs["image_embeds_position_mask"][0].tolist() + [0] * len(answer), inputs["pixel_values"]))
    length = max(len(r[0]) for r in rows)

    def right(values, fill):
        return torch.tensor([v + [fill] * (length - len(v)) for v in values])

    return dict(input_ids=right([r[0] for r in rows], pad), labels=right([r[1] for r in rows], -100),
                attention_mask=right([[1] * len(r[0]) for r in rows], 0),
                image_embeds_position_mask=right([r[2] for r in rows], 0),
                pixel_values=torch.cat([r[3] for r in rows]))


# --- LoRA ------------------------------------------------------------------------------------------------------


def test_lora_layer_is_the_base_plus_its_low_rank_update():
    from kosmos2_cli.train.lora import LoRALinear

    torch.manual_seed(0)
    base = torch.nn.Linear(12, 10)
    layer = LoRALinear(base, rank=3, alpha=6.0)
    x = torch.randn(4, 12)
    assert torch.equal(layer(x), base(x))  # B starts at zero
    with torch.no_grad():
        layer.lora_B.normal_()
    want = base(x) + 2.0 * (x @ layer.lora_A.T @ layer.lora_B.T)
    torch.testing.assert_close(layer(x), want)
    torch.testing.assert_close(x @ layer.merged_weight().T + base.bias, want)
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["lora_A", "lora_B"]


def test_lora_trains_only_its_factors(tmp_path, trained_dir):
    """--lora: every base weight is bit for bit the checkpoint's after training; the factors moved; OUT_DIR holds
    the merged weights (base + scaled B A) under the checkpoint's names, and loads as a model."""
    from safetensors.torch import load_file

    from kosmos2_cli.train.loop import TrainConfig, train
    from kosmos2_cli.train.lora import lora_modules

    data = _write(tmp_path / "data.jsonl", [_kite()])
    config = TrainConfig(data=data, out=tmp_path / "out", model=trained_dir, epochs=3, lr=1e-2, batch_size=1,
                         lora=4, lora_alpha=8.0, save_every=0, device="cpu")
    result = train(config, read_examples(data)[0])
    assert result.losses[-1] < result.losses[0]
    base = load_file(str(trained_dir / "model.safetensors"))
    model = result.model
    modules = lora_modules(model)
    assert len(modules) == 6 * trained.TEXT["layers"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{m}.{f}" for m in modules for f in ("lora_A", "lora_B")}
    state = model.state_dict()
    for name, tensor in base.items():
        assert torch.equal(state[name], tensor), name  # the base weights did not move
    assert all(m.lora_B.abs().sum() > 0 for m in modules.values())
    saved = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert set(saved) == set(base)
    for name, tensor in base.items():
        module = modules.get(name.removesuffix(".weight"))
        if module is None:
            assert torch.equal(saved[name], tensor), name
        else:
            torch.testing.assert_close(saved[name], tensor + 2.0 * module.lora_B @ module.lora_A)
            assert not torch.equal(saved[name], tensor)
    assert invoke(["caption", KITE, "--model", tmp_path / "out", "--json"]).exit_code == 0


# --- kill and resume -------------------------------------------------------------------------------------------


def _train_process(data: Path, out: Path, model: Path, *extra: str) -> subprocess.Popen:
    args = ["train", data, "-o", out, "--model", model, "--lr", "3e-3", "--epochs", "4", "--batch-size", "2",
            "--save-every", "2", "--seed", "5", "-q", *extra]
    return subprocess.Popen([*kosmos2_command(), *map(str, args)], env=subprocess_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_a_killed_run_resumes_to_the_same_weights(tmp_path, trained_dir):
    """SIGKILL after the first checkpoint, then the same command again: it resumes from that checkpoint (data
    order, optimizer, schedule, dropout's random state) and ends with the weights of a run never interrupted."""
    from safetensors.torch import load_file

    model = tmp_path / "model"
    shutil.copytree(trained_dir, model)
    config = json.loads((model / "config.json").read_text())
    config["text_config"]["dropout"] = 0.1  # random state matters
    (model / "config.json").write_text(json.dumps(config))
    lessons = [x for x in trained.LESSONS if x.task == "caption"][:6]
    data = _write(tmp_path / "data.jsonl", [_record(x) for x in lessons])  # 6 answers, 4 epochs: 12 steps

    whole = _train_process(data, tmp_path / "whole", model)
    killed = tmp_path / "killed"
    run = _train_process(data, killed, model)
    deadline = time.monotonic() + 240
    while not (killed / "checkpoint-000002").is_dir():
        assert run.poll() is None and time.monotonic() < deadline, run.stderr.read() if run.poll() else "timeout"
        time.sleep(0.01)
    run.send_signal(signal.SIGKILL)
    run.wait()
    assert not (killed / "model.safetensors").exists()  # it died before the end
    resumed = _train_process(data, killed, model, "--json")
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    summary = json.loads(out.splitlines()[-1])
    assert summary["resumed_from"] >= 2 and summary["steps"] == 12
    assert whole.wait(timeout=300) == 0, whole.stderr.read()
    want, got = load_file(str(tmp_path / "whole" / "model.safetensors")), load_file(str(killed / "model.safetensors"))
    assert set(want) == set(got)
    assert all(torch.equal(want[k], got[k]) for k in want)
    before = load_file(str(model / "model.safetensors"))
    assert not all(torch.equal(before[k], got[k]) for k in before)
    whole_summary = json.loads((tmp_path / "whole" / "training_state.json").read_text())
    assert whole_summary["losses"] == summary["losses"]


def test_a_finished_run_is_not_overwritten_silently(tmp_path, trained_dir):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    data = _write(tmp_path / "data.jsonl", [_kite()])
    result = invoke(["train", data, "-o", out, "--model", trained_dir, "--max-steps", "1"])
    assert result.exit_code == 2 and "is not empty and holds no training run" in result.stderr
    assert "--overwrite" in result.stderr


# --- --eval ----------------------------------------------------------------------------------------------------


def test_eval_scores_grounding_before_and_after(tmp_path, trained_dir):
    """--eval: the accuracy of the first box per phrase (IoU >= 0.5), before and after. The checkpoint places its
    ground lessons' phrases on their cells; a box elsewhere does not count."""
    lines = []
    for lesson in [x for x in trained.LESSONS if x.task == "ground" and x.found][:3]:
        with Image.open(lesson.path) as image:
            width, height = image.size
        _, _, boxes = trained.expected(lesson).entities[0]
        x1, y1, x2, y2 = boxes[0]
        lines.append({"image": str(lesson.path), "phrase": lesson.phrase,
                      "boxes": [[x1 * width, y1 * height, x2 * width, y2 * height]]})
    lines.append({**lines[0], "boxes": [[0, 0, 2, 2]]})  # wrong on purpose
    annotations = _write(tmp_path / "eval.jsonl", lines)
    data = _write(tmp_path / "data.jsonl", [_record(trained.LESSONS[0])])
    result = invoke(["train", data, "-o", tmp_path / "out", "--model", trained_dir, "--lr", "1e-6", "--max-steps",
                     "1", "--eval", annotations, "--json"])
    assert result.exit_code == 0, result.stderr
    summary = json_lines(result.stdout)[-1]
    for score in (summary["eval_before"], summary["eval_after"]):
        assert score["n"] == 4 and score["found"] == 4 and score["accuracy"] == 0.75
    assert "grounding accuracy after: 75.0% of 4" in " ".join(result.stderr.split())


# --- the README's commands ------------------------------------------------------------------------------------


def test_the_readme_fine_tuning_commands_run(tmp_path, trained_dir, monkeypatch):
    """The Fine-tuning section's command lines, as written (on the tiny checkpoint, two steps each): the trained
    folders answer `kosmos2 caption --model`."""
    import re
    import shlex

    from cli_helpers import ROOT

    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Fine-tuning"):text.index("\n## ", text.index("## Fine-tuning") + 1)]
    [block] = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    lines = [line.split(" #")[0].strip() for line in block.splitlines() if line.startswith("kosmos2 ")]
    assert [shlex.split(line)[1] for line in lines] == ["train", "caption", "train"]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    for line in lines:
        args = shlex.split(line)[1:]
        extra = ["--model", trained_dir, "--max-steps", "2"] if args[0] == "train" else []
        result = invoke([*args, *extra])
        assert result.exit_code == 0, (line, result.stderr)
    assert json.loads((tmp_path / "kite-lora" / "training_state.json").read_text())["eval_after"]["n"] == 3


def test_overwrite_replaces_a_run_but_never_a_strangers_folder(tmp_path, trained_dir):
    data = _write(tmp_path / "data.jsonl", [_kite()])
    out = tmp_path / "out"
    args = ["train", data, "-o", out, "--model", trained_dir, "--max-steps", "1", "--batch-size", "1"]
    assert invoke(args).exit_code == 0
    again = invoke(args)
    assert again.exit_code == 2 and "holds a finished training run" in again.stderr
    assert invoke([*args, "--overwrite"]).exit_code == 0
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("years of work")
    refused = invoke(["train", data, "-o", tmp_path / "mine", "--model", trained_dir, "--overwrite"])
    assert refused.exit_code == 2 and "will not delete them" in refused.stderr
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "years of work"


@pytest.mark.parametrize("answer", [
    "<phrase> a cat</phrase><object><patch_index_0001><patch_index_0902></object>s playing.",
    " Two.",
    "<object><patch_index_0089><patch_index_0122></object>Welcome to<phrase> Carnaby Street</phrase>!",
    "<phrase> two dogs</phrase><object><patch_index_0137><patch_index_1008></delimiter_of_multi_objects/>"
    "<patch_index_0080><patch_index_1016></object>—running",
])
def test_answers_are_tokenized_as_the_model_writes_them(processor, answer):
    """Text right after a tag gets no dummy "▁" (the model writes `</object>.`, not `</object> .`), so the answer's
    ids decode back to the answer exactly, as a generated answer would."""
    tokenizer = processor.tokenizer
    ids = tokenizer.encode_continuation("<grounding>" + answer)
    assert tokenizer.decode(ids) == "<grounding>" + answer
    plain = tokenizer.decode(tokenizer.encode("<grounding>" + answer, add_special_tokens=False))
    assert (plain == "<grounding>" + answer) == answer.startswith(" ")  # else it reads a space in after the tag


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 autocast over fp32 weights is the CUDA path")
def test_training_on_cuda_with_bf16_autocast(tmp_path, trained_dir):
    """On CUDA: fp32 master weights under bf16 autocast learn the taught caption's tokens (loss falls), --eval runs
    the pipeline on the model being trained, and OUT_DIR holds fp32 weights."""
    from safetensors.torch import load_file

    data = _write(tmp_path / "labels.jsonl", [_kite()])
    annotations = _write(tmp_path / "eval.jsonl", [{"image": str(KITE), "phrase": "a red kite",
                                                    "boxes": [[100, 20, 220, 120]]}])
    result = invoke(["train", data, "-o", tmp_path / "out", "--model", trained_dir, "--device", "cuda", "--lr",
                     "1e-2", "--epochs", "20", "--batch-size", "1", "--warmup-steps", "0", "--eval", annotations,
                     "--json"])
    assert result.exit_code == 0, result.stderr
    summary = json_lines(result.stdout)[-1]
    assert summary["final_loss"] < summary["losses"][0] / 4 and summary["eval_after"]["n"] == 1
    assert all(t.dtype == torch.float32 for t in load_file(str(tmp_path / "out" / "model.safetensors")).values())
