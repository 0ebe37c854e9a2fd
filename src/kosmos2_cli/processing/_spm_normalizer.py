"""SentencePiece's precompiled character map, applied the way HF `tokenizers` applies it.

The reference tokenizer (transformers' XLM-R tokenizer, built on `tokenizers`) does not normalize text as the
sentencepiece library does. `tokenizers`' `Precompiled` normalizer walks extended grapheme clusters: a cluster
shorter than 6 UTF-8 bytes whose start matches a key of the map is replaced *whole* by the first (shortest)
matching key's replacement, so any marks after that key are dropped ("e\u0301\u0302" -> "é"); longer clusters
are mapped character by character (so "\uff76\uff9e", exactly 6 bytes, is not composed). sentencepiece instead
takes the longest match anywhere. We reproduce the `tokenizers` behaviour because it decides the token ids.

Nothing here needs protobuf: the few fields we read are parsed straight from the wire format.
"""

from __future__ import annotations

import unicodedata
from array import array
from functools import lru_cache

# --- protobuf wire format (only what we need from sentencepiece's ModelProto) ---------------------------------


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return result, pos


def _fields(data: bytes):
    """Yield (field_number, value) for each field of a serialized protobuf message."""
    pos = 0
    while pos < len(data):
        key, pos = _read_varint(data, pos)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            value, pos = _read_varint(data, pos)
        elif wire_type == 1:
            value, pos = data[pos : pos + 8], pos + 8
        elif wire_type == 2:
            length, pos = _read_varint(data, pos)
            value, pos = data[pos : pos + length], pos + length
        elif wire_type == 5:
            value, pos = data[pos : pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire_type}")
        yield number, value


def precompiled_charsmap(model_proto: bytes) -> bytes:
    """The `normalizer_spec.precompiled_charsmap` of a serialized sentencepiece ModelProto (b"" if none)."""
    for number, value in _fields(model_proto):
        if number == 3:  # ModelProto.normalizer_spec
            for inner, inner_value in _fields(value):
                if inner == 2:  # NormalizerSpec.precompiled_charsmap
                    return bytes(inner_value)
    return b""


# --- grapheme clusters (UAX #29, the parts that can change the result) ------------------------------------------
#
# Only clusters shorter than 6 bytes with 2+ characters behave differently from per-character mapping, so the
# rules that matter are CR LF, control breaks, Extend/ZWJ/SpacingMark/Prepend attachment. Hangul, regional
# indicators and emoji sequences only form clusters of 6+ bytes, which are mapped per character either way; they
# are implemented for fidelity but an approximation there cannot change the output. GB9c (Indic conjuncts) is
# left out for the same reason. Properties come from Python's unicodedata (its Unicode version may lag the Rust
# crate's for characters assigned very recently).

_OTHER, _CR, _LF, _CONTROL, _EXTEND, _ZWJ, _RI, _PREPEND, _SPACING, _L, _V, _T, _LV, _LVT, _PICT = range(15)

_OTHER_GRAPHEME_EXTEND = frozenset(
    [0x09BE, 0x09D7, 0x0B3E, 0x0B57, 0x0BBE, 0x0BD7, 0x0CC2, 0x0CD5, 0x0CD6, 0x0D3E, 0x0D57, 0x0DCF, 0x0DDF, 0x1B35,
     0x200C, 0x302E, 0x302F, 0xFF9E, 0xFF9F, 0x1133E, 0x11357, 0x114B0, 0x114BD, 0x115AF, 0x11930, 0x1D165,
     0x1D16E, 0x1D16F, 0x1D170, 0x1D171, 0x1D172]
)
_PREPEND_CHARS = frozenset(
    [0x0600, 0x0601, 0x0602, 0x0603, 0x0604, 0x0605, 0x06DD, 0x070F, 0x0890, 0x0891, 0x08E2, 0x0D4E, 0x110BD,
     0x110CD, 0x111C2, 0x111C3, 0x1193F, 0x11941, 0x11A3A, 0x11A84, 0x11A85, 0x11A86, 0x11A87, 0x11A88, 0x11A89,
     0x11D46, 0x11F02]
)
_NOT_SPACING_MARK = frozenset(
    [0x102B, 0x102C, 0x1038, 0x1062, 0x1063, 0x1064, 0x1067, 0x1068, 0x1069, 0x106A, 0x106B, 0x106C, 0x106D, 0x1083,
     0x1087, 0x1088, 0x1089, 0x108A, 0x108B, 0x108C, 0x108F, 0x109A, 0x109B, 0x109C, 0x1A61, 0x1A63, 0x1A64, 0xAA7B,
     0xAA7D, 0x11720, 0x11721]
)
# Unassigned code points that are Default_Ignorable (so Control for grapheme breaking).
_IGNORABLE_UNASSIGNED = ((0x2065, 0x2065), (0xFFF0, 0xFFF8), (0xE0000, 0xE0000), (0xE0002, 0xE001F),
                         (0xE0080, 0xE00FF), (0xE01F0, 0xE0FFF))
