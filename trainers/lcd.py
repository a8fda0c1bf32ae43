"""Latent consistency distillation (LCD): a 2-8 step student from a VP or flow-matching teacher.

Paper: Latent Consistency Models, Luo et al., arXiv 2310.04378 (LCM-LoRA: arXiv 2311.05556).
Each step (LCM Alg. 1, Eqs. 8-11):

    n ~ U{0..N-1},  t_{n+k} = (n + 1) k - 1,  t_n = max(t_{n+k} - k, 0),  k = T / N      (skip-step grid)
    w ~ U[w_min, w_max]                                                                  (LCM-form guidance)
    x_{t_{n+k}} = alpha x_0 + sigma eps                                                  (x_0: VAE latents)
    teacher:  (x0, eps)_w = c + w (c - u) on both, then x_{t_n} = alpha_n x0_w + sigma_n eps_w   (DDIM solver)
    student:  f_theta(x, t, w) = c_skip(t) x + c_out(t) x0_theta(x, t, w)                (boundary conditions)
    L = d(f_theta(x_{t_{n+k}}, t_{n+k}, w), f_target(x_{t_n}, t_n, w))

d is the per-element pseudo-Huber distance (c = 0.001, as the reference scripts) or the squared error;
f_target is an EMA copy of the student (decay 0.95, LCM Sec. 4.2) kept by the loop as the "target"
average. The guidance weight w reaches the student through a sinusoidal embedding of dimension 256
added by the UNet's `time_cond_proj_dim` input (a new layer; every other weight is the teacher's), so the
exported folder runs as plain diffusers with `guidance_scale = w + 1` and no CFG pass.

Flow-matching teachers (SD3, Sana; x_t = (1 - sigma) x_0 + sigma eps, t = T sigma) use the same step with
two changes. The grid is t_n = T shift(n / N), n = 0..N, with the teacher's sigma shift, so its top point is
pure noise. The student's output is f = x0_hat = x_t - sigma v_theta with no c_skip/c_out: at sigma = 0 it
is x_t exactly, the boundary condition the VP scalings approximate. The DDIM solver step
alpha' x0 + sigma' eps is then the flow Euler step x_t + (sigma' - sigma) v, and the export is
`FlowMatchEulerDiscreteScheduler(stochastic_sampling=True)`, whose step x0 = x - sigma v, then
(1 - sigma') x0 + sigma' z, is the multistep consistency sampler.

Deviations and choices:
* The guidance embedding needs a UNet (`time_cond_proj_dim`); transformer backbones and LoRA students run
  with `lcd.guidance_embedding: false`, which distills the guided teacher into the plain student (LCM-LoRA)
  and is sampled with guidance 1 (or mild ordinary CFG).
* LoRA: the frozen base *is* the teacher (adapters switched off for the teacher pass), and with
  `target_decay: 0` the target is the online student under stop-grad, as LCM-LoRA trains; no extra copies.
* The student keeps the teacher's prediction type; the VP export is `LCMScheduler` with
  `original_inference_steps = N` and the same `timestep_scaling`, which reproduces
  `sample_lcd_latents` (tested against the exported folder). Flow students are sampled on the grid's own
  sigmas: `sigmas=[1, 0.75, 0.5, 0.25]` for 4 steps of N = 20 at shift 1 (diffusers' default flow grid
  [1, 0.667, 0.334, 0.001] ends on a step that does nothing).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Literal

import torch

from pipelines.backbones import adapters_disabled, configure_denoiser, unwrap_model
from pipelines.conditioning import Conditioning
from pipelines.samplers import guided
from pipelines.schedules import FlowSchedule, append_dims, to_x0_eps
from trainers.consistency import (consistency_output, ddim_step, guidance_embedding, lcm_boundary,
                                  pick_inference_steps, pseudo_huber, sample_consistency, solver_grid,
                                  squared_error)
from trainers.method import LossOutput, Method, Recommended
from trainers.profiling import phase
from trainers.strict import ConfigError, field


@dataclass
class LCDConfig:
    num_ddim_timesteps: int = field(50, "N: skip-step grid size of the DDIM solver (k = T / N)")
    w_min: float = field(5.0, "smallest LCM-form guidance weight w (diffusers guidance_scale = w + 1)")
    w_max: float = field(15.0, "largest LCM-form guidance weight w")
    guidance_embedding: bool = field(True, "feed w to the student through time_cond_proj_dim (UNet, full training)")
    guidance_embed_dim: int = field(256, "dimension of the guidance-scale embedding")
    target_decay: float = field(0.95, "EMA decay of the target network; 0 uses the online student (stop-grad)")
    loss: Literal["huber", "l2"] = field("huber", "distance between student and target outputs")
    huber_c: float = field(0.001, "pseudo-Huber constant c")
    timestep_scaling: float = field(10.0, "LCM boundary-condition scaling of t (diffusers' timestep_scaling)")
    sample_steps: int = field(4, "steps of the validation sampler and the recommended steps of the export")
    guidance: float = field(8.0, "diffusers guidance_scale for validation/export (the student gets w = guidance - 1)")

    def __post_init__(self):
        if not 0 <= self.w_min <= self.w_max:
            raise ValueError(f"need 0 <= w_min <= w_max, got w_min={self.w_min}, w_max={self.w_max}")
        if not 0.0 <= self.target_decay < 1.0:
            raise ValueError(f"target_decay must be in [0, 1), got {self.target_decay}")
        if not 1 <= self.sample_steps <= self.num_ddim_timesteps:
            raise ValueError(f"sample_steps must be in [1, num_ddim_timesteps={self.num_ddim_timesteps}], "
                             f"got {self.sample_steps}")


def lcd_distance(f_student: torch.Tensor, f_target: torch.Tensor, kind: str, c: float) -> torch.Tensor:
    """Per-sample distance d(f_student, f_target): pseudo-Huber with constant c, or squared error."""
    return pseudo_huber(f_student, f_target, c) if kind == "huber" else squared_error(f_student, f_target)


def lcd_boundary(schedule, timestep_scaling: float):
    """t -> (c_skip, c_out) of LCM for VP teachers; None for flow teachers, whose f = x0_hat needs none."""
    if schedule.kind == "vp":
        return lambda t: lcm_boundary(t, timestep_scaling)
    return None


def lcd_timesteps(schedule, num_ddim_timesteps: int, steps: int) -> torch.Tensor:
    """Native timesteps of `steps`-step sampling: LCMScheduler's picks from the solver grid (descending)."""
    return pick_inference_steps(solver_grid(schedule, num_ddim_timesteps), steps)


