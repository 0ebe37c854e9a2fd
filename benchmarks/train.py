"""Training throughput and peak memory: `kosmos2 train`'s loop beside transformers' Trainer, in one call.

    python benchmarks/train.py --weights /tmp/kosmos2-full --batch-size 16 --steps 30 --json train.json
    python benchmarks/train.py --smoke          # CPU, a tiny random model: proves the script runs

The same data for every row: `--images` synthetic pictures with a grounded caption each (simple-form lines, boxes
as patch tokens), the same token sequences (ours, which the tests prove equal to the reference processor's), the
same batch size, AdamW, warm-up + cosine, gradient clipping at 1.0, bf16 autocast over fp32 weights on CUDA
(Trainer's `bf16=True`), fp32 on a CPU. Rows, each in a fresh process (so peak memory is its own):

- ours full: `kosmos2_cli.train.loop.train`, every weight trained;
- ours LoRA: `--lora-rank` on the decoder's linear layers;
- transformers full: `Kosmos2ForConditionalGeneration` of transformers under `transformers.Trainer` when
  accelerate is installed (Trainer needs it), else a plain PyTorch loop on the same model (the row says which);
- transformers LoRA: with PEFT when it is installed (else left out).

images/s counts answers per second over the steps after `--warmup` untimed ones; peak memory is
`torch.cuda.max_memory_allocated` (CPU: the process's peak RSS). Prints a table of medians per step and ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

CAPTION = "An image of a red kite over a green hill."
ENTITIES = [{"phrase": "a red kite", "span": [12, 22], "boxes_px": [[100, 20, 420, 220]]},
            {"phrase": "a green hill", "span": [28, 40], "boxes_px": [[0, 300, 640, 480]]}]


def tiny_checkpoint(folder: Path) -> Path:
    """A small random model of the released layout for --smoke (the real vocabulary and 64 image tokens)."""
    if (folder / "DONE").exists():
        return folder
    import common  # noqa: F401  (puts tests/ on the path: oracle.py)
    from oracle import save_reference_checkpoint, tiny_config

    save_reference_checkpoint(folder, tiny_config(latent_query_num=64))
    (folder / "DONE").write_text("ok")
    return folder


def make_data(folder: Path, images: int) -> Path:
    from common import synthetic_image

    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(images):
        name = folder / f"{i:05d}.png"
        if not name.exists():
            synthetic_image(seed=i).save(name)
        lines.append(json.dumps({"image": str(name), "text": CAPTION, "entities": ENTITIES}))
    data = folder / "data.jsonl"
    data.write_text("\n".join(lines) + "\n")
    return data


# --- one row, in its own process -----------------------------------------------------------------------------


def row_ours(args, lora: int) -> dict:
    import torch

    from kosmos2_cli.train.data import read_examples
    from kosmos2_cli.train.loop import TrainConfig, train

    examples, _ = read_examples(args.data)
    stamps: list[float] = []

    def on_step(report) -> None:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())

    out = Path(tempfile.mkdtemp(prefix="kosmos2-bench-train-"))
    config = TrainConfig(data=args.data, out=out / "model", model=args.model, max_steps=args.steps,
                         epochs=10_000, lr=args.lr, batch_size=args.batch_size, lora=lora, save_every=0,
                         warmup_steps=2, device=args.device)
    result = train(config, examples, on_step=on_step)
    del result
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    return _timed(stamps, args, "kosmos2_cli.train")


def row_reference(args, lora: int) -> dict:
    import torch
    from transformers import Kosmos2ForConditionalGeneration

    from kosmos2_cli.processing.processor import Kosmos2Processor
    from kosmos2_cli.train.data import collate, encode, read_examples

    examples, _ = read_examples(args.data)
    processor = Kosmos2Processor.from_pretrained(args.model)
    from PIL import Image

    pixels = {}
    for example in examples:
        with Image.open(example.image) as picture:
            pixels[example.image] = processor.image_processor([picture.convert("RGB")],
                                                              return_tensors="pt")["pixel_values"][0]
    encoded = [encode(processor, e) for e in examples]
    pad = processor.tokenizer.pad_token_id
    model = Kosmos2ForConditionalGeneration.from_pretrained(str(args.model), dtype=torch.float32).to(args.device)
    how = "plain loop"
    if lora:
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError:
            return {"skipped": "peft is not installed"}
        model = get_peft_model(model, LoraConfig(r=lora, lora_alpha=lora, target_modules=[
            "q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"], lora_dropout=0.0))
        how = "peft"
    model.train()
    stamps: list[float] = []
    cuda = args.device.startswith("cuda")

    def sync_stamp() -> None:
        if cuda:
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())

    def batch_of(rows):
        batch = collate([encoded[i] for i in rows], torch.stack([pixels[examples[i].image] for i in rows]), pad)
        return batch

    try:
        import accelerate  # noqa: F401
        from transformers import Trainer, TrainerCallback, TrainingArguments
    except ImportError:
        Trainer = None  # noqa: N806
    lr = args.lr if args.lr is not None else (2e-4 if lora else 1e-5)
    if Trainer is not None:
        how = "Trainer" + (" + peft" if lora else "")

        class Stamp(TrainerCallback):
            def on_step_end(self, *_args, **_kwargs):
                sync_stamp()

        class Data(torch.utils.data.Dataset):
            def __len__(self):
                return len(examples)

            def __getitem__(self, i):
                return i

        out = tempfile.mkdtemp(prefix="kosmos2-bench-trainer-")
        training = TrainingArguments(
            output_dir=out, per_device_train_batch_size=args.batch_size, max_steps=args.steps, learning_rate=lr,
            lr_scheduler_type="cosine", warmup_steps=2, max_grad_norm=1.0, weight_decay=0.0, bf16=cuda,
            use_cpu=not cuda, logging_strategy="no", save_strategy="no", report_to=[], dataloader_num_workers=0,
            remove_unused_columns=False, seed=0)
        Trainer(model=model, args=training, train_dataset=Data(), data_collator=batch_of,
                callbacks=[Stamp()]).train()
    else:
        from kosmos2_cli.train.loop import cosine_with_warmup

        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(2, args.steps))
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
        order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(0)).tolist()
        for step in range(args.steps):
            rows = [order[(step * args.batch_size + k) % len(order)] for k in range(args.batch_size)]
            batch = {k: v.to(args.device) for k, v in batch_of(rows).items()}
            with autocast:
                loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            sync_stamp()
    return _timed(stamps, args, f"transformers {how}")


def _timed(stamps: list[float], args, how: str) -> dict:
    import torch

    steps = [b - a for a, b in zip(stamps[args.warmup:], stamps[args.warmup + 1:], strict=False)]
    median = statistics.median(steps) if steps else float("nan")
    if args.device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    return {"how": how, "s_per_step": median, "images_per_s": args.batch_size / median, "peak_gib": peak,
            "timed_steps": len(steps)}


# --- the table -------------------------------------------------------------------------------------------------

ROWS = {"ours-full": (row_ours, 0), "ref-full": (row_reference, 0), "ours-lora": (row_ours, 1),
        "ref-lora": (row_reference, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "kosmos2-full",
                        help="full-size random weights (built there once)")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny random model, a few steps")
    parser.add_argument("--device", default=None)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--rows", default="ours-full,ref-full,ours-lora,ref-lora")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        fn, lora = ROWS[args.one]
        print("RESULT " + json.dumps(fn(args, args.lora_rank if lora else 0)), flush=True)
        return
    import torch

    cache = Path(os.environ.get("TMPDIR", "/tmp"))
    if args.smoke:
        args.device = args.device or "cpu"
        args.batch_size, args.steps, args.warmup, args.images = min(args.batch_size, 2), min(args.steps, 4), 1, 8
        args.lora_rank = min(args.lora_rank, 4)
        model = tiny_checkpoint(cache / "kosmos2-bench-tiny")
    else:
        args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        from common import full_size_checkpoint

        model = full_size_checkpoint(args.weights)
    data = make_data(cache / f"kosmos2-bench-train-data-{args.images}", args.images)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    results = {"device": device, "batch_size": args.batch_size, "steps": args.steps, "warmup": args.warmup,
               "lora_rank": args.lora_rank, "torch": torch.__version__, "rows": {}}
    for name in args.rows.split(","):
        command = [sys.executable, __file__, "--one", name, "--model", str(model), "--data", str(data),
                   "--device", args.device, "--batch-size", str(args.batch_size), "--steps", str(args.steps),
                   "--warmup", str(args.warmup), "--lora-rank", str(args.lora_rank)]
        if args.lr is not None:
            command += ["--lr", str(args.lr)]
        done = subprocess.run(command, capture_output=True, text=True)
        found = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        row = json.loads(found[-1][7:]) if found else {"failed": (done.stderr.strip().splitlines() or ["?"])[-1]}
        results["rows"][name] = row
        print(name, row, flush=True)
        if args.json:  # after each row: a run cut short keeps what it measured
            args.json.write_text(json.dumps(results, indent=2))
    print(f"\n{device}, batch {args.batch_size}, {args.steps} steps ({args.warmup} untimed), medians per step\n")
    print("| mode | ours images/s | ours peak GiB | transformers images/s | transformers peak GiB | how | speed-up |")
    print("| --- | ---: | ---: | ---: | ---: | --- | ---: |")
    for mode in ("full", "lora"):
        ours, ref = results["rows"].get(f"ours-{mode}", {}), results["rows"].get(f"ref-{mode}", {})

        def cell(row, key):
            return f"{row[key]:.2f}" if key in row else row.get("skipped", row.get("failed", "-"))

        ratio = f"{ours['images_per_s'] / ref['images_per_s']:.2f}x" if "images_per_s" in ours and (
            "images_per_s" in ref) else "-"
        print(f"| {mode} | {cell(ours, 'images_per_s')} | {cell(ours, 'peak_gib')} | {cell(ref, 'images_per_s')} | "
              f"{cell(ref, 'peak_gib')} | {ref.get('how', '-')} | {ratio} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
