"""Rectified Diffusion: reflow on the teacher's own first-order path (Wang et al., arXiv 2410.07303).

Reflow (Liu et al., arXiv 2209.03003) retrains a model on deterministic (noise, sample) pairs of its
ODE so that few-step sampling follows them. Rectified Diffusion's point is that this needs neither
straight lines nor a velocity parameterization: it needs the pairs and training along the model's
*first-order* path, the one a DDIM step follows when its prediction is exact.

Plain variant (`reflow.variant: plain`, data `kind: pairs` from scripts/make_pairs.py). For a pair
(x_T, x_0) (initial noise, teacher ODE sample), its noise eps (below) and t ~ U over the training range:

    x_t = alpha_t x_0 + sigma_t eps                                       (the first-order point)
    x0_hat = to_x0_eps(f_theta(x_t, t, c), x_t, alpha_t, sigma_t)[0]       (teacher's parameterization)
    L = mean_{C,H,W} ( sqrt((x0_hat - x_0)^2 + c^2) - c )                  (pseudo-Huber on x_0, c = 0.001)

The model keeps its parameterization and schedule: eps-prediction on DDPM for SD-style teachers,
flow velocity u = eps - x_0 on x_t = (1 - s) x_0 + s eps for flow teachers; the same code serves both
because the loss is taken on x0_hat. Caption dropout (prob. p, the unconditional embedding diffusers
uses at sampling) keeps an unconditional branch for CFG.

Phased variant (`reflow.variant: phased`, real images and the frozen teacher, as in the paper).
The sampler's trailing grid at `phases` steps cuts time into phases (t_s, t_e]. Per sample pick one,
x_s = alpha_s x_0 + sigma_s eps with fresh eps, and let the teacher (guided, `teacher_guidance`) run
`phase_steps` DDIM steps from t_s to x_e at t_e. With nsr = sigma / alpha, the effective constant
noise of the phase and the first-order point at t in (t_e, t_s] are

    eps* = (x_e / alpha_e - x_s / alpha_s) / (nsr_e - nsr_s)
    x_t  = alpha_t (x_s / alpha_s + (nsr_t - nsr_s) eps*)

and the student is trained so that one DDIM step from x_t lands on x_e:

    x_e_hat = alpha_e (x_t / alpha_t + (nsr_e - nsr_t) eps_hat) = alpha_e x0_hat + sigma_e eps_hat
    L = pseudo-Huber(x_e_hat, x_e).

Deviations, and why:

* The phased formulas are computed in the equivalent pair form: (x0*, eps*) solves
  alpha_s x0* + sigma_s eps* = x_s and alpha_e x0* + sigma_e eps* = x_e, so
  eps* = (alpha_s x_e - alpha_e x_s) / (alpha_s sigma_e - alpha_e sigma_s) (the paper's eps* times
  alpha_s alpha_e over itself) and x_t = alpha_t x0* + sigma_t eps*. Identical wherever the paper's
  form is defined; also finite where alpha = 0, which flow teachers reach at t = T (the paper's code
  assumes eps-prediction; its form divides by alpha_s = 0 there). The student's output is converted
  to (x0_hat, eps_hat) in its own parameterization, so flow (and v) teachers use the same code.
* Phase boundaries are the exported sampler's grid at `phases` steps (trailing DDIM on VP: 999, 749,
  499, 249 as in the paper; on flow N uniform sigmas under the teacher's shift, which the model card
  passes to FlowMatchEuler as `sigmas`, since its default grid leaves the last phase almost empty), so
  each phase is one step the exported sampler takes. The last phase ends at the clean point (alpha, sigma) = (1, 0), where that
  sampler's last step lands (the paper ends at t = 0, sigma_0 = 0.029 on SD, matching its
  set_alpha_to_one=False; we export set_alpha_to_one=True, which the in-suite DDIM reproduces).
* t' is drawn continuously in (t_e, t_s] (VP alphas interpolated), not on the paper's DDIM grid.
* Caption dropout in the phased variant replaces only the student's prompt; the teacher keeps the
  prompt and its guidance, as the plain variant's dropped samples keep their guided pair.
* Pairs come from DPM-Solver++(2M) (`dpmpp_2m`) by default; the paper used DPM-Solver (`dpmsolver`).
* The pair's eps (`pair_noise: effective`, default) is eps = (x_T - alpha_T' x_0) / sigma_T' with T' the
  sampler's first timestep, so the path passes through x_T exactly where sampling starts and the 1-step
  sample is a training point. The paper takes eps = x_T (`pair_noise: initial`); on VP that path misses
  x_T by alpha_T' x_0 (alpha_999 = 0.068 on SD), an error one step amplifies by 1/alpha_T'. The
  effective eps is the phased eps* of a single phase from (T', x_T) to the clean x_0. On flow
  teachers alpha_T' = 0 and the two agree. configs/sd15_reflow.yaml keeps the paper's choice.
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import Literal

import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

import trainers.pairs  # noqa: F401  (registers data.kind "pairs")
from pipelines.backbones import adapters_disabled
from pipelines.conditioning import Conditioning
from pipelines.samplers import guided
from pipelines.schedules import append_dims, shift_sigma, to_x0_eps, uniform_flow_sigmas
from trainers.method import LossOutput, Method, Recommended, initial_noise
from trainers.pairs import default_solver, solve
from trainers.profiling import phase
from trainers.strict import ConfigError, field
from trainers.timesteps import sample_timesteps

IMAGE_FREE_KINDS = ("prompts", "text_cache", "pairs")


@dataclass
class ReflowConfig:
    variant: Literal["plain", "phased"] = field("plain", "plain: pairs from make_pairs.py; phased: real images + teacher")
    huber_c: float = field(0.001, "pseudo-Huber constant c on x_0 (plain) or x_end (phased)")
    caption_dropout: float = field(0.1, "probability of training on the unconditional embedding (keeps CFG)")
    pair_noise: Literal["effective", "initial"] = field("effective", "plain: eps of the pair's path; effective: "
                                                        "through x_T at the sampler's first step, initial: x_T")
    timesteps: Literal["uniform", "logit_normal"] = field("uniform", "training-time distribution (plain variant)")
    phases: int = field(4, "phased: number of phases (= the exported sampler's steps)")
    phase_steps: int = field(10, "phased: teacher DDIM steps inside one phase")
    teacher_guidance: float = field(3.0, "phased: teacher CFG, diffusers convention (the paper's LCM-form w = 2 is 3)")
    sample_steps: int = field(2, "plain: validation steps and the export's recommended steps (phased: `phases`)")
    guidance: float = field(1.5, "validation CFG and the export's recommended guidance")

    def __post_init__(self):
        if self.huber_c <= 0:
            raise ValueError(f"huber_c must be > 0, got {self.huber_c}")
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1), got {self.caption_dropout}")
        if self.phases < 1 or self.phase_steps < 1 or self.sample_steps < 1:
            raise ValueError(f"phases, phase_steps and sample_steps must be >= 1; got {self.phases}, "
                             f"{self.phase_steps}, {self.sample_steps}")


# ------------------------------------------------------------------ the maths


def pseudo_huber(x: torch.Tensor, y: torch.Tensor, c: float) -> torch.Tensor:
    """Per-sample mean over non-batch dims of sqrt((x - y)^2 + c^2) - c."""
    return ((x.float() - y.float()).pow(2) + c * c).sqrt().sub(c).flatten(1).mean(1)


def first_order_point(x_0: torch.Tensor, eps: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x_t = alpha_t x_0 + sigma_t eps with the pair held fixed (alpha, sigma broadcastable)."""
    return alpha * x_0 + sigma * eps


