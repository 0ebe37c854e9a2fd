"""The reference implementation (transformers' Kosmos-2) as a test oracle.

Everything here imports transformers lazily: it is a test-only dependency, and the package itself must never
import it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path


def _find_shared() -> Path:
    """`shared/` beside the project root, or beside one of its ancestors (a git worktree under a sub-folder);
    `KOSMOS2_CLI_SHARED` overrides."""
    if os.environ.get("KOSMOS2_CLI_SHARED"):
        return Path(os.environ["KOSMOS2_CLI_SHARED"])
    root = Path(__file__).resolve().parents[1]
    for parent in root.parents:
        if (parent / "shared" / "fixtures").is_dir():
            return parent / "shared"
    return root.parent / "shared"


SHARED = _find_shared()
FIXTURES = SHARED / "fixtures"
SP_MODEL = FIXTURES / "kosmos2" / "sentencepiece.bpe.model"
IMAGES = FIXTURES / "images"

# preprocessor_config.json of microsoft/kosmos-2-patch14-224.
RELEASED_PREPROCESSOR_CONFIG = {
    "crop_size": {"height": 224, "width": 224},
    "do_center_crop": True,
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_processor_type": "CLIPImageProcessor",
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "processor_class": "Kosmos2Processor",
    "resample": 3,
    "rescale_factor": 0.00392156862745098,
    "size": {"shortest_edge": 224},
    "use_square_size": True,
}


def fixture_images() -> list[Path]:
    return sorted(p for p in IMAGES.iterdir() if p.suffix.lower() in {".png", ".jpg", ".jpeg"})


def write_tokenizer_files(folder: Path) -> None:
    """Put the released tokenizer files (as the hub has them) into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(SP_MODEL, folder / "sentencepiece.bpe.model")
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "XLMRobertaTokenizer", "processor_class": "Kosmos2Processor"})
    )
    (folder / "preprocessor_config.json").write_text(json.dumps(RELEASED_PREPROCESSOR_CONFIG, indent=2))


_REF_PROCESSOR = {}


def reference_processor(folder: Path | None = None, **image_kwargs):
    """transformers' Kosmos2Processor with the released tokenizer and image settings (PIL backend)."""
    key = (str(folder), tuple(sorted(image_kwargs.items())))
    if key in _REF_PROCESSOR:
        return _REF_PROCESSOR[key]
    import tempfile

    from transformers import Kosmos2Processor, XLMRobertaTokenizer
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    if folder is None:
        folder = Path(tempfile.mkdtemp(prefix="kosmos2-tok-"))
        write_tokenizer_files(folder)
    tokenizer = XLMRobertaTokenizer.from_pretrained(str(folder))
    settings = {k: v for k, v in RELEASED_PREPROCESSOR_CONFIG.items() if k not in ("image_processor_type",
                                                                                    "processor_class")}
    settings.update(image_kwargs)
    image_processor = CLIPImageProcessorPil(**settings)
    processor = Kosmos2Processor(image_processor, tokenizer)
    _REF_PROCESSOR[key] = processor
    return processor


def tiny_config(
    text: dict | None = None, vision: dict | None = None, latent_query_num: int = 8, vocab_size: int = 65037
):
    """A small Kosmos2Config of the reference (real vocabulary, real 224x224/14 image geometry)."""
    from transformers import Kosmos2Config

    text_config = dict(
        vocab_size=vocab_size, embed_dim=48, layers=2, ffn_dim=96, attention_heads=4, max_position_embeddings=512,
        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
    )
    text_config.update(text or {})
    vision_config = dict(
        hidden_size=40, intermediate_size=72, num_hidden_layers=2, num_attention_heads=4, image_size=224,
        patch_size=14,
    )
    vision_config.update(vision or {})
    return Kosmos2Config(text_config=text_config, vision_config=vision_config, latent_query_num=latent_query_num)


def save_reference_checkpoint(folder: Path, config, seed: int = 0, init_scale: float | None = None):
    """Build a randomly initialised reference model and save it in the hub's layout; returns the model.

    `init_scale` multiplies every weight's init by a factor so that tiny random models give sharp, non-flat
    logits (greedy choices then have clear margins and tests are not decided by rounding).
    """
    import torch
    from transformers import Kosmos2ForConditionalGeneration

    torch.manual_seed(seed)
    model = Kosmos2ForConditionalGeneration(config).eval()
    if init_scale is not None:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" not in name and "layrnorm" not in name:
                    p.mul_(init_scale)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder))
    write_tokenizer_files(folder)
    return model
