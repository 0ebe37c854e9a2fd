"""The training run: AdamW on the reference's loss, warm-up then cosine decay, gradient accumulation, bf16
autocast over fp32 master weights on CUDA (fp32 on a CPU), checkpoints that a killed run resumes from.

The steps are those of a plain PyTorch (or transformers) loop, so that the same weights, data and settings give
the same loss curve as the reference: per optimizer step, `grad_accum` batches of `batch_size` answers, each
batch's loss the sum over its answer tokens divided by the tokens of the whole step (`num_items_in_batch`, as
transformers' Trainer counts them), gradients clipped to `max_grad_norm`, then one AdamW step and one schedule
step. The examples are drawn in a fixed order (a permutation per epoch, from `seed`), one step after another
across epochs; that order, the optimizer, the schedule and the random generators are in every checkpoint.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kosmos2_cli.processing.images import load_image
from kosmos2_cli.train import checkpoints as ckpt
from kosmos2_cli.train.data import Encoded, Example, collate, data_order, encode, file_digest, label_count

PIXEL_CACHE = 256  # preprocessed images kept between steps (small data sets are read once)


class TrainError(ValueError):
    """A run that cannot start or resume; the message says why, `advice` what to change."""

    def __init__(self, message: str, advice: str | None = None) -> None:
        super().__init__(message)
        self.advice = advice


@dataclass
class TrainConfig:
    """What a run does. `settings()` is what a resumed run must share with the run it continues."""

    data: Path
    out: Path
    model: Path  # a model folder in the hub's layout
    model_name: str = ""  # as the user named it (a repo id or a folder), for the state file
    epochs: int = 1
    max_steps: int | None = None  # stop after this many optimizer steps (None: the epochs' steps)
    lr: float | None = None  # None: 1e-5 for full fine-tuning, 2e-4 for LoRA
    batch_size: int = 8
    grad_accum: int = 1
    lora: int = 0  # rank; 0: full fine-tuning
    lora_alpha: float | None = None  # None: the rank (a scaling of 1)
    lora_dropout: float = 0.0
    warmup_steps: int | None = None  # None: 10% of the steps
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # 0: no clipping
    save_every: int = 100  # steps between checkpoints; 0: only the final model
    seed: int = 0
    device: str = "auto"
    images_dir: Path | None = None
    eval: Path | None = None  # annotations (DESIGN §10) scored before and after

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else (2e-4 if self.lora else 1e-5)

    def settings(self, examples: int) -> dict[str, Any]:
        return {
            "data_digest": file_digest(self.data), "examples": examples, "model": str(self.model_name or self.model),
            "epochs": self.epochs, "max_steps": self.max_steps, "lr": self.learning_rate,
            "batch_size": self.batch_size, "grad_accum": self.grad_accum, "lora": self.lora,
            "lora_alpha": self.lora_alpha, "lora_dropout": self.lora_dropout, "warmup_steps": self.warmup_steps,
            "weight_decay": self.weight_decay, "max_grad_norm": self.max_grad_norm, "seed": self.seed,
        }


@dataclass
class StepReport:
    step: int  # optimizer steps done
    total: int
    loss: float  # this step's mean loss per answer token
    lr: float  # the learning rate this step used
    images: int  # answers seen by this run (not counting those before a resume)
    seconds: float  # since this run's first step
    done: int  # steps done by this run


@dataclass
class TrainResult:
    out: Path
    steps: int
    losses: list[float] = field(default_factory=list)  # per step, from the run's first (a resumed run's too)
    resumed_from: int = 0
    eval_before: dict | None = None
    eval_after: dict | None = None
    skipped_records: int = 0
    model: Any = None  # the trained model (LoRA factors unmerged), for callers in the same process


def cosine_with_warmup(warmup: int, total: int) -> Callable[[int], float]:
    """The LR factor at a step: linear from 0 over `warmup` steps, then half a cosine down to 0 at `total` (the
    schedule of transformers' `get_cosine_schedule_with_warmup`)."""

    def factor(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        progress = (step - warmup) / max(1, total - warmup)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))

    return factor


def plan(config: TrainConfig, examples: int) -> tuple[int, int]:
    """(optimizer steps, warm-up steps) of the run."""
    per_step = config.batch_size * config.grad_accum
    total = math.ceil(examples * config.epochs / per_step)
    if config.max_steps is not None:
        total = min(total, config.max_steps) if config.max_steps > 0 else total
    warmup = config.warmup_steps if config.warmup_steps is not None else int(0.1 * total)
    return total, warmup


