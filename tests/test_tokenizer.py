"""Our tokenizer against the reference's (transformers' XLM-R tokenizer with Kosmos-2's added tokens)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from oracle import SP_MODEL, reference_processor
from processor_helpers import our_tokenizer, random_text

from kosmos2_cli.processing.tokenizer import NUM_PATCH_INDEX_TOKENS, TAG_TOKENS, Kosmos2Tokenizer, patch_index_token


@pytest.fixture(scope="module")
def ref(shared_fixtures):
    return reference_processor().tokenizer


@pytest.fixture(scope="module")
def tok(shared_fixtures):
    return our_tokenizer()


def ref_ids(ref, texts: list[str], add_special_tokens: bool = False) -> list[list[int]]:
    return ref(texts, add_special_tokens=add_special_tokens)["input_ids"]


def assert_same_ids(ref, tok, texts: list[str]) -> None:
    expected = ref_ids(ref, texts)
    for text, want in zip(texts, expected, strict=True):
        got = tok.encode(text, add_special_tokens=False)
        assert got == want, f"{text!r}: {tok.convert_ids_to_tokens(got)} != {ref.convert_ids_to_tokens(want)}"


def assert_same_decoding(ref, tok, sequences: list[list[int]]) -> None:
    for skip in (False, True):
        assert tok.batch_decode(sequences, skip_special_tokens=skip) == ref.batch_decode(
            sequences, skip_special_tokens=skip
        )


# --- vocabulary ---------------------------------------------------------------------------------------------------


def test_vocabulary_layout(ref, tok):
    assert len(tok) == len(ref) == 65037
    assert (tok.bos_token_id, tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert tok.mask_token_id == ref.mask_token_id == 64001
    assert tok.vocab_size == ref.vocab_size
    added = list(TAG_TOKENS) + [patch_index_token(i) for i in range(NUM_PATCH_INDEX_TOKENS)]
    assert tok.convert_tokens_to_ids(added) == ref.convert_tokens_to_ids(added) == list(range(64002, 65037))
    assert tok.convert_ids_to_tokens(list(range(64002, 65037))) == added
    assert set(tok.all_special_ids) == set(ref.all_special_ids)
    assert tok.get_vocab() == ref.get_vocab()


def test_token_id_conversions_match(ref, tok):
    rng = random.Random(0)
    ids = list(range(0, 70)) + rng.sample(range(65037), 500) + [65036, 65037, 70000]
    assert tok.convert_ids_to_tokens(ids) == ref.convert_ids_to_tokens(ids)
    tokens = [t for t in ref.convert_ids_to_tokens(ids) if t is not None] + ["not-a-token", "▁snowman", ""]
    assert tok.convert_tokens_to_ids(tokens) == ref.convert_tokens_to_ids(tokens)
    assert tok.convert_tokens_to_ids("<phrase>") == 64007
    with pytest.raises(ValueError):
        tok.convert_ids_to_tokens([-1])


def test_from_pretrained(tmp_path, shared_fixtures):
    with pytest.raises(FileNotFoundError, match="sentencepiece.bpe.model"):
        Kosmos2Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "sentencepiece.bpe.model").symlink_to(SP_MODEL)
    assert len(Kosmos2Tokenizer.from_pretrained(tmp_path)) == 65037


# --- encoding -----------------------------------------------------------------------------------------------------


def test_every_tag_token_in_context(ref, tok):
    texts = []
    for tag in TAG_TOKENS:
        texts += [
            tag, f"a{tag}b", f"a {tag} b", f"a  {tag}  b", f"a\t{tag}\nb", f"{tag}{tag}", f"{tag} {tag}", f" {tag}",
            f"word{tag}", f"x.{tag},y", f"<{tag}>", f"{tag[:-1]}", f"{tag}{tag[1:]}",
        ]
    assert_same_ids(ref, tok, texts)


def test_every_patch_index_token_in_context(ref, tok):
    separators = ["", " ", "  ", "\t", "\n", "x", " . "]
    texts = []
    for i in range(NUM_PATCH_INDEX_TOKENS):
        left, right = separators[i % 7], separators[(i // 7) % 7]
        texts.append(f"<object>{left}{patch_index_token(i)}{right}<patch_index_{1023 - i:04d}></object>{right}end")
    texts += ["<patch_index_1024>", "<patch_index_44>", "<patch_index_00044>", "<patch_index_0044", "patch_index_0044>"]
    assert_same_ids(ref, tok, texts)


def test_special_tokens_in_text(ref, tok):
    texts = [
        "<s>", "</s>", "<pad>", "<unk>", "<mask>", "a<s>b</s>", "a <s> b", "x<unk>y<mask>z<pad>", "<s><s>",
        "<grounding><s>", "＜s＞", "＜unk＞ x", "＜/s＞", "<<s>>", "<s", "s>",
    ]
    assert_same_ids(ref, tok, texts)


UNICODE_TEXTS = [
    "日本語のテキスト", "中文句子，有标点。", "한국어 문장입니다", "Ελληνικά κείμενα", "Русский текст",
    "עברית מימין לשמאל",
    "العربية من اليمين", "हिन्दी पाठ", "ภาษาไทย", "Tiếng Việt có dấu", "emoji 😀😁 🙈 x😀y", "👍🏽 👨‍👩‍👧 🇫🇷🇩🇪 ❤️ #️⃣",
    "café naïve façade", "cafe\u0301 nai\u0308ve", "e\u0301\u0302 e\u0301\u0302\u0303 ﬁ\u0301", "\uff76\uff9e \uff76",
    "Ｆｕｌｌｗｉｄｔｈ ＡＢＣ １２３", "ﬁ ﬂ ﬀ ﬃ ﬄ", "½ ² ³ ℌ ℍ Ⅻ ① ㎏", "ǅ Ǆ ǆ ĳ", "\u1100\u1161\u11a8 가각",
    "a\u200bb\u200cc\u200dd\ufeffe", "x\u0085y\u1680z\u2028w\u2029v\u3000u", "a\x1cb\x1fc\x00d\x7fe",
    "tab\tand\nnewline",
    "ｶﾞｷﾞ", "Å Å Å", "\u0600a \u06dd1", "¨ ´ ¸ ˘", "\U0001d400\U0001d401", "\U000e0061 tag", "\ud7b0\ud7cb",
]
SPACING_TEXTS = [
    "", " ", "   ", "\t", "\n\n", " a", "a ", "  a  b  ", "a\t\tb", "a\r\nb", "a\rb", "\u00a0a\u00a0", "a\u2003b",
    "▁", "▁a", "a▁b", "▁▁x", "x▁", "a ▁ b", "hello   world", "  <grounding>  An   image  of  ",
]


def test_unicode_and_spacing(ref, tok):
    assert_same_ids(ref, tok, UNICODE_TEXTS + SPACING_TEXTS)


def test_long_text(ref, tok):
    rng = random.Random(1)
    words = ["snowman", "fire", "a", "the", "warming", "himself", "by", "<phrase>", "</phrase>", "Ünïcödé", "日本"]
    text = " ".join(rng.choice(words) for _ in range(3000))
    assert_same_ids(ref, tok, [text, text.replace(" ", ""), "x" * 5000, "😀" * 300])


def test_kosmos2_prompts(ref, tok):
    texts = [
        "<grounding> An image of",
        "<grounding> Describe this image in detail:",
        "<grounding><phrase> a snowman</phrase>",
        "<grounding><phrase> It</phrase><object><patch_index_0044><patch_index_0863></object> is",
        "<grounding> Question: What is special about this image? Answer:",
        "<grounding> An image of<phrase> a snowman</phrase><object><patch_index_0044><patch_index_0863></object> "
        "warming himself by<phrase> a fire</phrase><object><patch_index_0005><patch_index_0911></object>.",
        "<phrase>two dogs</phrase><object><patch_index_0001><patch_index_0500></delimiter_of_multi_objects/>"
        "<patch_index_0600><patch_index_1023></object>",
    ]
    assert_same_ids(ref, tok, texts)
    for text in texts:
        assert tok.encode(text) == ref(text)["input_ids"]  # with <s> ... </s>
        assert tok.encode(text, add_eos=False) == ref(text)["input_ids"][:-1]


def _fuzz_pools(rng: random.Random) -> list:
    return [
        lambda: rng.choice("abcdefghijklmnopqrstuvwxyzABCXYZ0123456789.,!?'\"-()"),
        lambda: rng.choice(" \t\n\r\x0b\x0c\x85\xa0\u1680\u2000\u2028\u202f\u3000\u200b\u200c\u200d\ufeff\u2581\x1c"),
        lambda: chr(rng.randint(0x300, 0x36F)),
        lambda: rng.choice("ﬁﬂ½²ªºÅĳǆ①㎏ＡＺａｚ０９ｶﾞﾟ¨´"),
        lambda: chr(rng.randint(0x4E00, 0x4E80)),
        lambda: chr(rng.randint(0x1F300, 0x1F64F)),
        lambda: chr(rng.choice([0x1F3FB, 0xFE0F, 0x20E3, 0x1F1E6, 0x1F1E8, 0x200D])),
        lambda: chr(rng.randint(0x1100, 0x11FF)),
        lambda: chr(rng.randint(0xAC00, 0xAC40)),
        lambda: chr(rng.randint(0x900, 0x97F)),
        lambda: chr(rng.randint(0x600, 0x6FF)),
        lambda: chr(rng.randint(0xFF00, 0xFFEF)),
        lambda: chr(rng.randint(0x80, 0x2FFF)),
        lambda: rng.choice(["<phrase>", "</phrase>", "<object>", "<patch_index_0001>", "<s>", "</s>", "<unk>", "<"]),
        lambda: rng.choice(["▁the", "snow", "man", " a", "ing", "tion"]),
    ]


def test_fuzz_against_reference(ref, tok):
    """Random mixtures of scripts, combining marks, odd whitespace, charsmap keys and tags (fixed seed)."""
    rng = random.Random(1234)
    pools = _fuzz_pools(rng)
    texts = [random_text(rng, pools, 14) for _ in range(1500)]
    assert_same_ids(ref, tok, texts)
    sequences = [[0, *ids, 2] for ids in ref_ids(ref, texts)]
    assert_same_decoding(ref, tok, sequences)


def test_normalization_matches_tokenizers_precompiled(tok, shared_fixtures):
    """The charsmap step alone, against `tokenizers`' Precompiled normalizer (clearer failures than ids)."""
    from tokenizers import normalizers

    from kosmos2_cli.processing._spm_normalizer import precompiled_charsmap

    reference = normalizers.Precompiled(precompiled_charsmap(SP_MODEL.read_bytes()))
    rng = random.Random(99)
    pools = _fuzz_pools(rng)
    for text in [random_text(rng, pools, 10) for _ in range(1500)] + UNICODE_TEXTS + SPACING_TEXTS:
        assert tok._charsmap.normalize(text) == reference.normalize_str(text), [hex(ord(c)) for c in text]


