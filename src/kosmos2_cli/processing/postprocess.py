"""Turning Kosmos-2's tagged text into a caption and entities with boxes.

The model writes `<phrase> a snowman</phrase><object><patch_index_0044><patch_index_0863></object>`: a phrase
and one or more boxes, each box two cells of a square grid (top-left cell, bottom-right cell), several boxes
joined by `</delimiter_of_multi_objects/>`. These functions give exactly what the reference's post-processing
gives (the Kosmos-2 authors' demo code), quirks included, because users compare results across the two:

- a phrase must not contain "<"; an `<object>` without a phrase before it yields one entity per box, named
  `<patch_index_X><patch_index_Y>` with unpadded numbers and an empty span at the `<object>`;
- anything of the form `<...>` (on one line) is removed from the text, tags or not;
- `\\d` is Python's Unicode digit class, so patch numbers in other scripts' digits are read too;
- patch indices are not range-checked: an index past the grid gives coordinates past 1.
"""

from __future__ import annotations

import math
import re

Box = tuple[float, float, float, float]
Entity = tuple[str, tuple[int, int], list[Box]]

_PAIR = r"<patch_index_\d+><patch_index_\d+>"
_ENTITY = re.compile(
    rf"(?:(<phrase>([^<]+)</phrase>))?<object>((?:{_PAIR}</delimiter_of_multi_objects/>)*{_PAIR})</object>"
)
_PATCH = re.compile(r"<patch_index_(\d+)>")
_ANY_TAG = re.compile("<.*?>")
_DELIMITER = "</delimiter_of_multi_objects/>"


def coordinate_to_patch_index(bbox: Box, num_patches_per_side: int) -> tuple[int, int]:
    """Normalized box (x1, y1, x2, y2) to the indices of its top-left and bottom-right grid cells.

    A cell is taken when the box covers any part of it; the box must have x2 > x1 and y2 > y1.
    """
    x1, y1, x2, y2 = bbox
    if not (x2 > x1 and y2 > y1):
        raise ValueError(f"a box must be (x1, y1, x2, y2) with x2 > x1 and y2 > y1, got {tuple(bbox)}")
    first_col, first_row = math.floor(x1 * num_patches_per_side), math.floor(y1 * num_patches_per_side)
    last_col = math.ceil(x2 * num_patches_per_side - 1)
    last_row = math.ceil(y2 * num_patches_per_side - 1)
    return first_row * num_patches_per_side + first_col, last_row * num_patches_per_side + last_col


def patch_index_to_coordinate(ul_idx: int, lr_idx: int, num_patches_per_side: int) -> Box:
    """Two grid cells to a normalized box (x1, y1, x2, y2).

    Cells in one row or column give the cells' outer edges; otherwise the box runs between the cells' centres
    (the Kosmos-2 authors' convention).
    """
    cell = 1.0 / num_patches_per_side
    ul_row, ul_col = divmod(ul_idx, num_patches_per_side)
    lr_row, lr_col = divmod(lr_idx, num_patches_per_side)
    if ul_col == lr_col or ul_row == lr_row:
        return ul_col * cell, ul_row * cell, lr_col * cell + cell, lr_row * cell + cell
    half = cell / 2
    return ul_col * cell + half, ul_row * cell + half, lr_col * cell + half, lr_row * cell + half


def extract_entities_with_patch_indices(text: str) -> list[tuple[str, tuple[int, int], list[tuple[int, int]]]]:
    """Entities of tagged `text` with their spans in `text` and boxes as (cell, cell) pairs."""
    entities = []
    for match in _ENTITY.finditer(text):
        boxes = []
        for pair in match.group(3).split(_DELIMITER):
            first, second = _PATCH.findall(pair)
            boxes.append((int(first), int(second)))
        if match.group(1):
            entities.append((match.group(2), match.span(2), boxes))
        else:
            at = match.start()
            entities += [(f"<patch_index_{a}><patch_index_{b}>", (at, at), [(a, b)]) for a, b in boxes]
    return entities


def box_patch_ordinals(text: str) -> list[list[tuple[int, int]]]:
    """For each entity `extract_entities_with_patch_indices` finds in `text`, for each of its boxes: the ordinals
    of the box's two `<patch_index_N>` tags among all such tags of `text` (0 = the first one in the text). Box
    scores come from the probabilities of the tokens these tags stand for."""
    out: list[list[tuple[int, int]]] = []
    for match in _ENTITY.finditer(text):
        first = len(_PATCH.findall(text, 0, match.start(3)))
        count = len(match.group(3).split(_DELIMITER))
        pairs = [(first + 2 * i, first + 2 * i + 1) for i in range(count)]
        out += [pairs] if match.group(1) else [[pair] for pair in pairs]
    return out


def adjust_entity_positions(entity: tuple[str, tuple[int, int]], text: str) -> tuple[str, tuple[int, int]]:
    """Move an entity's span from tagged `text` to the text with every `<...>` removed."""
    name, (start, end) = entity
    return name, (len(_ANY_TAG.sub("", text[:start])), len(_ANY_TAG.sub("", text[:end])))


def _strip_spaces(text: str, entities: list[Entity]) -> tuple[str, list[Entity]]:
    """Strip the text and each entity name, keeping the spans pointing at the stripped names."""
    leading = len(text) - len(text.lstrip())
    cleaned = []
    for name, (start, end), boxes in entities:
        name_leading = len(name) - len(name.lstrip())
        name_trailing = len(name) - len(name.rstrip())
        cleaned.append((name.strip(), (start - leading + name_leading, end - leading - name_trailing), boxes))
    return text.strip(), cleaned


def clean_text_and_extract_entities_with_bboxes(text: str, num_patches_per_side: int = 32) -> tuple[str, list[Entity]]:
    """Caption without tags, and its entities: (phrase, (start, end) in the caption, [normalized boxes])."""
    entities = []
    for name, span, pairs in extract_entities_with_patch_indices(text):
        name, span = adjust_entity_positions((name, span), text)
        entities.append((name, span, [patch_index_to_coordinate(a, b, num_patches_per_side) for a, b in pairs]))
    return _strip_spaces(_ANY_TAG.sub("", text), entities)