def make_student(teacher: torch.nn.Module, embed_dim: int | None, seed: int) -> torch.nn.Module:
    """A float32 copy of the teacher; with `embed_dim`, a UNet built with time_cond_proj_dim (new layer seeded)."""
    config = dict(teacher.config)
    if embed_dim is not None:
        if "time_cond_proj_dim" not in config:
            raise ValueError(f"lcd.guidance_embedding needs a UNet with time_cond_proj_dim; {type(teacher).__name__} "
                             "has none: set lcd.guidance_embedding: false")
        config["time_cond_proj_dim"] = embed_dim
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        student = type(teacher).from_config(config)
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    if unexpected or any("cond_proj" not in k for k in missing):
        raise RuntimeError(f"student/teacher weights do not line up: missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]}")
    return student.to(teacher.device)  # from_config builds float32 weights


class LCD(Method):
    config_class = LCDConfig

    def __init__(self, cfg, bundle):
        super().__init__(cfg, bundle)
        opts = self.options
        self.lora = cfg.model.lora.rank > 0
        self.embed_dim = opts.guidance_embed_dim if opts.guidance_embedding else None
        if self.lora:
            student = bundle.denoiser  # adapters already added and trainable; the base is the teacher
            if not hasattr(student, "disable_adapters"):
                raise ValueError(f"lcd with LoRA needs a diffusers peft denoiser; {type(student).__name__} is not")
            self.teacher = None
        else:
            self.teacher = bundle.denoiser.requires_grad_(False).eval()
            student = make_student(self.teacher, self.embed_dim, cfg.train.seed)
            configure_denoiser(student, gradient_checkpointing=cfg.model.gradient_checkpointing,
                               attention=cfg.model.attention)
            student.requires_grad_(True)
        student.train()
        self.student = student
        self.image_size = (cfg.data.resolution, cfg.data.resolution)
        with torch.no_grad():
            self.uncond = bundle.encode_unconditional(1, image_size=self.image_size)
        self.grid = solver_grid(bundle.schedule, opts.num_ddim_timesteps)
        self.boundary = lcd_boundary(bundle.schedule, opts.timestep_scaling)

    @classmethod
    def check_config(cls, cfg, source: str) -> None:
        if cfg.data.kind in ("prompts", "text_cache"):
            raise ConfigError(f"{source}: data.kind: lcd trains on images (latents); '{cfg.data.kind}' has none")
        if cfg.model.lora.rank > 0 and cfg.options.guidance_embedding:
            raise ConfigError(f"{source}: lcd.guidance_embedding: a LoRA student cannot add the embedding layer; "
                              "set lcd.guidance_embedding: false (LCM-LoRA) or model.lora.rank: 0")

    def trainable(self) -> dict[str, torch.nn.Module]:
        return {"student": self.student}

    def averaged(self) -> dict[str, tuple[str, float]]:
        specs = super().averaged()
        if self.options.target_decay > 0:
            specs["target"] = ("student", self.options.target_decay)
        return specs

    # ---- the pieces of one step -------------------------------------------------------------
    def with_guidance(self, cond: Conditioning, w: torch.Tensor) -> Conditioning:
        if self.embed_dim is None:
            return cond
        return Conditioning({**cond.kwargs, "timestep_cond": guidance_embedding(w, self.embed_dim)})

    def consistency(self, net, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """f(x_t, t) = c_skip x_t + c_out x0_hat (flow: x0_hat) from one call of `net`."""
        alpha, sigma = (append_dims(a, x_t.ndim) for a in self.bundle.schedule.alpha_sigma(t))
        out = self.bundle.predict(net, x_t, t, cond).float()
        x0_hat, _ = to_x0_eps(out, x_t, alpha, sigma, self.bundle.prediction_type)
        return x0_hat if self.boundary is None else consistency_output(x_t, x0_hat, *self.boundary(t))

    def _teacher(self):
        """The frozen teacher, or (LoRA) the student with its adapters switched off."""
        if self.teacher is not None:
            return contextlib.nullcontext(self.teacher)
        return adapters_disabled(self.modules["student"])

    @torch.no_grad()
    def teacher_step(self, x_t: torch.Tensor, t: torch.Tensor, t_prev: torch.Tensor, cond: Conditioning,
                     w: torch.Tensor) -> torch.Tensor:
        """One DDIM step t -> t_prev of the teacher guided by c + w (c - u) (= diffusers scale w + 1)."""
        b = self.bundle
        with self._teacher() as teacher:
            predict = lambda x, tt, c: b.predict(teacher, x, tt, c)  # noqa: E731
            x0_hat, eps_hat = guided(predict, cond, self.uncond, w + 1.0, b.prediction_type, b.schedule)(x_t, t)
        alpha, sigma = (append_dims(a, x_t.ndim) for a in b.schedule.alpha_sigma(t_prev))
        return ddim_step(x0_hat.float(), eps_hat.float(), alpha, sigma)

    def target_net(self):
        return self.averages["target"] if "target" in self.averages else unwrap_model(self.modules["student"])

    def consistency_pair(self, batch: dict, generator: torch.Generator):
        """(f_student at t_{n+k}, f_target at t_n without grad, the student's conditioning, logs)."""
        b, opts = self.bundle, self.options
        device = generator.device
        with torch.no_grad(), phase("encode"):
            x_0 = self.clean_latents(batch, generator).to(device)
            cond = b.encode_prompt(batch["prompt"], image_size=self.image_size)
        n = x_0.shape[0]
        index = torch.randint(1, opts.num_ddim_timesteps + 1, (n,), generator=generator, device=device)
        grid = self.grid.to(device)
        t, t_prev = grid[index].float(), grid[index - 1].float()
        w = opts.w_min + (opts.w_max - opts.w_min) * torch.rand(n, generator=generator, device=device)
        eps = torch.randn(x_0.shape, generator=generator, device=device)
        alpha, sigma = (append_dims(a, x_0.ndim) for a in b.schedule.alpha_sigma(t))
        x_t = alpha * x_0 + sigma * eps
        student_cond = self.with_guidance(cond, w)
        with phase("student"):
            f_student = self.consistency(self.modules["student"], x_t, t, student_cond)
        with torch.no_grad():
            with phase("teacher"):
                x_prev = self.teacher_step(x_t, t, t_prev, cond, w)
            with phase("target"):
                f_target = self.consistency(self.target_net(), x_prev, t_prev, student_cond)
        return f_student, f_target, student_cond, {"w": w.mean(), "t": t.mean()}

    def loss(self, batch: dict, step: int, groups: list[str], generator: torch.Generator) -> LossOutput:
        f_student, f_target, _, logs = self.consistency_pair(batch, generator)
        loss = lcd_distance(f_student, f_target, self.options.loss, self.options.huber_c)
        return LossOutput(loss, {"loss_consistency": loss.detach().mean(), **logs})

    # ---- sampling and export ---------------------------------------------------------------
    def recommended(self) -> Recommended:
        from diffusers import FlowMatchEulerDiscreteScheduler, LCMScheduler

        b, opts = self.bundle, self.options
        if b.schedule.kind == "vp":
            scheduler = LCMScheduler.from_config(
                b.scheduler.config, prediction_type=b.prediction_type,
                original_inference_steps=opts.num_ddim_timesteps, timestep_scaling=opts.timestep_scaling,
                clip_sample=False, thresholding=False)
        else:
            scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=b.schedule.num_train_timesteps,
                                                        shift=b.schedule.shift, stochastic_sampling=True)
        guidance = opts.guidance if self.embed_dim is not None else 1.0
        return Recommended(steps=opts.sample_steps, guidance=guidance, scheduler=scheduler)

    def flow_sigmas(self, steps: int) -> list[float] | None:
        """LCMScheduler's picks from the solver grid n / N, unshifted: the exported scheduler applies the shift."""
        b = self.bundle
        if b.schedule.kind == "vp" or steps < 2:
            return None
        T = b.schedule.num_train_timesteps
        return (lcd_timesteps(FlowSchedule(T, 1.0), self.options.num_ddim_timesteps, steps) / T).tolist()

    @torch.no_grad()
    def generate(self, prompts: list[str], generator: torch.Generator) -> torch.Tensor:
        rec = self.recommended()
        latents = sample_lcd_latents(self.bundle, self.export_denoiser(), prompts, rec.steps, rec.guidance, generator,
                                     self.image_size, self.options.num_ddim_timesteps, self.options.timestep_scaling,
                                     self.embed_dim)
        return self.bundle.decode_latents(latents).clamp(-1, 1)


