"""Consistency-model maths shared by LCD (`trainers/lcd.py`) and TBCM (`trainers/tbcm.py`).

Discrete consistency distillation (LCM, Luo et al., arXiv 2310.04378):

* boundary conditions (LCM Eq. 9 with the diffusers scaling): with u = timestep_scaling * t,
  c_skip(t) = sigma_d^2 / (u^2 + sigma_d^2), c_out(t) = u / sqrt(u^2 + sigma_d^2), sigma_d = 0.5,
  and f(x_t, t) = c_skip(t) x_t + c_out(t) x0_hat(x_t, t); c_skip(0) = 1, c_out(0) = 0;
* guidance-scale embedding (LCM Sec. 4.2, from Imagen/VDM's sinusoidal embedding): w * 1000 through
  [sin(w' f_k), cos(w' f_k)], f_k = 10000^(-k / (d/2 - 1));
* pseudo-Huber distance sqrt(d^2 + c^2) - c per element (Song & Dhariwal, arXiv 2310.14189), mean per sample;
* the multistep consistency sampler (LCM Alg. 1): x0 <- f(x_t, t), then x_{t'} = alpha_{t'} x0 + sigma_{t'} z.

Continuous-time consistency in TrigFlow (sCM, Lu & Song, arXiv 2410.11081; Sana-Sprint arXiv 2503.09641):

* f(x_s, s) = cos(s) x_s - sin(s) sigma_d F(x_s, s), PF-ODE dx/ds = sigma_d F_teacher;
* tangent (sCM Eq. 8 with the warm-up ratio r of Sec. 4.2):
  g = -cos^2(s) (sigma_d F^- - dx/ds) - r cos(s) sin(s) (x_s + sigma_d dF^-/ds), i.e. cos(s) df^-/ds at r = 1,
  normalised g <- g / (||g|| + c) per sample (Sec. 4.2, c = 0.1);
* adaptive weighting with a learned log-variance u(s) (sCM Eq. 9 / EDM2):
  L = (w(s) / e^{u(s)}) mean((F_theta - F^- - g)^2) + u(s), w(s) = 1 / (sigma_d tan s);
* dF/ds along (dx/ds, 1) by forward-mode AD (`torch.func.jvp`) or a central finite difference.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import Tensor

from pipelines.schedules import append_dims, shift_sigma

LCM_SIGMA_DATA = 0.5


# ------------------------------------------------------------------ LCM maths


def lcm_boundary(t: Tensor, timestep_scaling: float = 10.0,
                 sigma_data: float = LCM_SIGMA_DATA) -> tuple[Tensor, Tensor]:
    """(c_skip, c_out) of LCM at native timestep t (as diffusers' LCMScheduler computes them)."""
    dtype = t.dtype if t.is_floating_point() else torch.float32
    u = t.double() * timestep_scaling
    c_skip = sigma_data**2 / (u**2 + sigma_data**2)
    c_out = u / (u**2 + sigma_data**2).sqrt()
    return c_skip.to(dtype), c_out.to(dtype)


def consistency_output(x_t: Tensor, x0_hat: Tensor, c_skip: Tensor, c_out: Tensor) -> Tensor:
    """f(x_t, t) = c_skip x_t + c_out x0_hat, with [B] scalings broadcast over the sample."""
    return append_dims(c_skip, x_t.ndim) * x_t + append_dims(c_out, x_t.ndim) * x0_hat


def guidance_embedding(w: Tensor, dim: int) -> Tensor:
    """Sinusoidal embedding [B, dim] of the LCM guidance weight w (diffusers' w = guidance_scale - 1)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=w.device) / (half - 1))
    angles = (w.float() * 1000.0)[:, None] * freqs[None, :]
    emb = torch.cat([angles.sin(), angles.cos()], dim=1)
    return torch.nn.functional.pad(emb, (0, dim % 2))


def pseudo_huber(a: Tensor, b: Tensor, c: float) -> Tensor:
    """Per-sample mean over elements of sqrt((a - b)^2 + c^2) - c (c = 0 gives the mean absolute error)."""
    d = (a.float() - b.float()).pow(2)
    return ((d + c * c).sqrt() - c).flatten(1).mean(dim=1)


def squared_error(a: Tensor, b: Tensor) -> Tensor:
    """Per-sample mean squared error."""
    return (a.float() - b.float()).pow(2).flatten(1).mean(dim=1)


def skip_grid(num_train_timesteps: int, num_steps: int) -> Tensor:
    """LCM's skipping-step grid t_n = (n + 1) k - 1, k = T // N (ascending, long): LCMScheduler's origin grid."""
    k = num_train_timesteps // num_steps
    return torch.arange(1, num_steps + 1, dtype=torch.long) * k - 1


def vp_solver_grid(num_train_timesteps: int, num_steps: int) -> Tensor:
    """[0] + LCM's skip grid, float64: the VP solver grid with its end point."""
    return torch.cat([torch.zeros(1, dtype=torch.float64), skip_grid(num_train_timesteps, num_steps).double()])


def solver_grid(schedule, num_steps: int) -> Tensor:
    """The skip-step solver's grid with its end point: N + 1 ascending native times (float64), first 0.

    A solver step goes from grid[n] to grid[n - 1]. VP: [0, k - 1, 2k - 1, ..., T - 1], LCM's grid, so
    t_{n-1} = max(t_n - k, 0). Flow: t_n = T shift(n / N) with shift(u) = a u / (1 + (a - 1) u), the
    teacher's own sigma shift a; its top point is pure noise (sigma 1), where diffusers' flow sampling starts.
    """
    T = schedule.num_train_timesteps
    if schedule.kind == "vp":
        return vp_solver_grid(T, num_steps)
    return T * shift_sigma(torch.arange(num_steps + 1, dtype=torch.float64) / num_steps, schedule.shift)


def pick_inference_steps(grid: Tensor, steps: int) -> Tensor:
    """`steps` points of a solver grid (without its end point 0), descending, by LCMScheduler's rule.

    LCMScheduler.set_timesteps takes indices floor(linspace(0, N, steps + 1))[:-1] of the reversed grid.
    """
    top_down = grid[1:].flip(0)
    if not 1 <= steps <= len(top_down):
        raise ValueError(f"steps={steps} must be in [1, {len(top_down)}] (the distillation grid has "
                         f"{len(top_down)} points)")
    index = torch.floor(torch.linspace(0, len(top_down), steps + 1, dtype=torch.float64)[:-1]).long()
    return top_down[index].double()


def lcm_inference_timesteps(num_train_timesteps: int, original_steps: int, steps: int) -> Tensor:
    """The timesteps LCMScheduler.set_timesteps(steps) picks from the skip grid (descending, float64)."""
    return pick_inference_steps(vp_solver_grid(num_train_timesteps, original_steps), steps)


@torch.no_grad()
def sample_consistency(model_fn: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]], x: Tensor, timesteps: Tensor,
                       schedule, generator: torch.Generator,
                       boundary: Optional[Callable[[Tensor], tuple[Tensor, Tensor]]] = None) -> Tensor:
    """Multistep consistency sampling (LCM Alg. 1, sCM Alg. 1) in the schedule's native time.

    At each grid point: x0 = f(x, t) = c_skip x + c_out x0_hat (boundary None means c_skip = 0, c_out = 1:
    the TrigFlow f = cos s x - sin s sigma_d F), then re-noise to the next grid point with fresh noise drawn
    from `generator` in the order diffusers' LCMScheduler / FlowMatchEuler(stochastic_sampling) draw it.
    """
    x = x.float()
    for i, t in enumerate(timesteps.to(x.device, torch.float32)):
        tb = t.expand(x.shape[0])
        x0_hat, _ = model_fn(x, tb)
        x0 = x0_hat.float() if boundary is None else consistency_output(x, x0_hat.float(), *boundary(tb))
        if i == len(timesteps) - 1:
            return x0
        alpha, sigma = schedule.alpha_sigma(timesteps[i + 1:i + 2].to(x.device, torch.float32))
        z = torch.randn(x.shape, generator=generator, device=generator.device, dtype=x.dtype).to(x.device)
        x = alpha * x0 + sigma * z
    return x


