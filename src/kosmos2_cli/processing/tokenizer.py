"""Kosmos-2's tokenizer: the released SentencePiece model with the fairseq offset, plus Kosmos-2's added tokens.

It reproduces transformers' `XLMRobertaTokenizer` (the `tokenizers`-based one Kosmos-2's processor wraps) id for
id, which differs from plain sentencepiece in places that matter:

- Added tokens (`<s>`, `<phrase>`, `<patch_index_0044>`, ...) are cut out of the raw text first, leftmost-longest;
  the Kosmos-2 tokens also swallow the whitespace before them (lstrip). Each piece of text between them is
  tokenized on its own, so a word right after a tag gets its own "▁" ("of<phrase>a" -> "▁of", "<phrase>", "▁a").
- Normalization is `tokenizers`' reading of the precompiled charsmap (see `_spm_normalizer`).
- Words are split on Unicode whitespace (Rust's definition), each gets a "▁" prefix and is further split at "▁".
- The Unigram Viterbi sums scores in float64, breaks ties towards the first candidate found (shorter pieces,
  earlier starts), scores an unknown character min_score - 10 and fuses consecutive unknowns into one `<unk>`.
  sentencepiece sums in float32 and could pick a different segmentation on near ties.
- Strings of the vocabulary's special pieces can still be produced by normalization ("＜s＞" -> "<s>" -> id 0),
  as in the reference, because its Unigram vocabulary holds them with score 0.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from kosmos2_cli.processing._spm_normalizer import CharsMap, precompiled_charsmap

SP_MODEL_FILE = "sentencepiece.bpe.model"

BOS_TOKEN, PAD_TOKEN, EOS_TOKEN, UNK_TOKEN, MASK_TOKEN = "<s>", "<pad>", "</s>", "<unk>", "<mask>"

# Kosmos-2's tag tokens, in the order the reference adds them (their ids follow `<mask>`).
TAG_TOKENS = (
    "</doc>",
    "<image>",
    "</image>",
    "</chunk>",
    "</line>",
    "<phrase>",
    "</phrase>",
    "<object>",
    "</object>",
    "</delimiter_of_multi_objects/>",
    "<grounding>",
)
NUM_PATCH_INDEX_TOKENS = 1024

# Rust's `char::is_whitespace` (Unicode White_Space), which `tokenizers` splits words on. Python's str.split()
# also splits on U+001C..U+001F, so it cannot be used.
_WHITESPACE = (
    "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a"
    "\u2028\u2029\u202f\u205f\u3000"
)
_WHITESPACE_RUN = re.compile(f"[{re.escape(_WHITESPACE)}]+")
_METASPACE = "\u2581"
_UNK_PENALTY = 10.0


def patch_index_token(index: int) -> str:
    """The token of grid cell `index` (row-major on the 32 x 32 grid): `<patch_index_0044>`."""
    return f"<patch_index_{index:04d}>"


class Kosmos2Tokenizer:
    """Text <-> ids, identical to the reference's Kosmos-2 tokenizer (65,037 ids for the released model)."""

    padding_side = "right"
    model_input_names = ("input_ids", "attention_mask")

    def __init__(self, model_file: str | Path, num_patch_index_tokens: int = NUM_PATCH_INDEX_TOKENS):
        import sentencepiece

        proto = Path(model_file).read_bytes()
        processor = sentencepiece.SentencePieceProcessor(model_proto=proto)
        size = processor.get_piece_size()
        # fairseq's layout: <s> <pad> </s> <unk>, then sentencepiece's pieces from id 3 on, shifted by one.
        vocab: list[tuple[str, float]] = [(BOS_TOKEN, 0.0), (PAD_TOKEN, 0.0), (EOS_TOKEN, 0.0), (UNK_TOKEN, 0.0)]
        vocab += [(processor.id_to_piece(i), processor.get_score(i)) for i in range(3, size)]
        vocab.append((MASK_TOKEN, 0.0))
        self._pieces = [piece for piece, _ in vocab]
        self._scores = [score for _, score in vocab]
        self._piece_to_id = {piece: i for i, piece in enumerate(self._pieces)}
        self._piece_prefixes = {piece[:k] for piece in self._pieces for k in range(1, len(piece) + 1)}
        self._unk_score = min(self._scores) - _UNK_PENALTY
        self._charsmap = CharsMap(precompiled_charsmap(proto))

        self.num_patch_index_tokens = num_patch_index_tokens
        self.added_tokens = list(TAG_TOKENS) + [patch_index_token(i) for i in range(num_patch_index_tokens)]
        self._added_to_id = {token: len(vocab) + i for i, token in enumerate(self.added_tokens)}
        self._special_to_id = {token: self._piece_to_id[token] for token in self.all_special_tokens}
        self.all_special_ids = frozenset(self._special_to_id.values())
        every = {**self._special_to_id, **self._added_to_id}
        self._id_to_added = {i: token for token, i in every.items()}
        # Longest first: Python's regex alternation then finds the leftmost-longest match, like Aho-Corasick.
        self._added_pattern = re.compile("|".join(re.escape(t) for t in sorted(every, key=len, reverse=True)))
        self._word_cache: dict[str, list[int]] = {}
        self._encoded: dict[str, tuple[int, ...]] = {}
        self._tokens: list[str] | None = None

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> Kosmos2Tokenizer:
        """Load from a model folder holding `sentencepiece.bpe.model` (the hub's layout)."""
        path = Path(folder) / SP_MODEL_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no SentencePiece model ({SP_MODEL_FILE}) in {folder}")
        return cls(path)

    # --- vocabulary ---------------------------------------------------------------------------------------------

    all_special_tokens = (BOS_TOKEN, EOS_TOKEN, UNK_TOKEN, PAD_TOKEN, MASK_TOKEN)
    bos_token, eos_token, unk_token, pad_token, mask_token = BOS_TOKEN, EOS_TOKEN, UNK_TOKEN, PAD_TOKEN, MASK_TOKEN

    @property
    def bos_token_id(self) -> int:
        return self._special_to_id[BOS_TOKEN]

    @property
    def eos_token_id(self) -> int:
        return self._special_to_id[EOS_TOKEN]

    @property
    def pad_token_id(self) -> int:
        return self._special_to_id[PAD_TOKEN]

    @property
    def unk_token_id(self) -> int:
        return self._special_to_id[UNK_TOKEN]

    @property
    def mask_token_id(self) -> int:
        return self._special_to_id[MASK_TOKEN]

    def __len__(self) -> int:
        return len(self._pieces) + len(self.added_tokens)

    @property
    def vocab_size(self) -> int:
        """Size of the SentencePiece part (with the fairseq specials and `<mask>`), as the reference reports it."""
        return len(self._pieces)

    def get_vocab(self) -> dict[str, int]:
        return {**self._piece_to_id, **self._added_to_id}

    def convert_tokens_to_ids(self, tokens: str | Iterable[str]) -> int | list[int]:
        """Token string(s) to id(s); unknown strings give the `<unk>` id, as in the reference."""
        if isinstance(tokens, str):
            return self._token_to_id(tokens)
        return [self._token_to_id(t) for t in tokens]

    def _token_to_id(self, token: str) -> int:
        found = self._added_to_id.get(token)
        if found is None:
            found = self._piece_to_id.get(token, self.unk_token_id)
        return found

    def convert_ids_to_tokens(
        self, ids: int | Iterable[int], skip_special_tokens: bool = False
    ) -> str | None | list[str | None]:
        """Id(s) to token string(s); an id outside the vocabulary gives None (reference: same)."""
        ids = _to_list(ids)
        if isinstance(ids, int):
            return self._id_to_token(ids)
        return [self._id_to_token(i) for i in ids if not (skip_special_tokens and i in self.all_special_ids)]

    def _id_to_token(self, index: int) -> str | None:
        if index < 0:
            raise ValueError(f"token id {index} is negative")
        added = self._id_to_added.get(index)
        if added is not None:
            return added
        return self._pieces[index] if index < len(self._pieces) else None

    # --- encoding -----------------------------------------------------------------------------------------------

    def tokenize(self, text: str) -> list[str]:
        """Token strings of `text` (no `<s>`/`</s>` added)."""
        return [self._id_to_token(i) for i in self._encode_text(text)]  # type: ignore[misc]

    def encode(self, text: str, add_special_tokens: bool = True, add_eos: bool | None = None) -> list[int]:
        """Ids of `text`. `add_special_tokens` puts `<s>` first; `add_eos` (default: same) puts `</s>` last.

        With the defaults this equals the reference tokenizer's `encode(text)` (`<s> ... </s>`); Kosmos-2's
        processor wants `<s>` without `</s>` (`add_eos=False`).
        """
        ids = self._encoded.get(text)
        if ids is None:  # prompts repeat (a batch asks the same of every image): remember recent ones
            ids = tuple(self._encode_text(text))
            if len(self._encoded) >= 4096:
                self._encoded.clear()
            self._encoded[text] = ids
        ids = list(ids)
        if add_eos is None:
            add_eos = add_special_tokens
        return ([self.bos_token_id] if add_special_tokens else []) + ids + ([self.eos_token_id] if add_eos else [])

    def __call__(
        self,
        text: str | Sequence[str],
        add_special_tokens: bool = True,
        padding: bool | str = False,
        return_tensors: str | None = None,
        padding_side: str | None = None,
    ) -> dict[str, Any]:
        """Batch encoding as the reference tokenizer's `__call__`: `input_ids` and `attention_mask`.

        A single string gives flat lists (or a batch of one with `return_tensors`). `padding=True`/"longest" pads
        a batch to its longest sequence with `<pad>` on `padding_side` (default `self.padding_side`).
        """
        single = isinstance(text, str)
        texts = [text] if single else list(text)
        for item in texts:
            if not isinstance(item, str):
                raise TypeError(f"text must be a string or a list of strings, got an item of type {type(item)}")
        ids = [self.encode(t, add_special_tokens=add_special_tokens) for t in texts]
        masks = [[1] * len(x) for x in ids]
        if padding not in (False, True, "longest", "do_not_pad"):
            raise ValueError(f"padding must be True, False, 'longest' or 'do_not_pad', got {padding!r}")
        if padding in (True, "longest") and ids:
            ids, masks = pad_batch(ids, masks, self.pad_token_id, padding_side or self.padding_side)
        if single and return_tensors is None:
            return {"input_ids": ids[0], "attention_mask": masks[0]}
        return {"input_ids": to_tensor(ids, return_tensors), "attention_mask": to_tensor(masks, return_tensors)}

    def _encode_text(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"text must be a string, got {type(text)}")
        ids: list[int] = []
        start = 0
        for match in self._added_pattern.finditer(text):
            token = match.group()
            token_start = match.start()
            if token in self._added_to_id:  # Kosmos-2's tokens are lstrip: they take the whitespace before them
                while token_start > start and text[token_start - 1] in _WHITESPACE:
                    token_start -= 1
            ids += self._encode_plain(text[start:token_start])
            ids.append(self._added_to_id.get(token, self._special_to_id.get(token)))  # type: ignore[arg-type]
            start = match.end()
        ids += self._encode_plain(text[start:])
        return ids

    def encode_continuation(self, text: str) -> list[int]:
        """Ids of text as the model writes it after what came before (a prompt, a tag): tags are single tokens,
        and a piece of text that does not start with a space gets no dummy "▁" (Kosmos-2 writes `</object>.`,
        which `encode` would read as `</object> .`). What training data must hold for the answers it teaches."""
        ids: list[int] = []
        start = 0
        for match in self._added_pattern.finditer(text):
            ids += self._encode_plain(text[start:match.start()], prefix_first=False)
            token = match.group()
            ids.append(self._added_to_id.get(token, self._special_to_id.get(token)))  # type: ignore[arg-type]
            start = match.end()
        ids += self._encode_plain(text[start:], prefix_first=False)
        return ids

    def _encode_plain(self, text: str, prefix_first: bool = True) -> list[int]:
        """Ids of text that holds no added token (`prefix_first` False: no "▁" before a first word that does not
        follow whitespace)."""
        ids: list[int] = []
        if not text:
            return ids
        normalized = self._charsmap.normalize(text)
        for at, word in enumerate(_WHITESPACE_RUN.split(normalized)):
            if not word:
                continue
            if at == 0 and not prefix_first and not word.startswith(_METASPACE):
                for chunk in re.split(f"(?={_METASPACE})", word):
                    if chunk:
                        ids += self._viterbi(chunk)
                continue
            ids += self._encode_word(word)
        return ids

    def _encode_word(self, word: str) -> list[int]:
        cached = self._word_cache.get(word)
        if cached is not None:
            return cached
        ids: list[int] = []
        marked = word if word.startswith(_METASPACE) else _METASPACE + word
        # Split before every "▁" (no piece has one inside), as the reference's Metaspace pre-tokenizer does.
        for chunk in re.split(f"(?={_METASPACE})", marked):
            if chunk:
                ids += self._viterbi(chunk)
        if len(self._word_cache) >= 100_000:
            self._word_cache.clear()
        self._word_cache[word] = ids
        return ids

    def _viterbi(self, text: str) -> list[int]:
        """Best Unigram segmentation of `text`, exactly as `tokenizers`' `Unigram::encode_optimized`."""
        n = len(text)
        score = [0.0] * (n + 1)
        back = [-1] * (n + 1)  # start of the best piece ending here
        node_id = [0] * (n + 1)
        piece_to_id, scores, prefixes, unk = self._piece_to_id, self._scores, self._piece_prefixes, self.unk_token_id
        for i in range(n):
            base = score[i]
            has_single = False
            for j in range(i + 1, n + 1):
                sub = text[i:j]
                if sub not in prefixes:
                    break
                piece = piece_to_id.get(sub)
                if piece is None:
                    continue
                candidate = base + scores[piece]
                if back[j] < 0 or candidate > score[j]:
                    score[j], back[j], node_id[j] = candidate, i, piece
                if j == i + 1:
                    has_single = True
            if not has_single:
                candidate = base + self._unk_score
                if back[i + 1] < 0 or candidate > score[i + 1]:
                    score[i + 1], back[i + 1], node_id[i + 1] = candidate, i, unk
        ids: list[int] = []
        end = n
        while end > 0:
            piece = node_id[end]
            if not (piece == unk and ids and ids[-1] == unk):  # consecutive unknowns fuse into one <unk>
                ids.append(piece)
            end = back[end]
        ids.reverse()
        return ids

    # --- decoding -----------------------------------------------------------------------------------------------

    def decode(self, ids: Any, skip_special_tokens: bool = False) -> str | list[str]:
        """Text of one sequence of ids (a batch gives a list), as the reference's `decode`.

        Every "▁" becomes a space except in the first token kept, where they are dropped; ids outside the
        vocabulary are skipped; with `skip_special_tokens` the `<s> <pad> </s> <unk> <mask>` ids are dropped
        (the Kosmos-2 tag and patch tokens are kept: they are not special).
        """
        ids = _to_list(ids)
        if isinstance(ids, int):
            ids = [ids]
        if ids and isinstance(ids[0], list):
            return [self._decode_one(seq, skip_special_tokens) for seq in ids]
        return self._decode_one(ids, skip_special_tokens)

    def batch_decode(self, sequences: Any, skip_special_tokens: bool = False) -> list[str]:
        """Texts of a batch of id sequences."""
        sequences = _to_list(sequences)
        if not sequences:
            return []
        if not isinstance(sequences[0], list):
            sequences = [sequences]
        return [self._decode_one(seq, skip_special_tokens) for seq in sequences]

    def _decode_one(self, ids: list[int], skip_special_tokens: bool) -> str:
        table = self._id_table()
        if ids and min(ids) < 0:
            raise ValueError(f"token id {min(ids)} is negative")
        skip = self.all_special_ids if skip_special_tokens else ()
        tokens = [table[i] for i in ids if i < len(table) and i not in skip]  # ids past the vocabulary: dropped
        if not tokens:
            return ""
        # The first piece's "▁" is the dummy prefix (dropped); the others' are spaces. Tags hold no "▁".
        return tokens[0].replace(_METASPACE, "") + "".join(tokens[1:]).replace(_METASPACE, " ")

    def _id_table(self) -> list[str]:
        """Every id's token, for decoding by list lookups (a batch job decodes two sequences per image)."""
        if self._tokens is None:
            self._tokens = [self._id_to_token(i) for i in range(len(self))]
        return self._tokens


