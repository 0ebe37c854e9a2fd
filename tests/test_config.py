"""Kosmos2Config against the reference's: fields, defaults, aliases, and config.json in both directions."""

from __future__ import annotations

import json

import pytest

from kosmos2_cli import Kosmos2Config, Kosmos2TextConfig, Kosmos2VisionConfig

# PreTrainedConfig's generic keys (label maps, output flags, ...): not Kosmos-2 fields, kept as extra keys.
SUB_CONFIGS = ("text_config", "vision_config")


def reference_fields(cls) -> set[str]:
    """The fields a reference config class declares itself (not those of PreTrainedConfig)."""
    return {name for name in cls.__annotations__ if not name.startswith("_")}


def test_defaults_and_fields_equal_the_reference():
    import transformers

    ref, ours = transformers.Kosmos2Config(), Kosmos2Config()
    ref_dict, our_dict = ref.to_dict(), ours.to_dict()
    for key, ref_cls in (("text_config", transformers.Kosmos2TextConfig),
                         ("vision_config", transformers.Kosmos2VisionConfig)):
        names = reference_fields(ref_cls)
        assert names, key
        assert names <= set(our_dict[key]), names - set(our_dict[key])
        assert {k: our_dict[key][k] for k in names} == {k: ref_dict[key][k] for k in names}
        assert our_dict[key]["model_type"] == ref_dict[key]["model_type"]
    for name in reference_fields(transformers.Kosmos2Config) - set(SUB_CONFIGS):
        assert our_dict[name] == ref_dict[name], name
    assert our_dict["model_type"] == ref_dict["model_type"] == "kosmos-2"
    assert ours.latent_query_num == 64 and ours.text_config.vocab_size == 65037


def test_aliases_as_the_reference():
    import transformers

    ref = transformers.Kosmos2TextConfig(layers=3, embed_dim=64, attention_heads=4)
    ours = Kosmos2TextConfig(layers=3, embed_dim=64, attention_heads=4)
    for name in ("hidden_size", "num_hidden_layers", "num_attention_heads"):
        assert getattr(ours, name) == getattr(ref, name), name
    # The reference's alias names are accepted on the way in too (as its attribute_map allows).
    assert Kosmos2TextConfig.from_dict({"hidden_size": 32, "num_hidden_layers": 2}).embed_dim == 32
    with pytest.raises(AttributeError):
        _ = ours.nothing_like_this


@pytest.mark.parametrize("form", ["dicts", "objects"])
def test_constructor_like_the_reference(form):
    import transformers

    text = {"layers": 2, "embed_dim": 32, "attention_heads": 4, "ffn_dim": 64, "dropout": 0.0}
    vision = {"hidden_size": 16, "num_hidden_layers": 1, "patch_size": 16, "image_size": 64}
    ref = transformers.Kosmos2Config(text_config=text, vision_config=vision, latent_query_num=7)
    if form == "dicts":
        ours = Kosmos2Config(text_config=text, vision_config=vision, latent_query_num=7)
    else:
        ours = Kosmos2Config(Kosmos2TextConfig(**text), Kosmos2VisionConfig(**vision), 7)
    for key in SUB_CONFIGS:
        mine = ours.to_dict()[key]
        theirs = ref.to_dict()[key]
        assert mine == {k: theirs[k] for k in mine}
    assert ours.vision_config.num_patches == 16 and ours.text_config.head_dim == 8


def test_reads_what_the_reference_writes_and_back(tmp_path):
    """A reference config.json (a model's, with generic keys) -> ours -> config.json -> the reference: equal."""
    import transformers

    ref = transformers.Kosmos2Config(text_config={"layers": 3, "dropout": 0.05}, vision_config={"image_size": 112},
                                     latent_query_num=16, output_hidden_states=True, id2label={0: "a", 1: "b"})
    ref.architectures = ["Kosmos2ForConditionalGeneration"]
    ref.save_pretrained(tmp_path / "ref")
    written = json.loads((tmp_path / "ref" / "config.json").read_text())

    ours = Kosmos2Config.from_pretrained(tmp_path / "ref")
    assert ours.text_config.layers == 3 and ours.text_config.dropout == 0.05
    assert ours.vision_config.image_size == 112 and ours.latent_query_num == 16
    ours.save_pretrained(tmp_path / "ours")
    ours_json = json.loads((tmp_path / "ours" / "config.json").read_text())
    for key, value in written.items():  # every key the reference wrote comes back, value unchanged
        if key in SUB_CONFIGS:
            assert {k: ours_json[key][k] for k in value} == value, key
        else:
            assert ours_json[key] == value, key

    again = transformers.Kosmos2Config.from_pretrained(tmp_path / "ours")
    assert again.to_dict() == transformers.Kosmos2Config.from_pretrained(tmp_path / "ref").to_dict()
    assert Kosmos2Config.from_pretrained(tmp_path / "ours") == ours


def test_released_style_config_round_trips(tmp_path):
    """The hub's config.json was written by transformers 4 with every generic key in each sub-config."""
    import transformers

    full = json.loads(transformers.Kosmos2Config().to_json_string(use_diff=False))
    full["text_config"]["bad_words_ids"] = None  # keys of older releases that no current class knows
    full["vision_config"]["torchscript"] = False
    (tmp_path / "config.json").write_text(json.dumps(full))
    ours = Kosmos2Config.from_pretrained(tmp_path)
    assert ours == Kosmos2Config.from_dict(full)
    ours.save_pretrained(tmp_path / "out")
    out = json.loads((tmp_path / "out" / "config.json").read_text())
    for key in SUB_CONFIGS:
        assert out[key] == full[key]
    assert {k: out[k] for k in full} == full


def test_cross_attention_is_refused():
    from kosmos2_cli.model.text import TextTransformer

    config = Kosmos2TextConfig(layers=1, embed_dim=8, attention_heads=2, ffn_dim=8, vocab_size=10,
                               add_cross_attention=True)
    with pytest.raises(ValueError, match="add_cross_attention"):
        TextTransformer(config)