# ------------------------------------------------------------------ sCM maths (TrigFlow)


def trigflow_step(x: Tensor, F: Tensor, s: Tensor, s_next: Tensor, sigma_d: float) -> Tensor:
    """DDIM in TrigFlow: x_{s'} = cos(s - s') x_s - sin(s - s') sigma_d F; exact when F is constant in s."""
    delta = append_dims(s - s_next, x.ndim)
    return delta.cos() * x - delta.sin() * sigma_d * F


def scm_tangent(F_minus: Tensor, dxds: Tensor, x_t: Tensor, dFds: Tensor, s: Tensor, sigma_d: float,
                r: float) -> Tensor:
    """g = -cos^2 s (sigma_d F^- - dx/ds) - r cos s sin s (x_t + sigma_d dF^-/ds)."""
    cos, sin = append_dims(s.cos(), x_t.ndim), append_dims(s.sin(), x_t.ndim)
    return -cos**2 * (sigma_d * F_minus - dxds) - r * cos * sin * (x_t + sigma_d * dFds)


def normalize_tangent(g: Tensor, c: float = 0.1) -> Tensor:
    """g / (||g||_2 + c), norm per sample over all non-batch dims."""
    norm = g.flatten(1).norm(dim=1)
    return g / append_dims(norm + c, g.ndim)


def scm_loss(F_theta: Tensor, F_minus: Tensor, g: Tensor, s: Tensor, logvar: Tensor, sigma_d: float) -> Tensor:
    """Per-sample (1 / (sigma_d tan s)) e^{-u} mean((F_theta - F^- - g)^2) + u."""
    weight = 1.0 / (sigma_d * s.float().tan())
    mse = squared_error(F_theta, F_minus + g)
    return weight * torch.exp(-logvar.float()) * mse + logvar.float()


