"""Continuous against static batching, on answers of different lengths and on forced 64-token answers.

    python benchmarks/continuous.py                       # GPU: full-size random weights, 256 rows, 2,048 images
    python benchmarks/continuous.py --model FOLDER --device cpu --rows 4 --images 16   # a quick check anywhere

Random weights never end an answer, so each image gets its own cap (`Prompt.max_new_tokens`), drawn uniformly
from 8 to 64 tokens (seed 0): the spread real captions have. The same images (random pixels, encoded a refill at
a time, as `kosmos2 batch` does) go through `rows.stream` twice: refilling rows as answers end (the
default: once a quarter of the rows is free), and refilling only when every row is free (static batches, as
`generate` on one batch after another, finished rows skipping attention). Then both again with every answer
forced to 64 tokens, where they should tie. Prints one table; `--out` writes it as JSON.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time
from pathlib import Path

import torch
from common import dump, full_size_checkpoint, synthetic_image

PROMPT = "<grounding> An image of"
NEW_TOKENS = 64


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "kosmos2-full",
                        help="full-size random weights (built there once, as by gpu.py)")
    parser.add_argument("--model", type=Path, default=None, help="another model folder instead")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    from kosmos2_cli import Kosmos2ForConditionalGeneration, Kosmos2Processor
    from kosmos2_cli.generation.decoder import encode_images
    from kosmos2_cli.generation.rows import Prompt, stream

    folder = args.model or full_size_checkpoint(args.weights)
    device = torch.device(args.device)
    model = Kosmos2ForConditionalGeneration.from_pretrained(folder, device=device, dtype="auto")
    processor = Kosmos2Processor.from_pretrained(folder)
    one = processor(text=PROMPT, images=synthetic_image(), return_tensors="pt")
    ids, mask = one["input_ids"][0].tolist(), one["image_embeds_position_mask"][0].tolist()
    pixels = torch.randn(args.rows, *one["pixel_values"].shape[1:], generator=torch.Generator().manual_seed(0))
    pixels = pixels.to(device, model.dtype)
    draw = random.Random(0)
    spread = [draw.randint(8, NEW_TOKENS) for _ in range(args.images)]
    text = model.config.text_config

    def run(caps: list[int], share: float) -> float:
        """Seconds for every image's answer."""
        given = 0

        def admit(count: int, wait: bool) -> list[Prompt] | None:
            nonlocal given
            count = min(count, len(caps) - given)
            if count == 0:
                return None
            embeds = encode_images(model, pixels[:count]).clone()
            made = [Prompt(given + i, ids, mask, embeds[i], caps[given + i]) for i in range(count)]
            given += count
            return made

        sync()
        start = time.perf_counter()
        answers = stream(model, admit, rows=args.rows, longest_prompt=len(ids), max_new_tokens=NEW_TOKENS,
                         stops=[text.eos_token_id], pad=text.pad_token_id, refill_share=share)
        lengths = [len(answer.ids) for answer in answers]
        sync()
        seconds = time.perf_counter() - start
        assert len(lengths) == len(caps), "an image was not answered"
        return seconds

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    results: dict = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                     "rows": args.rows, "images": args.images, "torch": torch.__version__}
    run(spread[: args.rows * 2], 0.25)  # warm-up: graphs, kernels, allocator
    run(spread[: args.rows * 2], 1.0)
    table = []
    for name, caps in (("8-64 tokens", spread), ("64 tokens", [NEW_TOKENS] * args.images)):
        row = {"answers": name, "mean_tokens": statistics.mean(caps)}
        for mode, share in (("continuous", 0.25), ("static", 1.0)):
            seconds = statistics.median(run(caps, share) for _ in range(args.repeat))
            row[f"{mode}_s"] = seconds
            row[f"{mode}_images_per_s"] = args.images / seconds
        row["speed_up"] = row["static_s"] / row["continuous_s"]
        table.append(row)
        print(row, flush=True)
    results["table"] = table
    print(f"\n{results['device']}, {args.rows} rows, {args.images} images (medians of {args.repeat})\n")
    print("| answers | mean tokens | continuous images/s | static images/s | speed-up |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for row in table:
        print(f"| {row['answers']} | {row['mean_tokens']:.1f} | {row['continuous_images_per_s']:.1f} | "
              f"{row['static_images_per_s']:.1f} | {row['speed_up']:.2f}x |")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        dump(args.out / "continuous.json", results)


if __name__ == "__main__":
    main()
