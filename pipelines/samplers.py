"""Deterministic and stochastic ODE samplers as plain functions with one signature.

``sample_<solver>(model_fn, x, timesteps, schedule, ..., callback=None) -> x_0``

* ``model_fn(x_t, t[B]) -> (x0_hat, eps_hat)`` with guidance already folded in (see ``guided``), so a
  solver never knows the prediction type or the conditioning.
* ``timesteps`` is the descending grid of model timesteps from ``schedule.timesteps(n)``; the model is
  evaluated exactly once at each, and after the last one every solver steps to the clean end point
  (alpha = 1, sigma = 0), i.e. returns a sample of x_0, as the matching diffusers schedulers do with the
  configurations named in each docstring.
* ``callback(i, t, x_t, x0_hat)`` runs after each model evaluation, for trajectory recording.

Solver state is kept in the input dtype promoted to at least float32 (alpha, sigma and t are never
rounded to half precision) and returned in the input dtype.
"""
from __future__ import annotations

from typing import Callable, Optional, Union

import torch
from torch import Tensor

from pipelines.conditioning import Conditioning
from pipelines.schedules import FlowSchedule, VPSchedule, append_dims, to_x0_eps

ModelFn = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]
Predict = Callable[[Tensor, Tensor, Conditioning], Tensor]
Callback = Callable[[int, Tensor, Tensor, Tensor], None]
Schedule = Union[VPSchedule, FlowSchedule]


