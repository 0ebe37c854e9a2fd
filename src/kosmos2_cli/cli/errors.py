"""Exit codes of the `kosmos2` command and the error that carries one up to it."""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    FAILED = 1  # some images failed (each has its error line or record), or a drawing could not be written
    USAGE = 2  # the command line is wrong: unknown option, bad value, empty phrase, malformed box, missing input
    MODEL = 3  # the model cannot be found, downloaded or loaded (wrong folder, missing weights, offline)
    INTERNAL = 4  # an unexpected error: a bug (rerun with --debug for the traceback)
    INTERRUPTED = 130  # Ctrl-C (SIGINT); a batch stops cleanly, its output resumable
    TERMINATED = 143  # SIGTERM, handled as Ctrl-C


# The lower layers say what is wrong in their own words and name what the caller can change (`advice`); the
# command line says it in terms of its flags.
ADVICE = {
    "model": "--model takes a folder in the hub's layout, or a repo id",
    "download": "run `kosmos2 download` where the network is available, or pass --model with a local folder",
    "output": "choose another -o, or --overwrite to replace it",
    "memory": "try --dtype float16, another --device, or free the GPU",
    "phrase": "give one with --phrase",
    "box": "give it with --box",
    "normalized": "--normalized takes 0..1",
    "ray": 'install it with pip install "kosmos2-cli[ray]", or run without --ray',
    "ray_address": "start one with `ray start --head`, or leave out --ray-address for a local one",
    "ray_actors": "give fewer --ray-actors",
    "device": "choose another --device",
}


class CliError(Exception):
    """A user-facing failure: printed as one `error:` line, then the process exits with `code`."""

    def __init__(self, message: str, code: ExitCode = ExitCode.USAGE, hint: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.hint = hint

    @classmethod
    def of(cls, err: BaseException, code: ExitCode = ExitCode.USAGE) -> CliError:
        """`err` from a lower layer, its advice put in the command line's words."""
        advice = ADVICE.get(getattr(err, "advice", None) or "")
        return cls(f"{err}; {advice}" if advice else str(err), code)