def test_normalization_on_grapheme_edge_cases(tok, shared_fixtures):
    """Sequences where grapheme boundaries decide the result: marks (Mn, Mc, Me) after charsmap keys, prepended
    concatenation marks, controls, CR LF, emoji and regional indicators, Hangul jamo."""
    import unicodedata

    from tokenizers import normalizers

    from kosmos2_cli.processing._spm_normalizer import precompiled_charsmap

    reference = normalizers.Precompiled(precompiled_charsmap(SP_MODEL.read_bytes()))
    spacing = [chr(c) for c in range(0x900, 0x1100) if unicodedata.category(chr(c)) == "Mc"]
    pools = [
        spacing + ["\u0e33", "\u0eb3", "\u102b", "\u1038"],
        [chr(c) for c in range(0x300, 0x370)] + list("\u0483\u0591\u064b\u0610\u20d7\u20e3\ufe0f\u200c\u200d\uff9e"),
        list("\u0600\u0601\u06dd\u070f\u08e2\u0d4e"),
        list("\r\n\t\x00\u200b\u2028\ufeff\u00ad\u0085\u180e\u2060"),
        list("²³¹ªºµ½¼¾ÀÁÂÃÄÅĲĳǅǆǈſƷʰʲaeiouAEIOUnNcCsSzZ<=>"),
        list("©®\u203c\u2122\u2764\U0001f600\U0001f1e6\U0001f1e8\U0001f3fb"),
        list("\u1100\u1161\u11a8\uac00\uac01"),
        list("ab ."),
    ]
    rng = random.Random(5)
    for _ in range(3000):
        text = "".join(rng.choice(rng.choice(pools)) for _ in range(rng.randint(1, 7)))
        assert tok._charsmap.normalize(text) == reference.normalize_str(text), [hex(ord(c)) for c in text]


