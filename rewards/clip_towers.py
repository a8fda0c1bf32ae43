"""CLIP image and text towers behind one small interface, from open_clip or transformers.

CLIP score, PickScore, HPSv2 and the LAION aesthetic predictor all embed images
(and most embed text) with a CLIP; only the backbone library and the
preprocessing differ. ``ClipTowers.encode_image`` takes *preprocessed* pixels;
``ClipTowers.transform`` turns [-1, 1] images into them, in torch.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor, nn

from .preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImageTransform
from .weights import WeightsNotFoundError, find_file, find_folder, load_state_dict


class ClipTowers(nn.Module):
    """Unnormalised CLIP embeddings plus the model's preprocessing and logit scale."""

    def __init__(self, transform: ImageTransform):
        super().__init__()
        self.transform = transform

    def encode_image(self, pixels: Tensor) -> Tensor:
        raise NotImplementedError

    def encode_text(self, prompts: list[str]) -> Tensor:
        raise NotImplementedError

    def logit_scale(self) -> Tensor:
        raise NotImplementedError


class OpenClipTowers(ClipTowers):
    def __init__(self, model: nn.Module, tokenizer, transform: ImageTransform):
        super().__init__(transform)
        self.model = model
        self.tokenizer = tokenizer

    def encode_image(self, pixels: Tensor) -> Tensor:
        return self.model.encode_image(pixels)

    def encode_text(self, prompts: list[str]) -> Tensor:
        tokens = self.tokenizer(prompts).to(self.model.logit_scale.device)
        return self.model.encode_text(tokens)

    def logit_scale(self) -> Tensor:
        return self.model.logit_scale.exp()


def _features(output) -> Tensor:
    # transformers 5 returns a model output whose pooler_output is the projected embedding.
    return output if isinstance(output, Tensor) else output.pooler_output


class HFClipTowers(ClipTowers):
    def __init__(self, model: nn.Module, tokenizer, transform: ImageTransform):
        super().__init__(transform)
        self.model = model
        self.tokenizer = tokenizer

    def encode_image(self, pixels: Tensor) -> Tensor:
        return _features(self.model.get_image_features(pixel_values=pixels))

    def encode_text(self, prompts: list[str]) -> Tensor:
        max_length = self.model.config.text_config.max_position_embeddings
        tokens = self.tokenizer(prompts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        tokens = {k: v.to(self.model.logit_scale.device) for k, v in tokens.items()}
        return _features(self.model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]))

    def logit_scale(self) -> Tensor:
        return self.model.logit_scale.exp()


def _edge(value, key: str) -> int:
    return int(value[key]) if isinstance(value, dict) else int(value)


# An image processor saved on its own writes the first; a whole CLIPProcessor saved by
# transformers >= 5 writes the second, with the image settings under "image_processor".
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")


def image_processor_config(folder: Path) -> dict:
    """The CLIPImageProcessor settings saved in ``folder``, from either file layout."""
    folder = Path(folder)
    if (folder / PROCESSOR_FILES[0]).is_file():
        return json.loads((folder / PROCESSOR_FILES[0]).read_text())
    return json.loads((folder / PROCESSOR_FILES[1]).read_text())["image_processor"]


def transform_from_processor_config(folder: Path) -> ImageTransform:
    """Read a saved CLIPImageProcessor's settings into the equivalent torch transform."""
    config = image_processor_config(folder)
    size = config.get("size", 224)
    size = _edge(size, "shortest_edge" if not isinstance(size, dict) or "shortest_edge" in size else "height")
    crop = _edge(config.get("crop_size", size), "height") if config.get("do_center_crop", True) else None
    return ImageTransform(
        size=size,
        mode="shortest",
        crop=crop,
        mean=tuple(config.get("image_mean", OPENAI_CLIP_MEAN)),
        std=tuple(config.get("image_std", OPENAI_CLIP_STD)),
    )


def hf_clip_towers(
    *, what: str, repo_id: str | None, path=None, processor_path=None, processor_repo_id: str | None = None
) -> HFClipTowers:
    """transformers CLIPModel from a save_pretrained folder; tokenizer and image config from the processor folder.

    The processor folder defaults to the model folder when that one holds a
    processor config (PickScore ships its processor separately).
    """
    from transformers import AutoTokenizer, CLIPModel

    folder = find_folder(repo_id=repo_id, what=what, path=path)
    if processor_path is None and any((folder / name).is_file() for name in PROCESSOR_FILES):
        processor_folder = folder
    elif processor_path is None and processor_repo_id is None:
        raise WeightsNotFoundError(f"{what}: {folder} has no {' or '.join(PROCESSOR_FILES)}; save the CLIP processor "
                                   "there (CLIPProcessor.save_pretrained) or pass processor_path=<folder>")
    else:
        processor_folder = find_folder(
            repo_id=processor_repo_id, what=f"{what} processor", path=processor_path, marker=PROCESSOR_FILES
        )
    model = CLIPModel.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(processor_folder)
    return HFClipTowers(model, tokenizer, transform_from_processor_config(processor_folder))


def open_clip_towers(
    *,
    what: str,
    arch: str,
    filenames: tuple[str, ...],
    repo_id: str | None,
    path=None,
    mode: str = "shortest",
    quick_gelu: bool = False,
    search_dirs: tuple[str, ...] = (),
) -> OpenClipTowers:
    """open_clip model ``arch`` with a full state dict from the first of ``filenames`` found locally."""
    import open_clip

    file = find_file(filenames, repo_id=repo_id, what=what, path=path, search_dirs=search_dirs)
    model = open_clip.create_model(arch, pretrained=None, force_quick_gelu=quick_gelu)
    result = model.load_state_dict(load_state_dict(file), strict=False)
    # open_clip models keep some non-learned buffers (e.g. the text causal mask) out of checkpoints.
    missing = [k for k in result.missing_keys if "attn_mask" not in k]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"{what}: {file} does not fit open_clip '{arch}' (missing {missing[:3]}..., "
            f"unexpected {result.unexpected_keys[:3]}...); pass the architecture it was trained with as arch="
        )
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    transform = ImageTransform(size=int(size), mode=mode, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD)
    return OpenClipTowers(model, open_clip.get_tokenizer(arch), transform)


def dtype_of(module: nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype
