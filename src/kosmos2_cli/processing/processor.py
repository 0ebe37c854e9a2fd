"""Kosmos-2's processor: prompt + image -> model inputs, and generated ids -> caption and boxes.

Same inputs, same outputs as transformers' `Kosmos2Processor` (token ids, masks, pixel values, `bboxes=`
handling, validation errors, post-processing), without transformers.

A prompt becomes `<s><image>` + 64 image-slot tokens + `</image>` + the text. The slots are ids 4..67 (the
first ids after `<unk>`), marked by `image_embeds_position_mask`; the model overwrites their embeddings with the
image features.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kosmos2_cli.processing.image_processing import Kosmos2ImageProcessor
from kosmos2_cli.processing.postprocess import (
    Entity,
    clean_text_and_extract_entities_with_bboxes,
    coordinate_to_patch_index,
)
from kosmos2_cli.processing.tokenizer import NUM_PATCH_INDEX_TOKENS, Kosmos2Tokenizer, pad_batch, to_tensor

BOI_TOKEN, EOI_TOKEN = "<image>", "</image>"
BOP_TOKEN, EOP_TOKEN = "<phrase>", "</phrase>"
BOO_TOKEN, EOO_TOKEN = "<object>", "</object>"
DOM_TOKEN = "</delimiter_of_multi_objects/>"
GRD_TOKEN = "<grounding>"

_PHRASE = re.compile(r"<phrase>.+?</phrase>")
_BBOXES_FORM = (
    "each element of `bboxes` (for one text) must be None, a tuple of 2 ints (patch indices), a tuple of 4 floats "
    "(normalized x1, y1, x2, y2), or a list of such tuples; also make sure `text` and `bboxes` are both batches "
    "or both single examples"
)


class BatchFeature(dict):
    """The processor's output: a dict whose keys are also attributes (`inputs.input_ids`)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def to(self, *args: Any, **kwargs: Any) -> BatchFeature:
        """Move torch tensors (`.to("cuda")`, `.to(torch.bfloat16)`); a dtype only applies to float tensors."""
        import torch

        device = kwargs.get("device")
        for arg in args:
            if isinstance(arg, (str, torch.device, int)):
                device = arg
        moved = BatchFeature()
        for key, value in self.items():
            if isinstance(value, torch.Tensor):
                if torch.is_floating_point(value):
                    value = value.to(*args, **kwargs)
                elif device is not None:
                    value = value.to(device=device)
            moved[key] = value
        return moved


