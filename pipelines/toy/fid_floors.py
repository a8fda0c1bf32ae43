"""What the toy FID reads when nothing is wrong: its floors for a given prompt set.

scripts/evaluate.py scores generated images against real renders of the same
prompts (image i: prompt i // K, layout jitter from seed S + i) on the toy
CLIP's image features. Even a perfect generator does not score 0 there: its
layouts are jittered differently and the count is finite. Two floors make the
teachers' numbers readable:

- real vs real: a second set of renders of the same prompts (other jitter
  seeds) against the reference, i.e. a generator that samples the world exactly;
- VAE reconstruction: those renders passed through the VAE (encode mean,
  decode), i.e. the best a latent model with this VAE can do.

Both use the same prompts, counts, seeds, extractor and FID code as
scripts/evaluate.py with its defaults (--seed 0 --prompt-seed 0).
"""
from __future__ import annotations

import torch

from evaluation import fid as fidlib
from evaluation.features import clip_extractor
from evaluation.scoring import toy_reference_images

from .prompts import toy_prompts
from .vae_training import reconstruct

OTHER_SEEDS = 1_000_003  # offset of the second set's jitter seeds; any offset far from the reference's works


def _renders(prompts: list[str], seeds: list[int], resolution: int) -> torch.Tensor:
    return torch.stack(list(toy_reference_images(prompts, seeds, resolution)))


def fid_floors(clip, vae, split: str, num_prompts: int = 64, images_per_prompt: int = 4, seed: int = 0,
               resolution: int = 32, name: str = "clip:toy") -> dict[str, float]:
    """{"real_vs_real": FID, "vae_recon": FID} for toy prompts of `split` ("heldin" / "heldout")."""
    prompts = toy_prompts(split, num_prompts, seed=0)
    per_image = [p for p in prompts for _ in range(images_per_prompt)]
    seeds = [seed + i for i in range(len(per_image))]
    extractor = clip_extractor(clip, name=name)
    protocol = fidlib.protocol_of(extractor)
    reference = _renders(per_image, seeds, resolution)
    other = _renders(per_image, [s + OTHER_SEEDS for s in seeds], resolution)
    ref_stats = fidlib.stats_from_features(extractor(reference), protocol)
    with torch.no_grad():
        recon = reconstruct(vae, other)
    return {name_: fidlib.fid_from_stats(fidlib.stats_from_features(extractor(x), protocol), ref_stats)
            for name_, x in (("real_vs_real", other), ("vae_recon", recon))}