def test_where_sentencepiece_differs_we_follow_the_reference(ref, tok):
    """Inputs where plain sentencepiece gives other ids than the reference; ours must give the reference's.

    - "e\u0301\u0302": `tokenizers` maps the 5-byte grapheme by its first charsmap key ("e\u0301" -> "é") and drops
      the rest; sentencepiece keeps the circumflex.
    - "\uff76\uff9e" (halfwidth ｶﾞ): a grapheme of 6+ bytes is mapped per character by `tokenizers`, giving
      "カ" + a combining mark (unknown), where sentencepiece composes "ガ"; "e\u0301\u0302\u0303" likewise.
    - "＜s＞": NFKC turns it into "<s>", which the reference's Unigram vocabulary scores 0 and picks (id 0).
    - "a<phrase>b": the added token splits the text before normalization, so "b" starts a new word ("▁b").
    """
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(SP_MODEL))

    def sp_ids(text: str) -> list[int]:
        return [{0: 3, 1: 0, 2: 2}.get(i, i + 1) for i in sp.encode(text)]

    for text in ["e\u0301\u0302", "\uff76\uff9e", "e\u0301\u0302\u0303", "＜s＞", "a<phrase>b"]:
        want = ref(text, add_special_tokens=False)["input_ids"]
        assert tok.encode(text, add_special_tokens=False) == want
        assert sp_ids(text) != want, text