def tangent_ratio(step: int, warmup: int, decay_start: int = 0, decay_end: int = 0, final_r: float = 1.0) -> float:
    """r(step): linear warm-up 0 -> 1 over `warmup` steps, then (TBCM) 1 -> final_r over [decay_start, decay_end]."""
    r = min(1.0, step / warmup) if warmup > 0 else 1.0
    if decay_end > decay_start and step >= decay_start:
        r = min(r, 1.0 + (final_r - 1.0) * min(1.0, (step - decay_start) / (decay_end - decay_start)))
    return r


AngleFn = Callable[[Tensor, Tensor], Tensor]


def jvp_forward_ad(fn: AngleFn, x: Tensor, s: Tensor, dxds: Tensor) -> Tensor:
    """dF/ds = (dF/dx) dx/ds + dF/ds|_x by forward-mode AD (needs math attention kernels)."""
    _, tangent = torch.func.jvp(fn, (x, s), (dxds, torch.ones_like(s)))
    return tangent


def jvp_finite_difference(fn: AngleFn, x: Tensor, s: Tensor, dxds: Tensor, h: float, s_min: float,
                          s_max: float) -> Tensor:
    """Central difference along (dx/ds, 1); the stencil is shortened per sample at the ends of [s_min, s_max]."""
    up = torch.clamp(s_max - s, max=h).clamp(min=0)
    down = torch.clamp(s - s_min, max=h).clamp(min=0)
    f_up = fn(x + append_dims(up, x.ndim) * dxds, s + up)
    f_down = fn(x - append_dims(down, x.ndim) * dxds, s - down)
    return (f_up - f_down) / append_dims(up + down, x.ndim)


class LogVarHead(torch.nn.Module):
    """u(s): a linear layer on sinusoidal features of the angle (sCM's adaptive weight); zero-initialised."""

    def __init__(self, dim: int = 128):
        super().__init__()
        self.dim = dim
        self.linear = torch.nn.Linear(dim, 1)
        torch.nn.init.zeros_(self.linear.weight)
        torch.nn.init.zeros_(self.linear.bias)

    def forward(self, s: Tensor) -> Tensor:
        half = self.dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=s.device, dtype=torch.float32) / half)
        angles = (s.float() * (2000.0 / math.pi))[:, None] * freqs[None, :]  # pi/2 -> 1000, like timesteps
        return self.linear(torch.cat([angles.cos(), angles.sin()], dim=1)).squeeze(1)


# ------------------------------------------------------------------ fp32 time embeddings

TIME_EMBEDDING_MODULES = ("time_embedding", "add_embedding", "time_embed", "time_text_embed", "adaln_single")
_FP32_CLASSES: dict[type, type] = {}


def _to_fp32(v):
    """A floating tensor or dtype argument in float32: Sana's and PixArt's AdaLayerNormSingle take
    `hidden_dtype` (bf16 under autocast) and cast the sinusoidal features to it before their fp32 Linear."""
    if isinstance(v, Tensor) and v.is_floating_point():
        return v.float()
    if isinstance(v, torch.dtype) and v.is_floating_point:
        return torch.float32
    return v


def _fp32_class(cls: type) -> type:
    if cls not in _FP32_CLASSES:
        def forward(self, *args, **kwargs):
            device = next(self.parameters()).device.type
            with torch.autocast(device_type=device, enabled=False):
                out = super(_FP32_CLASSES[cls], self).forward(*map(_to_fp32, args),
                                                              **{k: _to_fp32(v) for k, v in kwargs.items()})
            dtype = self._output_dtype
            down = lambda v: v.to(dtype) if isinstance(v, Tensor) and v.is_floating_point() else v  # noqa: E731
            return tuple(map(down, out)) if isinstance(out, tuple) else down(out)

        _FP32_CLASSES[cls] = type(cls.__name__, (cls,), {"forward": forward, "__module__": cls.__module__})
    return _FP32_CLASSES[cls]


def keep_time_embeddings_fp32(denoiser: torch.nn.Module) -> list[str]:
    """Run the denoiser's timestep embedding MLPs in float32 with autocast off (returns their names).

    bf16 time embeddings are a known source of sCM gradient spikes (sCM Sec. 4.1). The module's output is
    cast back to the dtype its weights had, so a bf16 network downstream still receives bf16.
    """
    done = []
    for name in TIME_EMBEDDING_MODULES:
        module = getattr(denoiser, name, None)
        if not isinstance(module, torch.nn.Module) or not any(True for _ in module.parameters()):
            continue
        if type(module) not in _FP32_CLASSES.values():
            module._output_dtype = next(module.parameters()).dtype
            module.float()
            module.__class__ = _fp32_class(type(module))
        done.append(name)
    return done


def ddim_step(x0_hat: Tensor, eps_hat: Tensor, alpha_next: Tensor, sigma_next: Tensor) -> Tensor:
    """The deterministic DDIM update x_{t'} = alpha_{t'} x0_hat + sigma_{t'} eps_hat (LCM's skip-step solver)."""
    return alpha_next * x0_hat + sigma_next * eps_hat
