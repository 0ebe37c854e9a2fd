"""`kosmos2 train`: fine-tune on the user's grounded answers into a model folder every command takes (DESIGN §11).

The work is `kosmos2_cli.train`; this module reads the options, shows progress (loss, images/s, time left) and
turns problems into one-line errors.
"""

import json
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from kosmos2_cli.cli.errors import CliError, ExitCode
from kosmos2_cli.model.hub import DEFAULT_MODEL

RUN = "Run"
LORA = "LoRA"


def train(
    data: Annotated[Path, typer.Argument(metavar="DATA.jsonl", show_default=False, dir_okay=False,
                                         help="One grounded answer per line: a batch record (image, task, raw) or "
                                              '{"image", "text", "entities": [{"phrase", "span", "boxes_px"}]}.')],
    output: Annotated[Path, typer.Option("--output", "-o", metavar="OUT_DIR", file_okay=False, show_default=False,
                                         help="The model folder to write (resumed when it holds an interrupted "
                                              "run).")],
    model: Annotated[str, typer.Option("--model", "-m", metavar="REPO|DIR", envvar="KOSMOS2_MODEL",
                                       help="The model to start from: hub repo id or local folder.")] = DEFAULT_MODEL,
    revision: Annotated[str | None, typer.Option("--revision", metavar="REV",
                                                 help="Hub branch, tag or commit.")] = None,
    epochs: Annotated[int, typer.Option("--epochs", min=1, rich_help_panel=RUN,
                                        help="Passes over the data.")] = 1,
    max_steps: Annotated[int | None, typer.Option("--max-steps", min=1, rich_help_panel=RUN,
                                                  help="Stop after this many optimizer steps.")] = None,
    lr: Annotated[float | None, typer.Option("--lr", rich_help_panel=RUN, show_default=False,
                                             help="Peak learning rate [default: 1e-5, with --lora 2e-4].")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", min=1, rich_help_panel=RUN,
                                            help="Answers per forward pass.")] = 8,
    grad_accum: Annotated[int, typer.Option("--grad-accum", min=1, rich_help_panel=RUN,
                                            help="Batches per optimizer step.")] = 1,
    warmup_steps: Annotated[int | None, typer.Option("--warmup-steps", min=0, rich_help_panel=RUN,
                                                     show_default=False,
                                                     help="Linear warm-up, then cosine decay [default: 10% of the "
                                                          "steps].")] = None,
    weight_decay: Annotated[float, typer.Option("--weight-decay", min=0.0, rich_help_panel=RUN,
                                                help="AdamW's decoupled weight decay.")] = 0.0,
    max_grad_norm: Annotated[float, typer.Option("--max-grad-norm", min=0.0, rich_help_panel=RUN,
                                                 help="Clip the gradients' norm (0: no clipping).")] = 1.0,
    save_every: Annotated[int, typer.Option("--save-every", min=0, rich_help_panel=RUN,
                                            help="Steps between checkpoints (0: only the final model).")] = 100,
    seed: Annotated[int, typer.Option("--seed", rich_help_panel=RUN, help="Data order and initialisation.")] = 0,
    lora: Annotated[int, typer.Option("--lora", metavar="RANK", min=0, rich_help_panel=LORA,
                                      help="Train a LoRA of this rank on the decoder instead of every weight (0: "
                                           "full fine-tuning); OUT_DIR holds the merged model.")] = 0,
    lora_alpha: Annotated[float | None, typer.Option("--lora-alpha", rich_help_panel=LORA, show_default=False,
                                                     help="LoRA scaling numerator [default: the rank].")] = None,
    lora_dropout: Annotated[float, typer.Option("--lora-dropout", min=0.0, max=0.99, rich_help_panel=LORA,
                                                help="Dropout on the LoRA's input.")] = 0.0,
    eval_file: Annotated[Path | None, typer.Option("--eval", metavar="ANNOTATIONS.jsonl", dir_okay=False,
                                                   help='Phrase-grounding accuracy before and after, on lines '
                                                        '{"image", "phrase", "boxes"}.')] = None,
    images: Annotated[Path | None, typer.Option("--images", metavar="DIR", file_okay=False,
                                                help="Folder that relative image paths start from [default: the "
                                                     "data file's folder, else the working directory].")] = None,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")] = "auto",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Start OUT_DIR afresh.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="A summary object on stdout at the end.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress or notes.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Tracebacks for unexpected errors.")] = False,
) -> None:
    """Fine-tune Kosmos-2 on your own grounded answers.

    OUT_DIR is a model folder in the hub's layout: pass it as --model to every command. Checkpoints are written
    every --save-every steps; run the same command again after an interruption and it resumes from the last.

    Example: kosmos2 train labels.jsonl -o my-model --epochs 3
    """
    from kosmos2_cli.cli.render import Reporter
    from kosmos2_cli.cli.session import find_model
    from kosmos2_cli.model.devices import resolve_device
    from kosmos2_cli.processing.images import ImageLoadError
    from kosmos2_cli.runtime.engine import ModelLoadError, check_model_folder, is_out_of_memory
    from kosmos2_cli.train.data import DataError, read_examples
    from kosmos2_cli.train.loop import TrainConfig, TrainError

    reporter = Reporter(json_mode=json_out, quiet=quiet)
    try:
        resolve_device(device)
    except ValueError as err:
        raise CliError.of(err) from err
    if not data.is_file():
        raise CliError(f"{data}: no such file")
    if eval_file is not None and not eval_file.is_file():
        raise CliError(f"{eval_file}: no such file")
    try:
        examples, skipped = read_examples(data, images)
        if eval_file is not None:
            from kosmos2_cli.train.evaluate import read_annotations

            read_annotations(eval_file, images)
    except DataError as err:
        raise CliError(str(err)) from err
    if skipped:
        reporter.note(f"{data}: skipped {skipped} error record(s)")
    folder = find_model(model, revision, reporter)
    try:
        check_model_folder(folder)
    except ModelLoadError as err:
        raise CliError.of(err, ExitCode.MODEL) from err
    if overwrite and output.exists():
        _remove_run(output)
    config = TrainConfig(data=data, out=output, model=folder, model_name=model, epochs=epochs, max_steps=max_steps,
                         lr=lr, batch_size=batch_size, grad_accum=grad_accum, lora=lora, lora_alpha=lora_alpha,
                         lora_dropout=lora_dropout, warmup_steps=warmup_steps, weight_decay=weight_decay,
                         max_grad_norm=max_grad_norm, save_every=save_every, seed=seed, device=device,
                         images_dir=images, eval=eval_file)
    try:
        result = _run(config, examples, skipped, reporter)
    except (TrainError, DataError) as err:
        raise CliError.of(err) from err
    except ModelLoadError as err:
        raise CliError.of(err, ExitCode.MODEL) from err
    except ImageLoadError as err:  # a picture that changed on disk since it was checked
        raise CliError(str(err), ExitCode.FAILED) from err
    except RuntimeError as err:
        if not is_out_of_memory(err):
            raise
        raise CliError(f"out of GPU memory at --batch-size {batch_size}: try a smaller one with --grad-accum to keep "
                       "the step's size, or --lora", ExitCode.FAILED) from err
    except KeyboardInterrupt as err:
        from kosmos2_cli.train.checkpoints import checkpoints

        saved = checkpoints(output)
        where = (f"the last checkpoint is step {saved[-1][0]} in {output}; run the same command again to resume"
                 if saved else "no checkpoint was written yet")
        raise CliError(f"interrupted: {where}", ExitCode.INTERRUPTED) from err
    for label, score in (("before", result.eval_before), ("after", result.eval_after)):
        if score is not None:
            reporter.note(f"grounding accuracy {label}: {score['accuracy']:.1%} of {score['n']} (found "
                          f"{score['found']}, mean IoU {score['mean_iou']:.3f})", style="bold" if label == "after"
                          else "dim")
    reporter.note(f"done: {result.steps} steps, final loss {result.losses[-1]:.4f} → {output} (use it as --model)"
                  if result.losses else f"done → {output}", style="green")
    if json_out:
        sys.stdout.write(json.dumps({"out": str(output), "steps": result.steps, "resumed_from": result.resumed_from,
                                     "final_loss": result.losses[-1] if result.losses else None,
                                     "losses": result.losses, "eval_before": result.eval_before,
                                     "eval_after": result.eval_after, "skipped_records": skipped}) + "\n")
    raise typer.Exit(ExitCode.OK)