class Kosmos2Processor:
    """Tokenizer + image processor + Kosmos-2's prompt layout and post-processing."""

    def __init__(
        self,
        image_processor: Kosmos2ImageProcessor,
        tokenizer: Kosmos2Tokenizer,
        num_patch_index_tokens: int = NUM_PATCH_INDEX_TOKENS,
    ):
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.num_patch_index_tokens = num_patch_index_tokens
        self.num_patches_per_side = int(math.sqrt(num_patch_index_tokens))

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike[str], revision: str | None = None) -> Kosmos2Processor:
        """From a model folder (`sentencepiece.bpe.model`, optional `preprocessor_config.json`) or a hub repo id."""
        folder = Path(name_or_path)
        if not folder.is_dir():
            from kosmos2_cli.model.hub import resolve_model_dir

            folder = Path(resolve_model_dir(str(name_or_path), revision=revision))
        return cls(Kosmos2ImageProcessor.from_pretrained(folder), Kosmos2Tokenizer.from_pretrained(folder))

    # --- inputs -------------------------------------------------------------------------------------------------

    def __call__(
        self,
        images: Any = None,
        text: str | Sequence[str] | None = None,
        bboxes: Any = None,
        *,
        add_special_tokens: bool = True,
        add_eos_token: bool = False,
        num_image_tokens: int = 64,
        first_image_token_id: int | None = None,
        padding: bool | str = False,
        padding_side: str | None = None,
        return_tensors: str | None = None,
        pixels: bool = True,
    ) -> BatchFeature:
        """Model inputs: `pixel_values` for images; `input_ids`, `attention_mask` for text; with both, also
        `image_embeds_position_mask` (1 where the image features go).

        `bboxes` links boxes to the text's `<phrase>...</phrase>` pairs, one entry per phrase: None, a box, or a
        list of boxes; a box is (patch_index, patch_index) ints or normalized (x1, y1, x2, y2) floats. For a batch
        of texts, a list of such lists. Texts with images are always padded to the longest (as in the
        reference); text alone only with `padding=True`.

        `pixels=False` builds only the text side of an image+text call, for images whose embeddings the caller
        already has (one encoding serves many prompts).
        """
        if images is None and text is None:
            raise ValueError("You have to specify either images or text.")
        # Prompts first: a mismatch between texts, images and boxes fails before any image is decoded.
        prompts = None if text is None else self.preprocess_examples(text, images, bboxes, num_image_tokens)
        encoding = BatchFeature()
        if images is not None and pixels:
            encoding.update(self.image_processor(images, return_tensors=return_tensors))
        if prompts is None:
            return encoding

        single = isinstance(prompts, str)
        batch = [prompts] if single else list(prompts)
        # The reference prepends the string "<s>" (or, with add_eos_token, lets the tokenizer wrap in <s> ... </s>).
        eos = add_special_tokens and add_eos_token
        ids = [self.tokenizer.encode(p, add_special_tokens=add_special_tokens, add_eos=eos) for p in batch]
        masks = [[1] * len(x) for x in ids]
        side = padding_side or self.tokenizer.padding_side

        if images is None:
            if padding not in (False, True, "longest", "do_not_pad"):
                raise ValueError(f"padding must be True, False, 'longest' or 'do_not_pad', got {padding!r}")
            if padding in (True, "longest"):
                ids, masks = pad_batch(ids, masks, self.tokenizer.pad_token_id, side)
            if single and return_tensors is None:
                encoding.update(input_ids=ids[0], attention_mask=masks[0])
            else:
                encoding.update(
                    input_ids=to_tensor(ids, return_tensors), attention_mask=to_tensor(masks, return_tensors)
                )
            return encoding

        if first_image_token_id is None:
            first_image_token_id = self.tokenizer.unk_token_id + 1
        # The image slots follow the real `<image>`, which comes right after `<s>` when there is one.
        start = int(add_special_tokens) + 1
        slots = list(range(first_image_token_id, first_image_token_id + num_image_tokens))
        position_masks = []
        for row, seq in enumerate(ids):
            ids[row] = seq[:start] + slots + seq[start + num_image_tokens :]
            mask = [0] * start + [1] * num_image_tokens + [0]
            position_masks.append(mask + [0] * (len(ids[row]) - len(mask)))
        if not single and len({len(x) for x in ids}) > 1:
            ids, masks = pad_batch(ids, masks, self.tokenizer.pad_token_id, side, extra=position_masks)
        if single and return_tensors is None:
            encoding.update(input_ids=ids[0], attention_mask=masks[0], image_embeds_position_mask=position_masks[0])
        else:
            encoding.update(
                input_ids=to_tensor(ids, return_tensors),
                attention_mask=to_tensor(masks, return_tensors),
                image_embeds_position_mask=to_tensor(position_masks, return_tensors),
            )
        return encoding

    def preprocess_examples(
        self,
        texts: str | Sequence[str],
        images: Any = None,
        bboxes: Any = None,
        num_image_tokens: int = 64,
    ) -> str | list[str]:
        """The prompt strings: stripped text after the image tokens (when there is an image), with each
        `<phrase>...</phrase>` followed by its boxes' `<object>...</object>` from `bboxes`."""
        image_info = " ".join([BOI_TOKEN] * (num_image_tokens + 1) + [EOI_TOKEN])
        single = isinstance(texts, str)
        texts = [texts] if single else list(texts)
        if images is None:
            images = [None] * len(texts)
        elif not isinstance(images, (list, tuple)):
            images = [images]
        if len(texts) != len(images):
            raise ValueError(
                f"The number of examples in `texts` and `images` should be the same. Got {len(texts)} v.s. "
                f"{len(images)} instead."
            )
        if single:
            self._check_bboxes_for_single_text(bboxes)
            bboxes = [bboxes]
        elif bboxes is not None:
            if not isinstance(bboxes, list):
                raise ValueError("`bboxes` should be `None` or a list (as a batch) when `texts` is passed as a batch.")
            for item in bboxes:
                self._check_bboxes_for_single_text(item)
        else:
            bboxes = [None] * len(texts)
        if len(bboxes) != len(texts):
            raise ValueError(
                f"The number of examples in `texts` and `bboxes` should be the same. Got {len(texts)} v.s. "
                f"{len(bboxes)} instead."
            )
        prompts = []
        for text, image, boxes in zip(texts, images, bboxes, strict=True):
            text = text.strip()
            if image is not None:
                text = f"{image_info} {text}"
            prompts.append(self._insert_patch_index_tokens(text, boxes))
        return prompts[0] if single else prompts

    @staticmethod
    def _check_bboxes_for_single_text(bboxes: Any) -> None:
        if bboxes is None:
            return
        if not isinstance(bboxes, list):
            raise ValueError("`bboxes` (for a single text example) should be `None` or a list.")
        for entry in bboxes:
            if entry is None:
                continue
            for box in entry if isinstance(entry, list) else [entry]:
                valid = isinstance(box, tuple) and (
                    (len(box) == 2 and all(isinstance(v, int) for v in box))
                    or (len(box) == 4 and all(isinstance(v, float) for v in box))
                )
                if not valid:
                    raise ValueError(f"{_BBOXES_FORM}; got {box!r}")

    def _insert_patch_index_tokens(self, text: str, bboxes: list | None) -> str:
        if not bboxes:
            return text
        phrases = list(_PHRASE.finditer(text))
        if len(phrases) != len(bboxes):
            raise ValueError(
                "The number of elements in `bboxes` should be the same as the number of `<phrase> ... </phrase>` "
                f"pairs in `text`. Got {len(phrases)} v.s. {len(bboxes)} instead."
            )
        parts = []
        done = 0
        for phrase, boxes in zip(phrases, bboxes, strict=True):
            parts.append(text[done : phrase.end()])
            done = phrase.end()
            if boxes is None:
                continue
            boxes = [boxes] if isinstance(boxes, tuple) else boxes
            if any(box is None for box in boxes):
                raise ValueError("The multiple bounding boxes for a single phrase should not contain any `None` value.")
            pairs = [" ".join(self._bbox_to_patch_index_tokens(box)) for box in boxes]
            if pairs:
                parts.append(f"{BOO_TOKEN} {f' {DOM_TOKEN} '.join(pairs)} {EOO_TOKEN}")
        parts.append(text[done:])
        return "".join(parts)

    def _bbox_to_patch_index_tokens(self, bbox: tuple) -> tuple[str, str]:
        if len(bbox) == 2:
            first, second = bbox
        else:
            first, second = coordinate_to_patch_index(bbox, self.num_patches_per_side)
        # str().zfill as the reference, which differs from a format spec only for odd input (e.g. bools).
        return f"<patch_index_{str(first).zfill(4)}>", f"<patch_index_{str(second).zfill(4)}>"

    # --- boxes for prompts ----------------------------------------------------------------------------------------

    def box_to_patch_index_tokens(
        self, box: Sequence[float], image_size: tuple[int, int] | None = None
    ) -> tuple[str, str]:
        """The two patch tokens of a box, as the reference's processor makes them from a normalized box.

        `box` is (x1, y1, x2, y2) in pixels of an image of `image_size` = (width, height), or normalized to 0..1
        when `image_size` is None. Raises ValueError for a box that is empty or outside the image.
        """
        return self._bbox_to_patch_index_tokens(normalize_box(box, image_size))

    def object_tokens(self, box: Sequence[float], image_size: tuple[int, int] | None = None) -> str:
        """`<object><patch_index_A><patch_index_B></object>` for a box (see `box_to_patch_index_tokens`)."""
        first, second = self.box_to_patch_index_tokens(box, image_size)
        return f"{BOO_TOKEN}{first}{second}{EOO_TOKEN}"

    # --- outputs --------------------------------------------------------------------------------------------------

    def batch_decode(self, sequences: Any, skip_special_tokens: bool = False) -> list[str]:
        return self.tokenizer.batch_decode(sequences, skip_special_tokens=skip_special_tokens)

    def decode(self, ids: Any, skip_special_tokens: bool = False) -> str | list[str]:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def post_process_generation(
        self, text: str, cleanup_and_extract: bool = True
    ) -> str | tuple[str, list[Entity]]:
        """The text after `</image>`: as is, or (caption without tags, entities with normalized boxes)."""
        caption = text.split(EOI_TOKEN)[-1]
        if cleanup_and_extract:
            return clean_text_and_extract_entities_with_bboxes(caption, self.num_patches_per_side)
        return caption

    def post_process_image_text_to_text(self, generated_outputs: Any, skip_special_tokens: bool = True) -> list[str]:
        """Decoded generations with the prompt's image part cut off (tags kept)."""
        texts = self.batch_decode(generated_outputs, skip_special_tokens=skip_special_tokens)
        return [self.post_process_generation(text, cleanup_and_extract=False) for text in texts]  # type: ignore[misc]

    @property
    def model_input_names(self) -> list[str]:
        names = [*self.tokenizer.model_input_names, *self.image_processor.model_input_names]
        return [*names, "image_embeds_position_mask"]