def _to_list(values: Any) -> Any:
    """Plain Python ints/lists from torch tensors, numpy arrays, tuples."""
    if hasattr(values, "tolist"):
        return values.tolist()
    if isinstance(values, (list, tuple)):
        if all(type(v) is int for v in values) or all(type(v) is list and all(type(i) is int for i in v)
                                                      for v in values):
            return values if isinstance(values, list) else list(values)  # already plain: no per-item calls
        return [_to_list(v) for v in values]
    return values


def pad_batch(
    ids: list[list[int]], masks: list[list[int]], pad_id: int, side: str, extra: list[list[int]] | None = None
) -> tuple[list[list[int]], list[list[int]]]:
    """Pad id and mask rows to the longest row (`side`: "right" or "left"); `extra` rows get 0s in place."""
    if side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', got {side!r}")
    longest = max(len(x) for x in ids)

    def fill(row: list[int], value: int) -> list[int]:
        pad = [value] * (longest - len(row))
        return row + pad if side == "right" else pad + row

    if extra is not None:
        extra[:] = [fill(row, 0) for row in extra]
    return [fill(row, pad_id) for row in ids], [fill(row, 0) for row in masks]


def to_tensor(rows: Any, return_tensors: str | None) -> Any:
    """Lists of rows as the requested type: None keeps lists, "pt" a torch tensor, "np" a numpy array."""
    if return_tensors is None:
        return rows
    if any(len(r) != len(rows[0]) for r in rows):
        raise ValueError(
            "Sequences in the batch have different lengths: pass padding=True to get tensors "
            f"(return_tensors={return_tensors!r})."
        )
    if return_tensors == "pt":
        import torch

        return torch.tensor(rows, dtype=torch.long)
    if return_tensors == "np":
        import numpy as np

        return np.array(rows, dtype=np.int64)
    raise ValueError(f"return_tensors must be None, 'pt' or 'np', got {return_tensors!r}")