def _remove_run(output: Path) -> None:
    """--overwrite: remove OUT_DIR, but only when it is empty or holds a training run (never a stranger's folder)."""
    import shutil

    from kosmos2_cli.train.checkpoints import STATE_JSON, checkpoints

    if not output.is_dir():
        raise CliError(f"{output}: exists and is not a folder; --overwrite only replaces a training run's folder")
    if any(output.iterdir()) and not ((output / STATE_JSON).is_file() or checkpoints(output)):
        raise CliError(f"{output}: holds files that are not a training run; --overwrite will not delete them "
                       "(choose another -o)")
    shutil.rmtree(output)


def _run(config, examples, skipped, reporter):
    from kosmos2_cli.train.loop import train as run_training

    with _progress(reporter) as on_step:
        return run_training(config, examples, on_step=on_step, note=reporter.note, skipped=skipped)


class _progress:
    """Progress: a bar with loss, images/s and time left on a terminal; a line every ~5% otherwise."""

    def __init__(self, reporter) -> None:
        self.reporter = reporter
        self.bar = None
        self.last_line = 0.0

    def __enter__(self):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        if not self.reporter.quiet and self.reporter.err.is_terminal:
            self.bar = Progress(TextColumn("training"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[rate]} images/s"),
                                TimeRemainingColumn(), console=self.reporter.err, transient=True)
            self.bar.__enter__()
            self.task = None
        return self.update

    def update(self, report) -> None:
        rate = report.images / report.seconds if report.seconds > 0 else 0.0
        if self.bar is not None:
            if self.task is None:
                self.task = self.bar.add_task("training", total=report.total, completed=report.step - 1, loss="",
                                              rate="")
            self.bar.update(self.task, completed=report.step, loss=f"{report.loss:.4f}", rate=f"{rate:.2f}")
            return
        if self.reporter.quiet:
            return
        every = max(1, report.total // 20)
        if report.step % every == 0 or report.step == report.total or time.monotonic() - self.last_line > 60:
            self.last_line = time.monotonic()
            left = (report.total - report.step) * report.seconds / max(1, report.done)
            self.reporter.note(f"step {report.step}/{report.total}: loss {report.loss:.4f}, lr {report.lr:.3g}, "
                               f"{rate:.2f} images/s, {_clock(left)} left")

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"