def normalize_box(box: Sequence[float], image_size: tuple[int, int] | None = None) -> tuple[float, float, float, float]:
    """(x1, y1, x2, y2) in pixels of an image of (width, height) -> normalized floats; already normalized when
    `image_size` is None. Checked: 4 finite numbers, x2 > x1, y2 > y1, inside the image (or 0..1)."""
    values = tuple(box)
    if len(values) != 4:
        raise ValueError(f"a box needs 4 numbers x1,y1,x2,y2; got {len(values)}")
    try:
        x1, y1, x2, y2 = (float(v) for v in values)
    except (TypeError, ValueError) as err:
        raise ValueError(f"a box needs 4 numbers x1,y1,x2,y2; got {values!r}") from err
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
        raise ValueError(f"box coordinates must be finite numbers; got {values!r}")
    if not (x2 > x1 and y2 > y1):
        raise ValueError(f"a box must have x2 > x1 and y2 > y1; got {_fmt(values)}")
    if image_size is None:
        width = height = 1.0
        where = "0..1 (normalized)"
    else:
        width, height = (float(v) for v in image_size)
        if width <= 0 or height <= 0:
            raise ValueError(f"image size must be positive; got {image_size!r}")
        where = f"the {image_size[0]}x{image_size[1]} image"
    if x1 < 0 or y1 < 0 or x2 > width or y2 > height:
        raise ValueError(f"box {_fmt(values)} is outside {where}")
    if image_size is None:
        return x1, y1, x2, y2
    return x1 / width, y1 / height, x2 / width, y2 / height


def _fmt(values: Sequence[Any]) -> str:
    return ",".join(f"{v:g}" if isinstance(v, (int, float)) else str(v) for v in values)