def pair_noise(x_T: torch.Tensor, x_0: torch.Tensor, schedule, kind: str) -> torch.Tensor:
    """The eps of the pair's first-order path: "effective" makes the path pass through x_T at the sampler's
    first timestep T' (eps = (x_T - alpha_T' x_0) / sigma_T'); "initial" takes eps = x_T (the paper)."""
    if kind == "initial":
        return x_T
    t_first = schedule.timesteps(1).to(x_T.device, torch.float32)
    alpha, sigma = (append_dims(a, x_T.ndim) for a in schedule.alpha_sigma(t_first))
    return (x_T - alpha * x_0) / sigma


def reflow_loss(output: torch.Tensor, x_t: torch.Tensor, x_0: torch.Tensor, alpha: torch.Tensor,
                sigma: torch.Tensor, prediction_type: str, c: float) -> tuple[torch.Tensor, dict]:
    """Plain Rectified Diffusion: pseudo-Huber between the model's x0_hat at x_t and the pair's x_0."""
    x0_hat, _ = to_x0_eps(output.float(), x_t, alpha, sigma, prediction_type)
    loss = pseudo_huber(x0_hat, x_0, c)
    mse = (x0_hat.detach() - x_0).pow(2).flatten(1).mean(1)
    return loss, {"huber_x0": loss.detach().mean(), "mse_x0": mse.mean()}


