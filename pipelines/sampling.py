"""Sampling a denoiser end to end: prompts and initial noise in, images out."""
from __future__ import annotations

import torch

from pipelines.samplers import guided, sample_ddim


@torch.no_grad()
def sample_images(bundle, denoiser, prompts: list[str], steps: int, guidance: float, x_T: torch.Tensor,
                  image_size: tuple[int, int] | None = None) -> torch.Tensor:
    """Images in [-1, 1] from `denoiser`, starting at noise x_T, with deterministic DDIM
    (which is flow Euler on a flow schedule) and classifier-free guidance."""
    was_training = denoiser.training
    denoiser.eval()
    cond = bundle.encode_prompt(prompts, image_size=image_size)
    uncond = bundle.encode_unconditional(len(prompts), image_size=image_size)
    predict = lambda x_t, t, c: bundle.predict(denoiser, x_t, t, c)  # noqa: E731
    model_fn = guided(predict, cond, uncond, guidance, bundle.prediction_type, bundle.schedule)
    x_0 = sample_ddim(model_fn, x_T, bundle.schedule.timesteps(steps), bundle.schedule)
    denoiser.train(was_training)
    return bundle.decode_latents(x_0).clamp(-1, 1)
