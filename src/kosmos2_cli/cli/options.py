"""The options every task command shares (DESIGN §4), declared once and gathered into a `Settings`.

`with_options` appends the shared options to a command's own parameters (Typer reads the signature), so each
command lists only what is its own, and receives the rest as one `settings` argument.
"""

import functools
import inspect
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Annotated, Any

import typer

from kosmos2_cli.cli.errors import CliError, ExitCode
from kosmos2_cli.model.hub import DEFAULT_MODEL

MODEL = "Model"
GENERATION = "Generation"
OUTPUT = "Output"
PERFORMANCE = "Performance"


@dataclass
class Settings:
    """The shared options' values."""

    model: str = DEFAULT_MODEL
    revision: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    max_new_tokens: int = 128
    num_beams: int = 1
    sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 50
    seed: int | None = None
    json: bool = False
    draw: Path | None = None
    annotate_dir: Path | None = None
    quiet: bool = False
    debug: bool = False
    batch_size: int = 0
    workers: int = 0

    def generation_options(self):
        """The pipeline's GenerationOptions (imports torch)."""
        from kosmos2_cli.api.pipeline import GenerationOptions

        return GenerationOptions(
            max_new_tokens=self.max_new_tokens, num_beams=self.num_beams, do_sample=self.sample,
            temperature=self.temperature, top_p=self.top_p, top_k=self.top_k or None, seed=self.seed,
        )

    def check(self) -> list[str]:
        """Raise CliError for values out of range; return warnings for options that will have no effect."""
        if self.temperature <= 0:
            raise CliError(f"--temperature must be above 0 (got {self.temperature:g})")
        if not 0 < self.top_p <= 1:
            raise CliError(f"--top-p must be in (0, 1] (got {self.top_p:g})")
        warnings = []
        if not self.sample:
            changed = [name for name, value, default in (("--temperature", self.temperature, 1.0),
                                                         ("--top-p", self.top_p, 1.0), ("--top-k", self.top_k, 50))
                       if value != default]
            if changed:
                warnings.append(f"{', '.join(changed)} only apply with --sample; decoding is greedy")
        return warnings


def _option(name: str, default: Any, annotation: Any) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)


SHARED: dict[str, inspect.Parameter] = {p.name: p for p in [
    _option("model", DEFAULT_MODEL, Annotated[str, typer.Option(
        "--model", "-m", metavar="REPO|DIR", envvar="KOSMOS2_MODEL", rich_help_panel=MODEL,
        help="Hub repo id (downloaded once into the Hugging Face cache) or a local folder in the hub's layout.")]),
    _option("revision", None, Annotated[str | None, typer.Option(
        "--revision", metavar="REV", rich_help_panel=MODEL, help="Hub branch, tag or commit of --model.")]),
    _option("device", "auto", Annotated[str, typer.Option(
        "--device", metavar="DEVICE", rich_help_panel=MODEL,
        help="auto, cpu, cuda or cuda:N (auto: CUDA when present).")]),
    _option("dtype", "auto", Annotated[str, typer.Option(
        "--dtype", metavar="DTYPE", rich_help_panel=MODEL,
        help="auto, float32, bfloat16, float16 or int8 (auto: bf16 on CUDA that has it, fp16 on older CUDA, fp32 on "
        "CPU; int8: CPU only, int8 weights, ~3x faster than fp32).")]),
    _option("max_new_tokens", 128, Annotated[int, typer.Option(
        "--max-new-tokens", metavar="N", min=1, rich_help_panel=GENERATION, help="Most tokens to generate.")]),
    _option("num_beams", 1, Annotated[int, typer.Option(
        "--num-beams", metavar="N", min=1, rich_help_panel=GENERATION, help="Beam search with N beams (1: none).")]),
    _option("sample", False, Annotated[bool, typer.Option(
        "--sample/--greedy", rich_help_panel=GENERATION, help="Sample tokens instead of taking the most likely.")]),
    _option("temperature", 1.0, Annotated[float, typer.Option(
        "--temperature", metavar="T", rich_help_panel=GENERATION, help="Sampling temperature (with --sample).")]),
    _option("top_p", 1.0, Annotated[float, typer.Option(
        "--top-p", metavar="P", rich_help_panel=GENERATION, help="Nucleus sampling: keep the top P of the "
        "probability mass (with --sample).")]),
    _option("top_k", 50, Annotated[int, typer.Option(
        "--top-k", metavar="K", min=0, rich_help_panel=GENERATION,
        help="Sample among the K likeliest tokens, 0 for all (with --sample).")]),
    _option("seed", None, Annotated[int | None, typer.Option(
        "--seed", metavar="N", rich_help_panel=GENERATION, help="Make sampling repeatable.")]),
    _option("json", False, Annotated[bool, typer.Option(
        "--json", rich_help_panel=OUTPUT, help="JSON lines on stdout, one per image (see README: Output).")]),
    _option("draw", None, Annotated[Path | None, typer.Option(
        "--draw", metavar="PATH", rich_help_panel=OUTPUT, dir_okay=False,
        help="Write the image with its boxes drawn (one image; .png, .jpg, .webp...).")]),
    _option("annotate_dir", None, Annotated[Path | None, typer.Option(
        "--annotate-dir", metavar="DIR", rich_help_panel=OUTPUT, file_okay=False,
        help="Write every image with its boxes drawn into DIR (same relative paths).")]),
    _option("quiet", False, Annotated[bool, typer.Option(
        "--quiet", "-q", rich_help_panel=OUTPUT, help="No progress, notes or summary; results and errors only.")]),
    _option("debug", False, Annotated[bool, typer.Option(
        "--debug", envvar="KOSMOS2_DEBUG", rich_help_panel=OUTPUT, help="Show tracebacks of unexpected errors.")]),
    _option("batch_size", 0, Annotated[int, typer.Option(
        "--batch-size", "-b", metavar="N", min=0, rich_help_panel=PERFORMANCE,
        help="Images in flight (0: on a GPU the largest of 8-256 that fits its free memory, 8 on a CPU; halved "
             "automatically when the device runs out of memory).")]),
    _option("workers", 0, Annotated[int, typer.Option(
        "--workers", metavar="N", min=0, rich_help_panel=PERFORMANCE,
        help="Threads decoding images ahead of the model (0: automatic).")]),
]}

assert set(SHARED) == {f.name for f in fields(Settings)}


def with_options(exclude: tuple[str, ...] = ()):
    """Give a command the shared options (less `exclude`); it receives them as `settings: Settings`."""

    def decorate(command):
        signature = inspect.signature(command)
        own = [p for p in signature.parameters.values() if p.name != "settings"]
        shared = [p for name, p in SHARED.items() if name not in exclude]

        @functools.wraps(command)
        def wrapper(**kwargs: Any):
            values = {name: kwargs.pop(name) for name in list(kwargs) if name in SHARED}
            return command(**kwargs, settings=Settings(**values))

        wrapper.__signature__ = signature.replace(parameters=own + shared)  # type: ignore[attr-defined]
        return wrapper

    return decorate


def exit_code_help() -> str:
    """The exit codes, for help texts."""
    return ", ".join(f"{int(code)} {code.name.lower()}" for code in ExitCode)