def phase_pair(x_s: torch.Tensor, x_e: torch.Tensor, alpha_s, sigma_s, alpha_e, sigma_e) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0*, eps*): the one (x_0, eps) whose first-order path passes through x_s and x_e.

    eps* = (alpha_s x_e - alpha_e x_s) / (alpha_s sigma_e - alpha_e sigma_s), which equals
    (x_e / alpha_e - x_s / alpha_s) / (nsr_e - nsr_s); x0* = (sigma_e x_s - sigma_s x_e) / (same).
    """
    det = alpha_s * sigma_e - alpha_e * sigma_s
    return (sigma_e * x_s - sigma_s * x_e) / det, (alpha_s * x_e - alpha_e * x_s) / det


def ddim_jump(x0_hat: torch.Tensor, eps_hat: torch.Tensor, alpha_e, sigma_e) -> torch.Tensor:
    """One deterministic DDIM step to (alpha_e, sigma_e): alpha_e (x_t/alpha_t + (nsr_e - nsr_t) eps_hat)."""
    return alpha_e * x0_hat + sigma_e * eps_hat


def phased_loss(output: torch.Tensor, x_t: torch.Tensor, x_e: torch.Tensor, alpha_t, sigma_t, alpha_e, sigma_e,
                prediction_type: str, c: float) -> tuple[torch.Tensor, dict]:
    """Phased Rectified Diffusion: pseudo-Huber between one DDIM step from x_t and the teacher's x_e."""
    x0_hat, eps_hat = to_x0_eps(output.float(), x_t, alpha_t, sigma_t, prediction_type)
    loss = pseudo_huber(ddim_jump(x0_hat, eps_hat, alpha_e, sigma_e), x_e, c)
    return loss, {"huber_end": loss.detach().mean()}


def sampling_grid(schedule, steps: int) -> torch.Tensor:
    """The student's descending `steps`-step grid (float64). VP: DDIM trailing (999, 749, 499, 249 at 4).
    Flow: N uniform sigmas 1, (N-1)/N, ..., 1/N under the teacher's shift; diffusers' default flow grid
    would end at its smallest training sigma, making the last of N steps almost empty (at N = 2, one real
    step), so the export's model card passes these sigmas."""
    if schedule.kind == "vp":
        return schedule.timesteps(steps)
    u = torch.tensor(uniform_flow_sigmas(steps), dtype=torch.float64)
    return shift_sigma(u, schedule.shift) * schedule.num_train_timesteps


def phase_boundaries(schedule, phases: int) -> torch.Tensor:
    """Descending [phases + 1] timesteps: the sampler's grid at `phases` steps, then 0 (the clean end)."""
    return torch.cat([sampling_grid(schedule, phases).float(), torch.zeros(1)])


def end_alpha_sigma(schedule, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha, sigma) at t, with t = 0 meaning the clean point (1, 0) where the sampler's last step lands."""
    alpha, sigma = schedule.alpha_sigma(t)
    clean = t <= 0
    return torch.where(clean, torch.ones_like(alpha), alpha), torch.where(clean, torch.zeros_like(sigma), sigma)


