"""What one command asks of every image: the task, its arguments, the pipeline jobs, one record per image.

A `TaskSpec` is checked once, before any image or model is touched, so a bad box or an empty phrase fails at
once; `check_image` then checks what depends on the picture (a pixel box must lie inside it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kosmos2_cli.api import prompts
from kosmos2_cli.api.prompts import PromptError
from kosmos2_cli.api.results import Entity, Failure, Result

if TYPE_CHECKING:
    from kosmos2_cli.api.pipeline import Job

GROUND_SEPARATOR = "; "  # between the phrases of a ground record's `text`


@dataclass(frozen=True)
class TaskSpec:
    """One task with its arguments, as the user gave them (phrases and question with whitespace collapsed)."""

    task: str
    detailed: bool = False
    phrases: tuple[str, ...] = ()
    question: str | None = None
    box: tuple[float, float, float, float] | None = None
    normalized: bool = False
    prompt_texts: tuple[str, ...] = field(default=(), compare=False)

    @classmethod
    def build(
        cls,
        task: str,
        *,
        detailed: bool = False,
        phrases: Sequence[str] = (),
        question: str | None = None,
        box: str | Sequence[float] | None = None,
        normalized: bool = False,
    ) -> TaskSpec:
        """A checked spec; raises PromptError for what cannot become a prompt (empty phrase, malformed box...)."""
        if task not in prompts.TASKS:
            raise PromptError(f"unknown task {task!r} (choose from {', '.join(prompts.TASKS)})")
        if task == "caption":
            return cls(task, detailed=detailed, prompt_texts=(prompts.caption_prompt(detailed),))
        if task == "ask":
            if question is None:
                raise PromptError("ask needs a question")
            built = prompts.ask_prompt(question)
            return cls(task, question=" ".join(question.split()), prompt_texts=(built,))
        if task == "ground":
            if not phrases:
                raise PromptError("ground needs at least one phrase", advice="phrase")
            built = [prompts.ground_prompt(p) for p in phrases]  # raises for an empty phrase
            # The same phrase twice would only repeat a row; keep the first.
            unique = dict.fromkeys(zip((" ".join(p.split()) for p in phrases), built, strict=True))
            return cls(task, phrases=tuple(p for p, _ in unique), prompt_texts=tuple(b for _, b in unique))
        if box is None:
            raise PromptError("refer needs a box x1,y1,x2,y2", advice="box")
        numbers = prompts.parse_box(box) if isinstance(box, str) else tuple(float(v) for v in box)
        if len(numbers) != 4:
            raise PromptError("a box needs four numbers x1,y1,x2,y2")
        x1, y1, x2, y2 = numbers
        if not (x1 < x2 and y1 < y2):
            raise PromptError(f"box {_fmt(numbers)} needs x1 < x2 and y1 < y2")
        if min(numbers) < 0 or (normalized and max(numbers) > 1):
            where = "0..1 (normalized)" if normalized else "the image (pixels are 0 or more)"
            raise PromptError(f"box {_fmt(numbers)} is not inside {where}", advice="normalized" if normalized else None)
        return cls(task, box=numbers, normalized=normalized)  # type: ignore[arg-type]

    def args(self) -> dict[str, Any]:
        """The task's arguments as record fields: with the image and task, what makes a record this query's."""
        if self.task == "caption":
            return {"detailed": self.detailed}
        if self.task == "ask":
            return {"question": self.question}
        if self.task == "ground":
            return {"phrases": list(self.phrases)}
        return {"box_arg": list(self.box or ()), "normalized": self.normalized}

    def check_image(self, width: int, height: int) -> None:
        """Raise PromptError when the task cannot run on a width x height image (a box outside it)."""
        if self.task == "refer" and self.box is not None:
            prompts.normalize_box(self.box, width, height, self.normalized)

    def jobs(self, image_index: int) -> list[Job]:
        """The pipeline jobs for one image of a batch."""
        from kosmos2_cli.api.pipeline import Job

        if self.task == "ground":
            return [Job(image_index, "ground", p, {"phrase": ph}) for p, ph in zip(self.prompt_texts, self.phrases,
                                                                                 strict=True)]
        if self.task == "refer":
            return [Job(image_index, "refer", "", {"box": self.box, "normalized": self.normalized})]
        return [Job(image_index, self.task, self.prompt_texts[0], {})]

    def image_jobs(self, name: str) -> list[Job]:
        """The jobs for the image `name` of a stream: the same for every image here; a spec whose prompts vary
        by image (eval's phrases per picture) overrides it, with `rows_per_image` and `record`."""
        return self.jobs(0)

    def rows_per_image(self) -> int:
        """About how many prompts one image brings (to turn a number of rows into a number of images)."""
        return len(self.jobs(0))

    def failure_record(self, failure: Failure) -> dict[str, Any]:
        """A failed image's record, with the task's arguments (so that resume recognises it)."""
        return {**failure.to_dict(), "task": self.task, **self.args()}

    def record(self, results: Sequence[Result]) -> Result:
        """One image's Result from its jobs' results (ground: all phrases in one), with the task's arguments."""
        merged = merge_ground(results) if self.task == "ground" else results[0]
        merged.extra = {**merged.extra, **self.args()}
        return merged

    def describe(self) -> str:
        """A short human label, e.g. `ground "a dog", "a cat"`."""
        if self.task == "caption":
            return "caption (detailed)" if self.detailed else "caption"
        if self.task == "ask":
            return f"ask {self.question!r}"
        if self.task == "ground":
            return "ground " + ", ".join(f"{p!r}" for p in self.phrases)
        unit = " (normalized)" if self.normalized else " px"
        return f"refer {_fmt(self.box or ())}{unit}"


def merge_ground(results: Sequence[Result]) -> Result:
    """One ground record from one Result per phrase (same image): what DESIGN §5 carries per image and task.

    `text` is the phrases joined by "; "; each placed phrase is an entity whose span indexes into it;
    `found` maps every phrase to whether the model placed it (a phrase not placed has no entity); `prompt` and
    `raw` are the phrases' prompts and generated texts, one per line.
    """
    if not results:
        raise ValueError("merge_ground needs at least one result")
    first = results[0]
    text = ""
    entities: list[Entity] = []
    found: dict[str, bool] = {}
    for result in results:
        phrase = result.extra.get("phrase", result.text)
        if text:
            text += GROUND_SEPARATOR
        start = len(text)
        text += phrase
        for entity in result.entities:
            entities.append(Entity(phrase, (start, start + len(phrase)), list(entity.boxes), list(entity.boxes_px),
                                   list(entity.scores)))
        found[phrase] = bool(result.entities)
    extra = {k: v for k, v in first.extra.items() if k not in ("phrase", "found")}
    extra["found"] = found
    return Result(
        first.image, first.width, first.height, "ground", "\n".join(r.prompt for r in results), text, entities,
        "\n".join(r.raw for r in results), extra,
    )


def _fmt(values: Sequence[float]) -> str:
    return ",".join(f"{v:g}" for v in values)


_ARG_FIELDS = {"caption": ("detailed",), "ask": ("question",), "ground": ("phrases",),
               "refer": ("box_arg", "normalized")}
_ARG_DEFAULTS = {"detailed": False, "normalized": False}


def record_key(record: dict[str, Any]) -> str | None:
    """What identifies a record's query: image path as given + task + the task's arguments (None if not one)."""
    task = record.get("task")
    image = record.get("image")
    if task not in _ARG_FIELDS or not isinstance(image, str):
        return None
    args = {name: record.get(name, _ARG_DEFAULTS.get(name)) for name in _ARG_FIELDS[task]}
    return _key(image, task, args)


def spec_key(spec: TaskSpec, image: str) -> str:
    """The key `record_key` gives for this spec's record of `image`."""
    return _key(image, spec.task, spec.args())


def _key(image: str, task: str, args: dict[str, Any]) -> str:
    import json

    return json.dumps([image, task, args], sort_keys=True, ensure_ascii=False)