def train(config: TrainConfig, examples: Sequence[Example], *, on_step: Callable[[StepReport], None] | None = None,
          note: Callable[[str], None] = lambda message: None, skipped: int = 0) -> TrainResult:
    """Run (or resume) the training that `config` describes on `examples`; the model ends at the top of OUT_DIR."""
    from kosmos2_cli.model.devices import resolve_device
    from kosmos2_cli.processing.processor import Kosmos2Processor

    _check(config)
    device = resolve_device(config.device)
    processor = Kosmos2Processor.from_pretrained(config.model)
    encoded = [encode(processor, example) for example in examples]
    settings = config.settings(len(examples))
    resume = _resume_point(config.out, settings)
    total, warmup = plan(config, len(examples))
    order = data_order(len(examples), config.epochs, config.seed)

    model = _load(config, resume[1] if resume else None, device)
    params = [p for p in model.parameters() if p.requires_grad]
    # On CUDA the fused kernel (one launch for every tensor; Trainer's default too); elsewhere the same update.
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, betas=(0.9, 0.999), eps=1e-8,
                                  weight_decay=config.weight_decay, fused=device.type == "cuda" or None)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(warmup, total))
    result = TrainResult(config.out, total, skipped_records=skipped)
    start = 0
    if resume:
        start, folder = resume
        info, tensors = ckpt.read_state(folder)
        if info["order"] != order:
            raise TrainError(f"{folder}: its data order is not this run's", advice="overwrite")
        ckpt.load_optimizer_state(optimizer, info["optimizer"], tensors)
        scheduler.load_state_dict(info["scheduler"])
        ckpt.load_rng_state(tensors)
        result.resumed_from, result.eval_before = start, info.get("eval_before")
        result.losses = list(info.get("losses", []))
        note(f"resuming from step {start} of {total} ({folder.name})")
    else:
        torch.manual_seed(config.seed)
    if config.eval is not None and result.eval_before is None:
        result.eval_before = _evaluate(model, processor, config)

    batches = _Batches(encoded, examples, order, config, processor, device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    began, seen = time.perf_counter(), 0
    model.train()
    with ThreadPoolExecutor(1, thread_name_prefix="kosmos2-train-data") as pool:
        upcoming = pool.submit(batches.step, start) if start < total else None
        for step in range(start, total):
            micro = upcoming.result()
            upcoming = pool.submit(batches.step, step + 1) if step + 1 < total else None
            items = sum(label_count(batch["labels"]) for batch in micro)
            lr = scheduler.get_last_lr()[0]
            loss = torch.zeros((), device=device)
            for batch in micro:
                with autocast:
                    out = model(**batch, num_items_in_batch=items)
                out.loss.backward()
                loss += out.loss.detach()
            if config.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            result.losses.append(float(loss))
            seen += sum(batch["labels"].shape[0] for batch in micro)
            if on_step is not None:
                on_step(StepReport(step + 1, total, result.losses[-1], lr, seen, time.perf_counter() - began,
                                   step + 1 - start))
            if config.save_every and (step + 1) % config.save_every == 0 and step + 1 < total:
                _save_checkpoint(config, model, optimizer, scheduler, step + 1, settings, order, result)
    model.eval()
    if config.eval is not None:
        result.eval_after = _evaluate(model, processor, config)
    _save_final(config, model, total, settings, result)
    result.model = model
    return result


def _check(config: TrainConfig) -> None:
    for name in ("epochs", "batch_size", "grad_accum"):
        if getattr(config, name) < 1:
            raise TrainError(f"{name.replace('_', ' ')} must be 1 or more (got {getattr(config, name)})")
    if config.lora < 0:
        raise TrainError(f"the LoRA rank must be 1 or more (got {config.lora})")
    if config.learning_rate <= 0:
        raise TrainError(f"the learning rate must be positive (got {config.learning_rate:g})")


def _resume_point(out: Path, settings: dict[str, Any]) -> tuple[int, Path] | None:
    """The last whole checkpoint of an interrupted run of these settings; None for a fresh run. Raises when OUT_DIR
    holds something else: a finished run, a run of other settings, files that are not a run's."""
    if not out.exists():
        return None
    if not out.is_dir():
        raise TrainError(f"{out}: exists and is not a folder", advice="output")
    ckpt.clean_temporaries(out)
    if (out / ckpt.STATE_JSON).is_file():
        raise TrainError(f"{out}: holds a finished training run", advice="output")
    found = ckpt.checkpoints(out)
    if not found:
        if any(out.iterdir()):
            raise TrainError(f"{out}: is not empty and holds no training run", advice="output")
        return None
    step, folder = found[-1]
    info, _ = ckpt.read_state(folder)
    changed = sorted(k for k in set(settings) | set(info["settings"]) if settings.get(k) != info["settings"].get(k))
    if changed:
        what = ", ".join(f"{k} {info['settings'].get(k)!r} -> {settings.get(k)!r}" for k in changed[:3])
        raise TrainError(f"{out}: holds an interrupted run with other settings ({what})", advice="output")
    return step, folder


def _load(config: TrainConfig, checkpoint: Path | None, device: torch.device):
    """The model in fp32 on `device`, plain modules (no fast path): the base model, or for a resumed full run
    the checkpoint's weights; with LoRA, the base and its factors (fresh from `seed`, or the checkpoint's)."""
    from kosmos2_cli.api.models import Kosmos2ForConditionalGeneration
    from kosmos2_cli.train.lora import apply_lora, lora_modules

    source = checkpoint if checkpoint is not None and not config.lora else config.model
    model = Kosmos2ForConditionalGeneration.from_pretrained(source, device=device, dtype=torch.float32, fast=False)
    if config.lora:
        torch.manual_seed(config.seed)
        apply_lora(model, config.lora, config.lora_alpha, config.lora_dropout)
        if checkpoint is not None:
            _, tensors = ckpt.read_state(checkpoint)
            for name, module in lora_modules(model).items():
                with torch.no_grad():
                    module.lora_A.copy_(tensors[f"lora.{name}.lora_A"])
                    module.lora_B.copy_(tensors[f"lora.{name}.lora_B"])
    else:
        for parameter in model.parameters():
            parameter.requires_grad_(True)
    return model


class _Batches:
    """The micro-batches of each optimizer step, made on a worker thread while the previous step runs."""

    def __init__(self, encoded: Sequence[Encoded], examples: Sequence[Example], order: list[int],
                 config: TrainConfig, processor, device: torch.device) -> None:
        self.encoded, self.examples, self.order = encoded, examples, order
        self.batch_size, self.per_step = config.batch_size, config.batch_size * config.grad_accum
        self.processor, self.device = processor, device
        self.pad = processor.tokenizer.pad_token_id
        self.pixels: OrderedDict[str, torch.Tensor] = OrderedDict()

    def step(self, step: int) -> list[dict[str, torch.Tensor]]:
        chosen = self.order[step * self.per_step:(step + 1) * self.per_step]
        out = []
        for at in range(0, len(chosen), self.batch_size):
            rows = chosen[at:at + self.batch_size]
            pixels = torch.stack([self._pixels(self.examples[i].image) for i in rows])
            batch = collate([self.encoded[i] for i in rows], pixels, self.pad)
            out.append({k: v.to(self.device, non_blocking=True) for k, v in batch.items()})
        return out

    def _pixels(self, image: str) -> torch.Tensor:
        cached = self.pixels.get(image)
        if cached is None:
            with load_image(image) as picture:
                cached = self.processor.image_processor([picture], return_tensors="pt")["pixel_values"][0]
            self.pixels[image] = cached
            if len(self.pixels) > PIXEL_CACHE:
                self.pixels.popitem(last=False)
        else:
            self.pixels.move_to_end(image)
        return cached


def _model_state(model, lora: int) -> dict[str, torch.Tensor]:
    from kosmos2_cli.train.lora import merged_state

    return merged_state(model) if lora else model.state_dict()


def _save_checkpoint(config: TrainConfig, model, optimizer, scheduler, step: int, settings: dict, order: list[int],
                     result: TrainResult) -> None:
    from kosmos2_cli.train.lora import adapter_state

    optimizer_info, tensors = ckpt.optimizer_state(optimizer)
    tensors.update(ckpt.rng_state())
    if config.lora:
        tensors.update({f"lora.{k}": v for k, v in adapter_state(model).items()})
    info = {"step": step, "done": False, "settings": settings, "order": order, "optimizer": optimizer_info,
            "scheduler": scheduler.state_dict(), "eval_before": result.eval_before, "losses": result.losses}

    def fill(folder: Path) -> None:
        ckpt.write_model(folder, _model_state(model, config.lora), model.config, config.model)
        ckpt.write_state(folder, info, tensors)

    final = config.out / f"checkpoint-{step:06d}"
    ckpt.atomic_folder(final, fill)
    for _, older in ckpt.checkpoints(config.out)[:-1]:
        shutil.rmtree(older, ignore_errors=True)


def _save_final(config: TrainConfig, model, total: int, settings: dict, result: TrainResult) -> None:
    info = {"step": total, "done": True, "settings": settings, "eval_before": result.eval_before,
            "eval_after": result.eval_after, "losses": result.losses,
            "base_model": str(config.model_name or config.model), "lora": config.lora}

    def fill(folder: Path) -> None:
        ckpt.write_model(folder, _model_state(model, config.lora), model.config, config.model)
        (folder / ckpt.STATE_JSON).write_text(json.dumps(info, indent=1) + "\n")

    final = config.out / f"checkpoint-{total:06d}"
    ckpt.atomic_folder(final, fill)
    ckpt.publish(final, config.out)
    for _, older in ckpt.checkpoints(config.out):
        shutil.rmtree(older, ignore_errors=True)


def _evaluate(model, processor, config: TrainConfig) -> dict:
    from kosmos2_cli.train.evaluate import evaluate, read_annotations

    was_training = model.training
    model.eval()
    try:
        return evaluate(model, processor, read_annotations(config.eval, config.images_dir))
    finally:
        model.train(was_training)