_EXTENDED_PICTOGRAPHIC = (
    (0x00A9, 0x00A9), (0x00AE, 0x00AE), (0x203C, 0x203C), (0x2049, 0x2049), (0x2122, 0x2122), (0x2139, 0x2139),
    (0x2194, 0x2199), (0x21A9, 0x21AA), (0x231A, 0x231B), (0x2328, 0x2328), (0x2388, 0x2388), (0x23CF, 0x23CF),
    (0x23E9, 0x23F3), (0x23F8, 0x23FA), (0x24C2, 0x24C2), (0x25AA, 0x25AB), (0x25B6, 0x25B6), (0x25C0, 0x25C0),
    (0x25FB, 0x25FE), (0x2600, 0x2605), (0x2607, 0x2612), (0x2614, 0x2685), (0x2690, 0x2705), (0x2708, 0x2712),
    (0x2714, 0x2714), (0x2716, 0x2716), (0x271D, 0x271D), (0x2721, 0x2721), (0x2728, 0x2728), (0x2733, 0x2734),
    (0x2744, 0x2744), (0x2747, 0x2747), (0x274C, 0x274C), (0x274E, 0x274E), (0x2753, 0x2755), (0x2757, 0x2757),
    (0x2763, 0x2767), (0x2795, 0x2797), (0x27A1, 0x27A1), (0x27B0, 0x27B0), (0x27BF, 0x27BF), (0x2934, 0x2935),
    (0x2B05, 0x2B07), (0x2B1B, 0x2B1C), (0x2B50, 0x2B50), (0x2B55, 0x2B55), (0x3030, 0x3030), (0x303D, 0x303D),
    (0x3297, 0x3297), (0x3299, 0x3299), (0x1F000, 0x1F0FF), (0x1F10D, 0x1F10F), (0x1F12F, 0x1F12F),
    (0x1F16C, 0x1F171), (0x1F17E, 0x1F17F), (0x1F18E, 0x1F18E), (0x1F191, 0x1F19A), (0x1F1AD, 0x1F1E5),
    (0x1F201, 0x1F20F), (0x1F21A, 0x1F21A), (0x1F22F, 0x1F22F), (0x1F232, 0x1F23A), (0x1F23C, 0x1F23F),
    (0x1F249, 0x1F3FA), (0x1F400, 0x1F53D), (0x1F546, 0x1F64F), (0x1F680, 0x1F6FF), (0x1F774, 0x1F77F),
    (0x1F7D5, 0x1F7FF), (0x1F80C, 0x1F80F), (0x1F848, 0x1F84F), (0x1F85A, 0x1F85F), (0x1F888, 0x1F88F),
    (0x1F8AE, 0x1F8FF), (0x1F90C, 0x1F93A), (0x1F93C, 0x1F945), (0x1F947, 0x1FAFF), (0x1FC00, 0x1FFFD),
)


def _in_ranges(cp: int, ranges: tuple[tuple[int, int], ...]) -> bool:
    return any(lo <= cp <= hi for lo, hi in ranges)