# --- batch encoding -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("return_tensors", [None, "pt", "np"])
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_call_with_padding(ref, tok, return_tensors, padding_side):
    texts = ["<grounding> An image of", "a", "<phrase> a snowman</phrase> by the fire ok"]
    want = ref(texts, padding=True, padding_side=padding_side, return_tensors=return_tensors)
    got = tok(texts, padding=True, padding_side=padding_side, return_tensors=return_tensors)
    for key in ("input_ids", "attention_mask"):
        assert type(got[key]) is type(want[key])
        if return_tensors:
            assert got[key].dtype == want[key].dtype
        assert np.array_equal(np.asarray(got[key]), np.asarray(want[key]))


def test_call_single_and_unpadded(ref, tok):
    assert tok("a snowman") == dict(ref("a snowman"))
    assert tok(["a snowman", "x"]) == dict(ref(["a snowman", "x"]))
    assert tok("a", add_special_tokens=False) == dict(ref("a", add_special_tokens=False))
    pt = tok("a snowman", return_tensors="pt")
    assert torch.equal(pt["input_ids"], ref("a snowman", return_tensors="pt")["input_ids"])
    with pytest.raises(ValueError, match="padding=True"):
        tok(["a snowman", "x"], return_tensors="pt")
    with pytest.raises(ValueError, match="return_tensors"):
        tok("a", return_tensors="tf")
    with pytest.raises(TypeError):
        tok([1, 2])


# --- decoding -----------------------------------------------------------------------------------------------------


def test_decode_round_trips(ref, tok):
    texts = UNICODE_TEXTS + SPACING_TEXTS + [
        "<grounding> An image of<phrase> a snowman</phrase><object><patch_index_0044><patch_index_0863></object>.",
        "a , b . c ! don't", "<s> a</s><unk><pad><mask> b",
    ]
    sequences = [[0, *ids, 2] for ids in ref_ids(ref, texts)] + [ids for ids in ref_ids(ref, texts)]
    assert_same_decoding(ref, tok, sequences)
    for seq in sequences[:20]:
        for skip in (False, True):
            assert tok.decode(seq, skip_special_tokens=skip) == ref.decode(seq, skip_special_tokens=skip)


def test_decode_odd_ids(ref, tok):
    cases = [
        [], [5], [70000, 5, 6], [0, 0, 2, 2], [1, 1, 10], [3, 3, 106], [64001, 106, 64003], [106], [106, 106, 10],
        [64012, 712], [0, 64003] + list(range(4, 68)) + [64004, 64012, 712, 1648, 9],
    ]
    assert_same_decoding(ref, tok, cases)
    assert tok.decode(5) == ref.decode(5)
    assert tok.decode(torch.tensor([[0, 712], [0, 9]])) == ref.decode(torch.tensor([[0, 712], [0, 9]]))
    assert tok.batch_decode(np.array([[0, 712, 2]]), skip_special_tokens=True) == ["An"]
    assert tok.batch_decode([]) == []
