"""A request's fields (multipart form or JSON) as the checked TaskSpec and GenerationOptions the CLI would build.

Fields are named as the CLI's options (`detailed`, `phrase`/`phrases`, `box`, `normalized`, `question`,
`max_new_tokens`, `num_beams`, `sample`, `temperature`, `top_p`, `top_k`, `seed`); a bad value is a 400 with the
same words the CLI uses, its advice put in terms of fields instead of flags.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from kosmos2_cli.api.options import GenerationOptions
from kosmos2_cli.api.prompts import TASKS, PromptError
from kosmos2_cli.api.tasks import TaskSpec


class HTTPProblem(Exception):
    """A request the service refuses: its HTTP status and the one-line message of the JSON `error`."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


# The lower layers name what to change as `advice`; here it is said in the service's own terms.
ADVICE = {
    "phrase": "send it as the field phrase (repeat it for several)",
    "box": "send it as the field box, x1,y1,x2,y2",
    "normalized": "with normalized, the box is in 0..1",
}

TASK_FIELDS = {"caption": ("detailed",), "ground": ("phrase", "phrases"), "refer": ("box", "normalized"),
               "ask": ("question",)}
GENERATION_FIELDS = ("max_new_tokens", "num_beams", "sample", "temperature", "top_p", "top_k", "seed")
IMAGE_FIELDS = ("image", "image_base64", "filename")
MAX_PHRASES = 64


def bad(message: str) -> HTTPProblem:
    return HTTPProblem(400, message)


def worded(err: Exception) -> str:
    """A lower layer's error with its advice in the service's words."""
    advice = ADVICE.get(getattr(err, "advice", None) or "")
    return f"{err}; {advice}" if advice else str(err)


@dataclass
class Fields:
    """Field name -> values (a form may repeat a field; a JSON value counts once)."""

    values: dict[str, list[Any]]

    def one(self, name: str) -> Any:
        found = self.values.get(name) or []
        if len(found) > 1:
            raise bad(f"{name} is given {len(found)} times; give it once")
        return found[0] if found else None

    def all(self, name: str) -> list[Any]:
        return list(self.values.get(name) or [])


def check_names(task: str, fields: Fields) -> None:
    """Unknown fields, and task arguments of another task, are mistakes worth saying (a typo would be ignored)."""
    known = set(GENERATION_FIELDS) | set(IMAGE_FIELDS) | set(TASK_FIELDS[task])
    others = {name: owner for owner, names in TASK_FIELDS.items() for name in names if owner != task}
    for name in fields.values:
        if name in known:
            continue
        if name in others:
            raise bad(f"{name} does not apply to {task} (it is a {others[name]} field)")
        raise bad(f"unknown field {name!r} (fields: {', '.join(sorted(known))})")


def task_spec(task: str, fields: Fields) -> TaskSpec:
    """The checked TaskSpec, exactly as `kosmos2 TASK` builds it from the same arguments."""
    if task not in TASKS:
        raise HTTPProblem(404, f"unknown task {task!r} (choose from {', '.join(TASKS)})")
    check_names(task, fields)
    try:
        if task == "caption":
            return TaskSpec.build(task, detailed=_bool(fields, "detailed", False))
        if task == "ask":
            question = fields.one("question")
            if question is None:
                raise bad("ask needs a question; send it as the field question")
            return TaskSpec.build(task, question=_text("question", question))
        if task == "ground":
            phrases: list[str] = []
            for name in ("phrase", "phrases"):
                for value in fields.all(name):
                    values = value if isinstance(value, list) else [value]
                    phrases += [_text(name, v) for v in values]
            if len(phrases) > MAX_PHRASES:
                raise bad(f"{len(phrases)} phrases: at most {MAX_PHRASES} a request")
            return TaskSpec.build(task, phrases=phrases)
        box = fields.one("box")
        if box is not None and not isinstance(box, str):
            if not isinstance(box, list) or not all(isinstance(v, int | float) and not isinstance(v, bool)
                                                    for v in box):
                raise bad("box must be four numbers x1,y1,x2,y2 (a string or a list)")
            if not all(math.isfinite(v) for v in box):
                raise bad("box must be four finite numbers")
        return TaskSpec.build(task, box=box, normalized=_bool(fields, "normalized", False))
    except PromptError as err:
        raise bad(worded(err)) from err


def generation_options(fields: Fields, defaults: GenerationOptions, most_new_tokens: int) -> GenerationOptions:
    """This request's own options, checked as the CLI checks its flags; absent fields keep the server's."""
    new_tokens = _int(fields, "max_new_tokens", defaults.max_new_tokens, low=1)
    if new_tokens > most_new_tokens:
        raise bad(f"max_new_tokens is {new_tokens}; this server makes at most {most_new_tokens}")
    beams = _int(fields, "num_beams", 1, low=1)
    if beams != 1:
        raise bad("num_beams must be 1: beam search is not served (its beams cannot share rows with other "
                  "requests); use kosmos2 on the command line for it")
    temperature = _float(fields, "temperature", defaults.temperature)
    if temperature <= 0:
        raise bad(f"temperature must be above 0 (got {temperature:g})")
    top_p = _float(fields, "top_p", defaults.top_p)
    if not 0 < top_p <= 1:
        raise bad(f"top_p must be in (0, 1] (got {top_p:g})")
    top_k = _int(fields, "top_k", defaults.top_k or 0, low=0)
    seed = fields.one("seed")
    return GenerationOptions(max_new_tokens=new_tokens, num_beams=1,
                             do_sample=_bool(fields, "sample", defaults.do_sample), temperature=temperature,
                             top_p=top_p, top_k=top_k or None,
                             seed=defaults.seed if seed is None else _int(fields, "seed", 0))


def _text(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise bad(f"{name} must be text")
    return value


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off", "")


def _bool(fields: Fields, name: str, default: bool) -> bool:
    value = fields.one(name)
    if value is None:
        return default
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    raise bad(f"{name} must be true or false (got {value!r})")


def _int(fields: Fields, name: str, default: int, low: int | None = None) -> int:
    value = fields.one(name)
    if value is None:
        return default
    try:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError
        number = int(value.strip()) if isinstance(value, str) else int(value)
    except (TypeError, ValueError):
        raise bad(f"{name} must be a whole number (got {value!r})") from None
    if low is not None and number < low:
        raise bad(f"{name} must be at least {low} (got {number})")
    return number


def _float(fields: Fields, name: str, default: float) -> float:
    value = fields.one(name)
    if value is None:
        return default
    try:
        if isinstance(value, bool):
            raise ValueError
        number = float(value.strip()) if isinstance(value, str) else float(value)
    except (TypeError, ValueError):
        raise bad(f"{name} must be a number (got {value!r})") from None
    if not math.isfinite(number):
        raise bad(f"{name} must be a finite number (got {value!r})")
    return number