@lru_cache(maxsize=8192)
def _break_property(ch: str) -> int:
    cp = ord(ch)
    if cp < 0x80:  # ASCII: the common case, decided without unicodedata
        if cp == 0x0D:
            return _CR
        if cp == 0x0A:
            return _LF
        return _CONTROL if cp < 0x20 or cp == 0x7F else _OTHER
    if cp == 0x200D:
        return _ZWJ
    if 0x1F1E6 <= cp <= 0x1F1FF:
        return _RI
    if cp in _PREPEND_CHARS:
        return _PREPEND
    if 0x1100 <= cp <= 0x115F or 0xA960 <= cp <= 0xA97C:
        return _L
    if 0x1160 <= cp <= 0x11A7 or 0xD7B0 <= cp <= 0xD7C6:
        return _V
    if 0x11A8 <= cp <= 0x11FF or 0xD7CB <= cp <= 0xD7FB:
        return _T
    if 0xAC00 <= cp <= 0xD7A3:
        return _LV if (cp - 0xAC00) % 28 == 0 else _LVT
    category = unicodedata.category(ch)
    if (
        category in ("Mn", "Me")
        or cp in _OTHER_GRAPHEME_EXTEND
        or 0x1F3FB <= cp <= 0x1F3FF
        or 0xE0020 <= cp <= 0xE007F
    ):
        return _EXTEND
    if category in ("Cc", "Cf", "Zl", "Zp", "Cs") or (category == "Cn" and _in_ranges(cp, _IGNORABLE_UNASSIGNED)):
        return _CONTROL
    if (category == "Mc" and cp not in _NOT_SPACING_MARK) or cp in (0x0E33, 0x0EB3):
        return _SPACING
    if _in_ranges(cp, _EXTENDED_PICTOGRAPHIC):
        return _PICT
    return _OTHER


def graphemes(text: str) -> list[str]:
    """Split `text` into extended grapheme clusters."""
    if not text:
        return []
    clusters = []
    start = 0
    prev = _break_property(text[0])
    emoji_state = prev == _PICT  # inside ExtPict Extend* (ZWJ)?
    ri_count = 1 if prev == _RI else 0
    for i in range(1, len(text)):
        cur = _break_property(text[i])
        if prev == _CR and cur == _LF:
            join = True
        elif prev in (_CONTROL, _CR, _LF) or cur in (_CONTROL, _CR, _LF):
            join = False
        elif prev == _L and cur in (_L, _V, _LV, _LVT):
            join = True
        elif prev in (_LV, _V) and cur in (_V, _T):
            join = True
        elif prev in (_LVT, _T) and cur == _T:
            join = True
        elif cur in (_EXTEND, _ZWJ, _SPACING) or prev == _PREPEND:
            join = True
        elif prev == _ZWJ and cur == _PICT and emoji_state:
            join = True
        elif prev == _RI and cur == _RI:
            join = ri_count % 2 == 1
        else:
            join = False
        if not join:
            clusters.append(text[start:i])
            start = i
        if cur == _PICT:
            emoji_state = True
        elif not (emoji_state and cur in (_EXTEND, _ZWJ) and prev != _ZWJ):
            emoji_state = False
        ri_count = ri_count + 1 if cur == _RI else 0
        prev = cur
    clusters.append(text[start:])
    return clusters


# --- the character map ------------------------------------------------------------------------------------------


class CharsMap:
    """A sentencepiece `precompiled_charsmap`: a Darts double-array trie of byte strings plus replacement strings."""

    def __init__(self, blob: bytes):
        if not blob:
            self._units = None
            return
        trie_bytes = int.from_bytes(blob[:4], "little")
        units = array("I")
        units.frombytes(blob[4 : 4 + trie_bytes])
        if units.itemsize != 4:  # pragma: no cover - array("I") is 4 bytes on every platform we support
            raise RuntimeError("unexpected array item size")
        self._units = units.tolist()
        self._replacements = blob[4 + trie_bytes :]

    def _first_match(self, key: bytes) -> str | None:
        """Replacement for the shortest key that is a prefix of `key` (Darts common-prefix search, first hit)."""
        units = self._units
        unit = units[0]
        node = (unit >> 10) << ((unit & (1 << 9)) >> 6)
        for byte in key:
            if byte == 0:
                return None
            node ^= byte
            if node >= len(units):
                return None
            unit = units[node]
            if (unit & ((1 << 31) | 0xFF)) != byte:
                return None
            node ^= (unit >> 10) << ((unit & (1 << 9)) >> 6)
            if (unit >> 8) & 1:
                start = units[node] & ((1 << 31) - 1)
                end = self._replacements.index(b"\0", start)
                return self._replacements[start:end].decode("utf-8")
        return None

    @lru_cache(maxsize=16384)  # noqa: B019 - one CharsMap per tokenizer, lives as long as the process
    def _transform(self, chunk: str) -> str | None:
        return self._first_match(chunk.encode("utf-8"))

    def normalize(self, text: str) -> str:
        if self._units is None:
            return text
        out = []
        for cluster in graphemes(text):
            if len(cluster.encode("utf-8")) < 6:
                replaced = self._transform(cluster)
                if replaced is not None:
                    out.append(replaced)
                    continue
            for ch in cluster:
                replaced = self._transform(ch)
                out.append(ch if replaced is None else replaced)
        return "".join(out)