@torch.no_grad()
def teacher_segment(model_fn, x_s: torch.Tensor, t_s: torch.Tensor, t_e: torch.Tensor, steps: int, schedule) -> torch.Tensor:
    """`steps` DDIM steps from x_s at t_s to t_e on a per-sample uniform grid (t [B]); ends clean at t_e = 0."""
    work = torch.promote_types(x_s.dtype, torch.float32)  # a half-precision teacher's outputs are upcast
    x = x_s.to(work)
    for j in range(steps):
        t = t_s + (t_e - t_s) * (j / steps)
        t_next = t_s + (t_e - t_s) * ((j + 1) / steps)
        x0_hat, eps_hat = model_fn(x, t)
        alpha, sigma = (append_dims(a, x.ndim) for a in end_alpha_sigma(schedule, t_next))
        x = ddim_jump(x0_hat.to(work), eps_hat.to(work), alpha.to(work), sigma.to(work))
    return x


def export_scheduler(bundle):
    """DDIM with trailing spacing (VP) or flow Euler: what the in-suite 1-4 step sampler reproduces."""
    if bundle.schedule.kind == "flow":
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=bundle.schedule.num_train_timesteps,
                                               shift=bundle.schedule.shift)
    return DDIMScheduler.from_config(bundle.scheduler.config, timestep_spacing="trailing", set_alpha_to_one=True,
                                     clip_sample=False, thresholding=False, prediction_type=bundle.prediction_type)


# ------------------------------------------------------------------ the method


