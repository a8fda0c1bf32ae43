"""The toy world's CLIP: a tiny transformers CLIPModel trained contrastively on renders.

One model serves four roles: its text tower (last hidden state, as SD uses
CLIP-L) is the teachers' text encoder, and its towers give the CLIP score,
the features of the toy FID and the `toy_clip` reward. So the text tower must
tell apart captions that differ in one word, which plain in-batch negatives
rarely exercise: two random captions differ in many attributes. Each batch
therefore also holds, for every image, a caption with exactly one thing
changed (colour, shape, size, position, background, an object added or
dropped), a hard negative in the sense of NegCLIP (Yuksekgonul et al.,
arXiv 2210.01936). Loss: the symmetric InfoNCE of CLIP (Radford et al.,
arXiv 2103.00020) with the hard-negative captions as extra columns of the
image-to-text softmax.

Hard negatives never name a held-out (colour, shape) combination, so the
held-out split stays unseen in text as well as in images.
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

from .world import (BACKGROUND_COLOURS, OBJECT_COLOURS, POSITIONS, SHAPES, SIZES, ObjectSpec, SceneSpec, ToyDataset,
                    canonical_order, caption, is_feasible, is_heldout)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
ATTRIBUTES = ("colour", "shape", "size", "position", "background", "add", "drop")


@dataclasses.dataclass(frozen=True)
class CLIPSpec:
    width: int = 64
    layers: int = 3
    heads: int = 4
    patch: int = 4
    projection: int = 64


def build_clip(tokenizer: CLIPTokenizer, spec: CLIPSpec, resolution: int = 32, seed: int = 0) -> CLIPModel:
    """An untrained CLIPModel whose text positions match the tokenizer's max length."""
    common = dict(hidden_size=spec.width, intermediate_size=4 * spec.width, num_hidden_layers=spec.layers,
                  num_attention_heads=spec.heads, projection_dim=spec.projection)
    text = dict(common, vocab_size=len(tokenizer), max_position_embeddings=tokenizer.model_max_length,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)
    vision = dict(common, image_size=resolution, patch_size=spec.patch, num_channels=3)
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=spec.projection)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return CLIPModel(config)


def image_processor(resolution: int = 32) -> CLIPImageProcessor:
    """The preprocessing `evaluation.features.clip_preprocess` and rewards apply: scale, mean/std, no resize at 32."""
    return CLIPImageProcessor(size={"shortest_edge": resolution}, crop_size={"height": resolution, "width": resolution},
                              image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD), do_convert_rgb=True)


def save_clip(model: CLIPModel, tokenizer: CLIPTokenizer, folder) -> None:
    """CLIPModel (safetensors), tokenizer and processor config in one folder."""
    model.save_pretrained(folder, safe_serialization=True)
    CLIPProcessor(image_processor=image_processor(model.config.vision_config.image_size),
                  tokenizer=tokenizer).save_pretrained(folder)


def to_clip_pixels(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] images at the tower's resolution -> CLIP-normalised pixels."""
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return ((images + 1) / 2 - mean) / std


# ------------------------------------------------------------------ hard negatives


def _change(spec: SceneSpec, kind: str, rng: np.random.Generator) -> SceneSpec:
    objects, background = list(spec.objects), spec.background
    i = int(rng.integers(len(objects)))
    pick = lambda options, current: options[int(rng.integers(len(options)))] if current is None else \
        [o for o in options if o != current][int(rng.integers(len(options) - 1))]  # noqa: E731
    if kind == "background":
        background = pick(BACKGROUND_COLOURS, background)
    elif kind == "add" and len(objects) == 1:
        objects.append(ObjectSpec(pick(tuple(SIZES), None), pick(tuple(OBJECT_COLOURS), None), pick(SHAPES, None),
                                  pick(POSITIONS, None)))
    elif kind == "drop" and len(objects) == 2:
        objects.pop(i)
    elif kind in ("colour", "shape", "size", "position"):
        field = {"colour": ("colour", tuple(OBJECT_COLOURS)), "shape": ("shape", SHAPES),
                 "size": ("size", tuple(SIZES)), "position": ("position", POSITIONS)}[kind]
        objects[i] = dataclasses.replace(objects[i], **{field[0]: pick(field[1], getattr(objects[i], field[0]))})
    return SceneSpec(canonical_order(objects), background)