def guided(predict: Predict, cond: Conditioning, uncond: Optional[Conditioning], guidance_scale: float | Tensor,
           prediction_type: str, schedule: Schedule) -> ModelFn:
    """Classifier-free guidance (Ho & Salimans arXiv 2207.12598) on the raw output, diffusers convention.

    out = u + g (c - u) with u, c the unconditional and conditional raw outputs, evaluated in one fused
    call on the batch [uncond; cond] (an uncond of batch 1 is repeated). A float g <= 1 runs the
    conditional branch only (one pass, g ignored).
    A tensor g of shape [B] gives per-sample scales and always runs the fused call.
    The guided output is then converted to (x0_hat, eps_hat) at the schedule's (alpha_t, sigma_t).
    """
    per_sample = isinstance(guidance_scale, Tensor)
    fused = per_sample or guidance_scale > 1
    if fused and uncond is None:
        raise ValueError(f"guidance_scale={guidance_scale} needs an unconditional Conditioning (uncond is None)")
    if fused and uncond.batch_size == 1 and cond.batch_size > 1:  # one empty-prompt embedding for the batch
        uncond = uncond.repeat(cond.batch_size)

    def model_fn(x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        if fused:
            both = predict(torch.cat([x_t, x_t]), torch.cat([t, t]), Conditioning.cat([uncond, cond]))
            out_u, out_c = both.chunk(2)
            g = append_dims(guidance_scale.to(out_u), x_t.ndim) if per_sample else guidance_scale
            out = out_u + g * (out_c - out_u)
        else:
            out = predict(x_t, t, cond)
        alpha, sigma = (append_dims(a, x_t.ndim) for a in schedule.alpha_sigma(t))
        return to_x0_eps(out, x_t, alpha, sigma, prediction_type)

    return model_fn


def _grid(x: Tensor, timesteps: Tensor, schedule: Schedule) -> tuple[Tensor, Tensor, Tensor]:
    """(t, alpha, sigma) on the grid in the working dtype; alpha/sigma get the end point (1, 0) appended."""
    if timesteps.ndim != 1 or len(timesteps) == 0:
        raise ValueError(f"timesteps must be a non-empty 1-D tensor, got shape {tuple(timesteps.shape)}")
    if len(timesteps) > 1 and not bool((timesteps[1:] < timesteps[:-1]).all()):
        raise ValueError(f"timesteps must be strictly descending, got {timesteps.tolist()}")
    work = torch.promote_types(x.dtype, torch.float32)
    ts = timesteps.to(x.device, work)
    alpha, sigma = schedule.alpha_sigma(ts)
    one, zero = alpha.new_ones(1), alpha.new_zeros(1)
    return ts, torch.cat([alpha, one]), torch.cat([sigma, zero])


def sample_ddim(model_fn: ModelFn, x: Tensor, timesteps: Tensor, schedule: Schedule, eta: float = 0.0,
                generator: Optional[torch.Generator] = None, callback: Optional[Callback] = None) -> Tensor:
    """DDIM (Song et al. arXiv 2010.02502, Eq. 12) between consecutive grid points, then to x_0.

    x' = alpha' x0_hat + sqrt(sigma'^2 - c^2) eps_hat + c z,
    c = eta sigma' sqrt(1 - (alpha sigma' / (alpha' sigma))^2)  (the DDPM posterior std; on VP this is
    diffusers' eta sqrt((1 - abar')/(1 - abar) (1 - abar/abar'))), z ~ N(0, I) from ``generator``.

    Reproduces ``DDIMScheduler(set_alpha_to_one=True, clip_sample=False, thresholding=False)`` stepped with
    ``eta`` (noise drawn in the same order from the same generator) whenever consecutive grid points are
    ``T // n`` apart: "trailing" with n dividing T, and "leading". Final step: diffusers goes to
    final_alpha_cumprod = 1, we go to (alpha, sigma) = (1, 0): identical, x = x0_hat. Deliberate deviation:
    diffusers always steps to ``t - T // n`` even when the next grid point differs (non-uniform grids such
    as "linspace" or "trailing" with T % n != 0); we step to the next grid point, which is the DDIM update
    the grid asks for. With the flow schedule and eta = 0 this equals flow Euler in exact arithmetic.
    """
    if eta > 0 and generator is None:
        raise ValueError("sample_ddim with eta > 0 needs a torch.Generator (no global RNG)")
    ts, alpha, sigma = _grid(x, timesteps, schedule)
    out_dtype, x = x.dtype, x.to(ts.dtype)
    for i, t in enumerate(ts):
        x0_hat, eps_hat = model_fn(x, t.expand(x.shape[0]))
        if callback is not None:
            callback(i, t, x, x0_hat)
        a, s, a_next, s_next = alpha[i], sigma[i], alpha[i + 1], sigma[i + 1]
        c = eta * s_next * (1 - (a * s_next / (a_next * s)) ** 2).clamp(min=0).sqrt()
        x = a_next * x0_hat + (s_next**2 - c**2).clamp(min=0).sqrt() * eps_hat
        if eta > 0 and i < len(ts) - 1:  # c = 0 on the last step; diffusers draws a noise there but adds 0 x it
            z = torch.randn(x.shape, generator=generator, device=generator.device, dtype=x.dtype)
            x = x + c * z.to(x.device)
    return x.to(out_dtype)


def sample_flow_euler(model_fn: ModelFn, x: Tensor, timesteps: Tensor, schedule: Schedule,
                      callback: Optional[Callback] = None) -> Tensor:
    """Euler on the flow ODE dy/ds = eps - x_0 in flow coordinates y = x / (alpha + sigma), s = sigma / (alpha + sigma).

    On the flow schedule alpha + sigma = 1, so this is x' = x + (s' - s) u with u = eps_hat - x0_hat, which
    is ``FlowMatchEulerDiscreteScheduler.step`` (static ``shift``, stochastic_sampling=False). Final step:
    s' = 0 as diffusers appends sigma = 0, giving x - s u = x0_hat. On a VP schedule it is the same
    first-order solver written in the rescaled variable (and equals DDIM eta = 0 in exact arithmetic).
    """
    ts, alpha, sigma = _grid(x, timesteps, schedule)
    out_dtype, x = x.dtype, x.to(ts.dtype)
    for i, t in enumerate(ts):
        x0_hat, eps_hat = model_fn(x, t.expand(x.shape[0]))
        if callback is not None:
            callback(i, t, x, x0_hat)
        norm, norm_next = alpha[i] + sigma[i], alpha[i + 1] + sigma[i + 1]
        ds = sigma[i + 1] / norm_next - sigma[i] / norm
        x = norm_next * (x / norm + ds * (eps_hat - x0_hat))
    return x.to(out_dtype)


def sample_dpmpp_2m(model_fn: ModelFn, x: Tensor, timesteps: Tensor, schedule: Schedule,
                    callback: Optional[Callback] = None) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. arXiv 2211.01095, Alg. 2) in data prediction, lambda = log(alpha / sigma).

    With h = lambda' - lambda (so e^{-h} = alpha sigma' / (alpha' sigma)):
        x' = (sigma'/sigma) x + alpha' (1 - e^{-h}) D,
        D = x0_hat on the first and the last step, else D = x0_hat + (x0_hat - x0_prev) / (2 r),
        r = h_prev / h  (the "midpoint" form).
    Reproduces ``DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2,
    solver_type="midpoint", final_sigmas_type="zero", thresholding=False)`` on VP schedules, and with
    ``use_flow_sigmas=True, prediction_type="flow_prediction"`` on the flow schedule. Final step: diffusers
    appends sigma = 0 and, with final_sigmas_type="zero", always takes it first order; then sigma' = 0 and
    e^{-h} = 0 give x' = alpha' x0_hat = x0_hat, which is what we return (written without the infinite lambda).
    """
    ts, alpha, sigma = _grid(x, timesteps, schedule)
    lam = alpha[:-1].log() - sigma[:-1].log()  # the end point's lambda is +inf and never needed
    out_dtype, x = x.dtype, x.to(ts.dtype)
    x0_prev = None
    for i, t in enumerate(ts):
        x0_hat, _ = model_fn(x, t.expand(x.shape[0]))
        if callback is not None:
            callback(i, t, x, x0_hat)
        a, s, a_next, s_next = alpha[i], sigma[i], alpha[i + 1], sigma[i + 1]
        exp_neg_h = a * s_next / (a_next * s)
        last = i == len(ts) - 1
        if x0_prev is None or last:
            d = x0_hat
        else:
            r = (lam[i] - lam[i - 1]) / (lam[i + 1] - lam[i])
            d = x0_hat + (x0_hat - x0_prev) / (2 * r)
        x = (s_next / s) * x + a_next * (1 - exp_neg_h) * d
        x0_prev = x0_hat
    return x.to(out_dtype)