@torch.no_grad()
def sample_lcd_latents(bundle, denoiser, prompts: list[str], steps: int, guidance: float, generator: torch.Generator,
                       image_size: tuple[int, int] | None, original_steps: int, timestep_scaling: float,
                       embed_dim: int | None) -> torch.Tensor:
    """LCM multistep sampling (what the exported scheduler + the diffusers pipeline compute), returning latents.

    With a guidance embedding the student sees w = guidance - 1 and runs once per step; without one,
    `guidance` > 1 is ordinary classifier-free guidance.
    """
    was_training = denoiser.training
    denoiser.eval()
    n = len(prompts)
    cond = bundle.encode_prompt(prompts, image_size=image_size)
    x = torch.randn(bundle.latent_shape(n, image_size), generator=generator, device=generator.device)
    predict = lambda x_t, t, c: bundle.predict(denoiser, x_t, t, c)  # noqa: E731
    if embed_dim is not None:
        w = torch.full((n,), guidance - 1.0, device=x.device)
        cond = Conditioning({**cond.kwargs, "timestep_cond": guidance_embedding(w, embed_dim)})
        model_fn = guided(predict, cond, None, 1.0, bundle.prediction_type, bundle.schedule)
    else:
        uncond = bundle.encode_unconditional(n, image_size=image_size)
        model_fn = guided(predict, cond, uncond, guidance, bundle.prediction_type, bundle.schedule)
    timesteps = lcd_timesteps(bundle.schedule, original_steps, steps)
    x_0 = sample_consistency(model_fn, x, timesteps, bundle.schedule, generator,
                             boundary=lcd_boundary(bundle.schedule, timestep_scaling))
    denoiser.train(was_training)
    return x_0
