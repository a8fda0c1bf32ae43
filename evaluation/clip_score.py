"""CLIP score (Hessel et al., CLIPScore, arXiv:2104.08718, with w = 100 as in common T2I reporting).

    score_i = 100 * max(cos(E_I(x_i), E_T(c_i)), 0)

Computed directly on transformers ``CLIPModel`` (get_image_features / get_text_features, which in
transformers 5 return output objects whose ``pooler_output`` is the projected embedding) or on an
open_clip model (encode_image / encode_text with its tokenizer). torchmetrics' CLIPScore is not used:
it breaks with transformers 5. Images are in [-1, 1] and are preprocessed in torch (features.clip_preprocess).
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor

from evaluation.features import clip_image_embeds, embedding, is_open_clip


def score_from_embeddings(image_emb: Tensor, text_emb: Tensor) -> Tensor:
    """Per-pair CLIP score [B] = 100 * max(cos, 0) of unnormalised embeddings [B, D]."""
    cos = F.cosine_similarity(image_emb.float(), text_emb.float(), dim=-1)
    return 100 * cos.clamp(min=0)


def clip_text_embeds(model, tokenizer, prompts: list[str]) -> Tensor:
    """Projected text embeddings [B, D] for a transformers CLIPModel (HF tokenizer) or open_clip (its tokenizer)."""
    device = next(model.parameters()).device
    if is_open_clip(model):
        return model.encode_text(tokenizer(prompts).to(device))
    max_len = model.config.text_config.max_position_embeddings
    tokens = tokenizer(prompts, padding="max_length", truncation=True, max_length=max_len, return_tensors="pt")
    tokens = {k: v.to(device) for k, v in tokens.items() if k in ("input_ids", "attention_mask")}
    return embedding(model.get_text_features(**tokens))


@torch.no_grad()
def clip_score(model, tokenizer, images: Tensor, prompts: list[str]) -> Tensor:
    """CLIP score [B] of images in [-1, 1] against their prompts."""
    if len(prompts) != images.shape[0]:
        raise ValueError(f"got {images.shape[0]} images but {len(prompts)} prompts")
    device = next(model.parameters()).device
    image_emb = clip_image_embeds(model, images.to(device))
    return score_from_embeddings(image_emb, clip_text_embeds(model, tokenizer, list(prompts)))


def mean_clip_score(model, tokenizer, batches: Iterable[tuple[Tensor, list[str]]],
                    accelerator=None) -> tuple[float, Tensor]:
    """(mean, per-sample scores [N]) over (images, prompts) batches, gathered over processes if asked."""
    scores = [clip_score(model, tokenizer, x, p).cpu() for x, p in batches]
    scores = torch.cat(scores) if scores else torch.zeros(0)
    if accelerator is not None:
        from evaluation.fid import gather_features
        scores = gather_features(scores[:, None], accelerator)[:, 0]
    return float(scores.mean()), scores