def one_off(spec: SceneSpec, rng: np.random.Generator, kind: str | None = None, allow_heldout: bool = False,
            tries: int = 200) -> SceneSpec | None:
    """A feasible spec that differs from `spec` in exactly one attribute (of `kind`, or a random one)."""
    for _ in range(tries):
        k = kind or ATTRIBUTES[int(rng.integers(len(ATTRIBUTES)))]
        new = _change(spec, k, rng)
        if new != spec and is_feasible(new) and (allow_heldout or not any(is_heldout(o) for o in new.objects)):
            return new
    return None


# ------------------------------------------------------------------ training


def _tokens(tokenizer: CLIPTokenizer, captions: list[str]) -> torch.Tensor:
    # Padded to the full length without an attention mask, as the SD pipelines call the text tower;
    # the causal mask makes every position up to the first EOS independent of the padding anyway.
    return tokenizer(captions, padding="max_length", truncation=True, max_length=tokenizer.model_max_length,
                     return_tensors="pt").input_ids


def clip_loss(model: CLIPModel, pixels: torch.Tensor, input_ids: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Per-image symmetric InfoNCE; input_ids holds the B true captions first, then any hard negatives."""
    n = pixels.shape[0]
    out = model(input_ids=input_ids, pixel_values=pixels)
    target = torch.arange(n)
    i2t = F.cross_entropy(out.logits_per_image, target, reduction="none")
    t2i = F.cross_entropy(out.logits_per_text[:n], target, reduction="none")
    accuracy = (out.logits_per_image.argmax(1) == target).float().mean()
    return (i2t + t2i) / 2, {"i2t": i2t.detach().mean(), "t2i": t2i.detach().mean(), "acc": accuracy.detach()}


def train_clip(model: CLIPModel, tokenizer: CLIPTokenizer, data: ToyDataset, images: torch.Tensor, steps: int,
               batch_size: int = 64, lr: float = 1e-3, seed: int = 0, log: Callable[[str], None] = print,
               log_every: int = 100) -> CLIPModel:
    """AdamW with warm-up and cosine decay; `images` are `data`'s renders in [-1, 1], in item order."""
    rng = np.random.default_rng([seed, 7])
    specs = [data.scene(i).spec for i in range(len(data))]
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    warmup = max(1, steps // 20)
    model.train()
    start = time.perf_counter()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))
        index = rng.choice(len(specs), size=batch_size, replace=False)
        negatives = [one_off(specs[i], rng) for i in index]
        captions = [caption(specs[i]) for i in index] + [caption(s) for s in negatives if s is not None]
        loss, logs = clip_loss(model, to_clip_pixels(images[index]), _tokens(tokenizer, captions))
        optimizer.zero_grad(set_to_none=True)
        loss.mean().backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if (step + 1) % log_every == 0 or step + 1 == steps:
            log(f"  clip step {step + 1}/{steps}  loss {float(loss.mean()):.3f}  batch acc {float(logs['acc']):.3f}  "
                f"({(step + 1) / (time.perf_counter() - start):.2f} steps/s)")
    return model.eval()


@torch.no_grad()
def one_off_retrieval(model: CLIPModel, tokenizer: CLIPTokenizer, split: str, n: int = 300, variants: int = 8,
                      seed: int = 1) -> dict[str, float]:
    """Zero-shot: how often the true caption outscores `variants` one-attribute-off captions of the same image.

    Also per attribute: the fraction of (image, one-off caption) pairs where the true caption wins.
    """
    data = ToyDataset(split, n, seed)
    rng = np.random.default_rng([seed, 11])
    wins = {k: [] for k in ATTRIBUTES}
    correct = []
    for i in range(n):
        spec = data.scene(i).spec
        negatives = [(k, s) for k in ATTRIBUTES for s in [one_off(spec, rng, k, allow_heldout=True)] if s is not None]
        negatives = [negatives[j] for j in rng.permutation(len(negatives))[:variants]]
        captions = [caption(spec)] + [caption(s) for _, s in negatives]
        image = model.get_image_features(pixel_values=to_clip_pixels(data[i]["pixel_values"][None]))
        text = model.get_text_features(input_ids=_tokens(tokenizer, captions))
        image, text = (getattr(t, "pooler_output", t) for t in (image, text))
        sims = F.cosine_similarity(image, text)
        correct.append(bool(sims[1:].max() < sims[0]))
        for (k, _), s in zip(negatives, sims[1:]):
            wins[k].append(bool(s < sims[0]))
    report = {"accuracy": float(np.mean(correct))}
    report.update({f"vs_{k}": float(np.mean(v)) for k, v in wins.items() if v})
    return report