class Reflow(Method):
    config_class = ReflowConfig

    def __init__(self, cfg, bundle):
        super().__init__(cfg, bundle)
        opts = self.options
        self.lora = cfg.model.lora.rank > 0
        self.teacher = None
        if self.lora:
            student = bundle.denoiser  # adapters trainable; with them switched off it is the teacher
            if opts.variant == "phased" and not hasattr(student, "disable_adapters"):
                raise ValueError(f"phased reflow with LoRA needs a diffusers peft denoiser; {type(student).__name__} is not")
        elif opts.variant == "phased":
            self.teacher = bundle.denoiser.requires_grad_(False).eval()
            student = copy.deepcopy(self.teacher).float().requires_grad_(True)
        else:
            student = bundle.denoiser.float().requires_grad_(True)  # the pairs already hold the teacher
        student.train()
        self.student = student
        self.image_size = (cfg.data.resolution, cfg.data.resolution)
        with torch.no_grad():
            # The unconditional input diffusers uses for CFG, so dropout trains the branch sampling calls.
            self.uncond = bundle.encode_unconditional(1, image_size=self.image_size)
        self.bounds = phase_boundaries(bundle.schedule, opts.phases)

    @classmethod
    def check_config(cls, cfg, source: str) -> None:
        kind, variant = cfg.data.kind, cfg.options.variant
        if variant == "plain" and kind != "pairs":
            raise ConfigError(f"{source}: data.kind: plain reflow trains on teacher pairs; set data.kind: pairs "
                              f"(a folder from scripts/make_pairs.py), or reflow.variant: phased for images")
        if variant == "phased" and kind in IMAGE_FREE_KINDS:
            raise ConfigError(f"{source}: data.kind: phased reflow trains on images; '{kind}' has none")

    def trainable(self) -> dict[str, torch.nn.Module]:
        return {"student": self.student}

    def conditioning(self, batch: dict) -> Conditioning:
        if "cond" in batch:  # cached by make_pairs at the pairs' resolution
            return Conditioning.cat([Conditioning(c)[None] for c in batch["cond"]])
        return self.bundle.encode_prompt(batch["prompt"], image_size=self.image_size)

    def loss(self, batch: dict, step: int, groups: list[str], generator: torch.Generator) -> LossOutput:
        if self.options.variant == "phased":
            return self.phased(batch, generator)
        bundle, opts, device = self.bundle, self.options, generator.device
        x_0, x_T = batch["x_0"].to(device).float(), batch["x_T"].to(device).float()
        n = x_0.shape[0]
        eps = pair_noise(x_T, x_0, bundle.schedule, opts.pair_noise)
        keep = torch.rand(n, generator=generator, device=device) >= opts.caption_dropout
        cond = self.conditioning(batch).to(device=device).where(keep, self.uncond)
        t = sample_timesteps(bundle.schedule, n, opts.timesteps, generator)
        alpha, sigma = (append_dims(a, x_0.ndim) for a in bundle.schedule.alpha_sigma(t))
        x_t = first_order_point(x_0, eps, alpha, sigma)
        with phase("student"):
            output = bundle.predict(self.modules["student"], x_t, t, cond)
        loss, logs = reflow_loss(output, x_t, x_0, alpha, sigma, bundle.prediction_type, opts.huber_c)
        return LossOutput(loss, logs)

    def _teacher(self):
        """The frozen teacher, or (LoRA) the student with its adapters switched off."""
        if self.teacher is not None:
            return contextlib.nullcontext(self.teacher)
        return adapters_disabled(self.modules["student"])

    def phased(self, batch: dict, generator: torch.Generator) -> LossOutput:
        bundle, opts, device, schedule = self.bundle, self.options, generator.device, self.bundle.schedule
        with torch.no_grad(), phase("encode"):
            x_0 = self.clean_latents(batch, generator).to(device)
            cond = self.conditioning(batch).to(device=device)
        n, ndim = x_0.shape[0], x_0.ndim
        k = torch.randint(0, opts.phases, (n,), generator=generator, device=device)
        bounds = self.bounds.to(device)
        t_s, t_e = bounds[k], bounds[k + 1]
        eps = torch.randn(x_0.shape, generator=generator, device=device)
        alpha_s, sigma_s = (append_dims(a, ndim) for a in schedule.alpha_sigma(t_s))
        x_s = first_order_point(x_0, eps, alpha_s, sigma_s)
        with torch.no_grad(), phase("teacher"), self._teacher() as teacher:
            predict = lambda x, tt, c: bundle.predict(teacher, x, tt, c)  # noqa: E731
            model_fn = guided(predict, cond, self.uncond, opts.teacher_guidance, bundle.prediction_type, schedule)
            x_e = teacher_segment(model_fn, x_s, t_s, t_e, opts.phase_steps, schedule)
        alpha_e, sigma_e = (append_dims(a, ndim) for a in end_alpha_sigma(schedule, t_e))
        x0_star, eps_star = phase_pair(x_s, x_e, alpha_s, sigma_s, alpha_e, sigma_e)
        u = torch.rand(n, generator=generator, device=device)
        t = t_e + (t_s - t_e) * (1 - u)  # in (t_e, t_s]
        alpha_t, sigma_t = (append_dims(a, ndim) for a in schedule.alpha_sigma(t))
        x_t = first_order_point(x0_star, eps_star, alpha_t, sigma_t)
        keep = torch.rand(n, generator=generator, device=device) >= opts.caption_dropout
        with phase("student"):
            output = bundle.predict(self.modules["student"], x_t, t, cond.where(keep, self.uncond))
        loss, logs = phased_loss(output, x_t, x_e, alpha_t, sigma_t, alpha_e, sigma_e, bundle.prediction_type,
                                 opts.huber_c)
        return LossOutput(loss, logs)

    def recommended(self) -> Recommended:
        steps = self.options.phases if self.options.variant == "phased" else self.options.sample_steps
        return Recommended(steps=steps, guidance=self.options.guidance, scheduler=export_scheduler(self.bundle))

    def flow_sigmas(self, steps: int) -> list[float] | None:
        """`sampling_grid` before the scheduler's shift (flow students; 1 step is the default grid)."""
        if self.bundle.schedule.kind == "vp" or steps < 2:
            return None
        return uniform_flow_sigmas(steps)

    @torch.no_grad()
    def generate(self, prompts: list[str], generator: torch.Generator) -> torch.Tensor:
        seeds = torch.randint(0, 2**31 - 1, (len(prompts),), generator=generator).tolist()
        return self.sample(prompts, seeds, self.recommended().steps, self.options.guidance)

    @torch.no_grad()
    def sample(self, prompts: list[str], seeds: list[int], steps: int, guidance: float) -> torch.Tensor:
        bundle = self.bundle
        x_T = initial_noise(bundle.latent_shape(1, self.image_size)[1:], seeds, bundle.denoiser.device)
        cond = bundle.encode_prompt(prompts, image_size=self.image_size)
        x_0 = solve(bundle, self.export_denoiser(), cond, self.uncond, x_T, steps, guidance,
                    default_solver(bundle.schedule), timesteps=sampling_grid(bundle.schedule, steps))
        return bundle.decode_latents(x_0).clamp(-1, 1)
