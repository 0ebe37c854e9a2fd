"""The `kosmos2` command (placeholder until the full CLI lands)."""

from __future__ import annotations

import typer

from kosmos2_cli import __version__

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Kosmos-2 grounding on the command line.")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"kosmos2-cli {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Show the version."),
) -> None:
    """Kosmos-2 grounding on the command line."""


@app.command()
def info() -> None:
    """Show versions."""
    typer.echo(f"kosmos2-cli {__version__}")


def main() -> None:
    app()
