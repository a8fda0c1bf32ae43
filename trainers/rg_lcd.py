"""Reward-guided latent consistency distillation (RG-LCD): LCD plus a reward on the student's estimate.

Papers: Reward Guided Latent Consistency Distillation, Li, Feng, Chen, Wang, TMLR 2024, arXiv 2403.11027
(Eq. 5-7, Sec. 4); the LCD part is Latent Consistency Models, Luo et al., arXiv 2310.04378, reused
unchanged from `trainers/lcd.py` (this class subclasses `LCD`). Per sample:

    f = f_theta(x_{t_{n+k}}, t_{n+k}, w)                  the student's one-step estimate of x_0 at the *sampled* t
    L = d(f, f_target) - beta R(D(f), c)                  optimize: expert (R differentiable, D the VAE decoder)
    L = d(f, f_target) - beta R_phi(f, c)                 optimize: lrm    (latent proxy reward model, no decode)

The LRM R_phi (trainers/latent_reward.py) is fitted online to the expert on triplets
z = {f (student estimate), f_target (LCD target), x_0 (real latent)} of the first `lrm.batch_size`
samples: L_phi = KL(softmax(a R(D(z), c)) || softmax(R_phi(z, c))), over the three pairs (the reference
code) or one 3-way softmax. Optional clipping of the expert, R <- -relu(ceiling - R), is the reference
code's ImageReward transform (ceiling 2).

Groups and gradients: "student" and "lrm" step together every iteration from one backward pass. The
student's reward term calls the LRM with detached parameters (`frozen_call`), and the LRM sees detached
latents, so each term reaches only its own network; the LRM is updated from the same step's latents, as in
the reference code (student step, then LRM step). The LRM's LR is `optim_groups.lrm.lr` (paper 3.3e-6 when
fine-tuning a pre-trained LRM). The teacher, VAE, text encoders and the expert reward stay frozen.

Deviations and choices:
* Reward units: the suite's CLIP-style rewards (hpsv2.1, clip_score, toy_clip) report 100 * cos, the
  reference code maximised the raw cosine with `reward_scale` 1; beta = 0.01 here is the paper's 1.
  The LRM's score is exp(s) * cos (s learnable, exp(s) <= 100), in the same units as the expert, so the
  same beta serves both modes.
* The LRM is a small configurable latent ViT whose text tower reads the teacher's frozen token
  embeddings, not the paper's OpenCLIP latent ViT with a ViT-H text tower (unreleased weights, ~350M
  parameters); its whole network trains (the paper unlocks only the last layers of a pre-trained one).
  `lrm.init` loads a checkpoint from scripts/pretrain_lrm.py; `lrm.online: false` keeps it frozen.
* The real latent of the triplet is the VAE posterior mean of the batch images (LCD's x_0 is a posterior
  sample, drawn inside LCD's step).
* The reward is applied to f at the sampled t_{n+k}, as the paper. Decoded images are clamped to [-1, 1]
  before the reward, as the reference code clamps to [0, 1].
* `prompts.path` (not in the paper, default off) adds prompts with no image: each step draws
  `prompts.batch_size` of them, the student's one-step estimate from pure noise at the top of the solver
  grid (where sampling starts) is drawn twice per prompt, and the student climbs the reward of both,
  -beta mean R. The paper's reward sees only the training captions; this lets it reach captions the image
  data cannot hold (on the toy world, unseen colour-shape pairs, whose images are held out). With the LRM,
  the two estimates of a prompt are also a pair the expert ranks, so the LRM learns the expert on the
  very samples the student climbs it on.
* `reward_start` (not in the paper, default 0) holds the reward term off for the first steps, so an LRM
  trained online from scratch can learn the expert before the student follows it.
* A non-differentiable reward (e.g. toy_attributes) cannot be optimised directly and is refused with
  `optimize: expert`; it is a valid expert for the LRM, which is what the LRM is for.
* Export, sampling and the recommended steps/guidance are LCD's (LCMScheduler).
"""
from __future__ import annotations

import os
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, Optional

import torch
from torch import Tensor, nn

from pipelines.backbones import unwrap_model
from pipelines.conditioning import Conditioning
from trainers.data import PromptDataset
from trainers.latent_reward import (LatentRewardConfig, LatentRewardModel, frozen_call, load_latent_reward, lrm_loss,
                                    pairwise_agreement, preference_kl, text_inputs)
from trainers.lcd import LCD, LCDConfig, lcd_distance
from trainers.losses.reward import CeilingReward, reward_term
from trainers.method import LossOutput
from trainers.profiling import phase
from trainers.strict import ConfigError, field


@dataclass
class RewardSpec:
    name: str = field("hpsv2.1", "expert reward: a name in rewards.REWARDS (hpsv2.1, image_reward, weighted, ...)")
    options: dict[str, Any] = field({}, "options of its builder, e.g. {path: /weights/HPS_v2.1_compressed.pt}; "
                                        "weighted terms may carry their own 'ceiling'")
    ceiling: Optional[float] = field(None, "clip the reward as -relu(ceiling - R) (the reference ImageReward: 2)")


@dataclass
class LRMOptions:
    init: Optional[str] = field(None, "safetensors checkpoint to start from (scripts/pretrain_lrm.py); null: random")
    online: bool = field(True, "fine-tune the LRM against the expert during training (its own 'lrm' group)")
    comparison: Literal["pairs", "triplet"] = field("pairs", "KL over the three pairs of a triplet, or one 3-way KL")
    batch_size: int = field(16, "triplets per process per step the expert scores (rm_batch_size); capped by the batch")
    expert_logit_scale: float = field(1.0, "a in softmax(a * R_expert); 1 for 100*cos rewards, ~100 for image_reward")
    loss_scale: float = field(1.0, "weight of the LRM's KL in the summed loss (it only trains the LRM)")
    arch: LatentRewardConfig = field(LatentRewardConfig(), "LRM architecture")

    def __post_init__(self):
        if self.batch_size < 1 or self.expert_logit_scale <= 0 or self.loss_scale < 0:
            raise ValueError(f"lrm: need batch_size >= 1, expert_logit_scale > 0, loss_scale >= 0; got "
                             f"{self.batch_size}, {self.expert_logit_scale}, {self.loss_scale}")


@dataclass
class RewardPrompts:
    path: Optional[str] = field(None, "prompt file (.txt, or .jsonl with a 'prompt' column) whose student samples "
                                      "from pure noise also climb the reward; null: only the batch's captions")
    batch_size: int = field(8, "prompts drawn per process per step, each sampled from two noises")

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"prompts.batch_size: need >= 1, got {self.batch_size}")


@dataclass
class RGLCDConfig(LCDConfig):
    reward: RewardSpec = field(RewardSpec(), "the expert reward")
    optimize: Literal["lrm", "expert"] = field("lrm", "what the student climbs: the latent proxy reward model, "
                                                      "or the expert directly through the VAE decoder")
    reward_scale: float = field(0.01, "beta; 0.01 on a 100*cos reward is the paper's reward_scale 1 on the cosine")
    reward_start: int = field(0, "steps before the student's reward term switches on (an online LRM trained from "
                                 "scratch learns the expert first); 0: from the first step, as the paper")
    lrm: LRMOptions = field(LRMOptions(), "latent proxy reward model (used when optimize: lrm)")
    prompts: RewardPrompts = field(RewardPrompts(), "image-free prompts for the reward term (not in the paper)")

    def __post_init__(self):
        super().__post_init__()
        if self.reward_scale < 0 or self.reward_start < 0:
            raise ValueError(f"need reward_scale, reward_start >= 0, got {self.reward_scale}, {self.reward_start}")


# ------------------------------------------------------------------ maths (pure, unreduced)


def rg_lcd_loss(distance: Tensor, reward: Tensor, beta: float) -> Tensor:
    """Per-sample d(f, f_target) - beta R: minimising it raises the reward of the student's estimate."""
    return distance.float() + reward_term(reward, beta)


# ------------------------------------------------------------------ the expert


def build_expert(spec: RewardSpec, device, dtype: torch.dtype) -> nn.Module:
    """The expert reward, frozen; weighted list terms may carry a per-term 'ceiling'."""
    from rewards import build_reward

    options = dict(spec.options)
    if spec.name == "weighted" and isinstance(options.get("terms"), list):
        terms = []
        for term in options["terms"]:
            term = dict(term)
            ceiling, weight, name = term.pop("ceiling", None), term.pop("weight"), term.pop("name")
            reward = build_reward(name, device=device, dtype=dtype, **term)
            terms.append({"reward": reward if ceiling is None else CeilingReward(reward, ceiling), "weight": weight})
        options["terms"] = terms
    reward = build_reward(spec.name, device=device, dtype=dtype, **options)
    reward = reward if spec.ceiling is None else CeilingReward(reward, spec.ceiling)
    return reward.requires_grad_(False).eval()


def reward_differentiable(name: str, options: Mapping, source: str) -> Optional[bool]:
    """Whether reward `name` is differentiable, from its builder's return class (no weights loaded);
    None when the builder does not say."""
    from rewards import REWARDS

    if name not in REWARDS:
        raise ConfigError(f"{source}: rg_lcd.reward.name: unknown reward {name!r} (known: {', '.join(REWARDS)})")
    if name == "weighted":
        terms = options.get("terms", {})
        names = list(terms) if isinstance(terms, Mapping) else [dict(t).get("name") for t in terms]
        flags = [reward_differentiable(n, {}, source) for n in names]
        return False if False in flags else (None if None in flags else True)
    try:
        returned = typing.get_type_hints(REWARDS[name]).get("return")
    except Exception:  # an unresolvable annotation: decided when the reward is built
        return None
    return getattr(returned, "differentiable", None)


# ------------------------------------------------------------------ the method


class RGLCD(LCD):
    config_class = RGLCDConfig

    def __init__(self, cfg, bundle):
        super().__init__(cfg, bundle)
        opts = self.options
        needs_expert = opts.optimize == "expert" or opts.lrm.online
        dtype = getattr(torch, cfg.model.weight_dtype)
        self.reward = build_expert(opts.reward, bundle.vae.device, dtype) if needs_expert else None
        if opts.optimize == "expert" and not self.reward.differentiable:
            raise ConfigError(f"rg_lcd.reward: {self.reward.name} is not differentiable; set rg_lcd.optimize: lrm")
        self.lrm = self._make_lrm(cfg) if opts.optimize == "lrm" else None
        self.reward_prompts = PromptDataset(opts.prompts.path).prompts if opts.prompts.path else None

    @classmethod
    def check_config(cls, cfg, source: str) -> None:
        super().check_config(cfg, source)
        opts = cfg.options
        differentiable = reward_differentiable(opts.reward.name, opts.reward.options, source)  # checks the name too
        if opts.optimize == "expert" and differentiable is False:
            raise ConfigError(f"{source}: rg_lcd.reward: {opts.reward.name} is not differentiable, so the student "
                              "cannot climb it directly; set rg_lcd.optimize: lrm (the LRM learns a proxy of it)")
        if opts.optimize == "lrm" and not opts.lrm.online and opts.lrm.init is None:
            raise ConfigError(f"{source}: rg_lcd.lrm: a frozen LRM (online: false) needs lrm.init (a checkpoint)")
        if opts.prompts.path is not None and not os.path.isfile(opts.prompts.path):
            raise ConfigError(f"{source}: rg_lcd.prompts.path: {opts.prompts.path} not found; give a prompt file "
                              "(one prompt per line) or null")

    def _make_lrm(self, cfg) -> LatentRewardModel:
        opts = self.options.lrm
        channels = self.bundle.denoiser.config.in_channels
        text_dim = text_inputs(self.uncond)[0].shape[-1]
        if opts.init:
            model = load_latent_reward(opts.init, opts.arch, channels, text_dim)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(cfg.train.seed + 1)
                model = LatentRewardModel(opts.arch, channels, text_dim)
        return model.to(self.bundle.vae.device).requires_grad_(opts.online).train(opts.online)

    def trainable(self) -> dict[str, nn.Module]:
        groups = super().trainable()
        if self.lrm is not None and self.options.lrm.online:
            groups["lrm"] = self.lrm
        return groups

    def _lrm_module(self) -> nn.Module:
        return unwrap_model(self.modules["lrm"]) if "lrm" in self.modules else self.lrm

    def loss(self, batch: dict, step: int, groups: list[str], generator: torch.Generator) -> LossOutput:
        opts = self.options
        f_student, f_target, cond, pair_logs = self.consistency_pair(batch, generator)
        distance = lcd_distance(f_student, f_target, opts.loss, opts.huber_c)
        prompts = list(batch["prompt"])
        with phase("reward"):
            reward = self.student_reward(f_student, cond, prompts)
        beta = opts.reward_scale if step >= opts.reward_start else 0.0
        loss = rg_lcd_loss(distance, reward, beta)
        logs = {"loss_consistency": distance.detach().mean(), **pair_logs, "reward": reward.detach().mean()}
        if "lrm" in groups and "lrm" in self.modules:
            with phase("lrm"):
                lrm_term, lrm_logs = self.lrm_term(batch, f_student.detach(), f_target, cond, prompts)
            loss = loss + lrm_term
            logs.update(lrm_logs)
        if self.reward_prompts is not None:
            with phase("prompts"):
                prompt_loss, prompt_logs = self.prompt_term(beta, "lrm" in groups and "lrm" in self.modules,
                                                            generator)
            loss = loss + prompt_loss
            logs.update(prompt_logs)
        return LossOutput(loss, logs)

    def student_reward(self, f_student: Tensor, cond: Conditioning, prompts: list[str]) -> Tensor:
        """R(D(f), c) through the VAE (expert), or R_phi(f, c) with the LRM's parameters detached."""
        if self.options.optimize == "expert":
            return self.reward(self.bundle.decode_latents(f_student).clamp(-1, 1), prompts)
        states, mask = text_inputs(cond)
        return frozen_call(self._lrm_module(), f_student, states, mask)

    def lrm_term(self, batch: dict, f_student: Tensor, f_target: Tensor, cond: Conditioning,
                 prompts: list[str]) -> tuple[Tensor, dict]:
        """Per-sample LRM loss on the triplets of the first m samples, scaled so its batch mean is the mean KL."""
        opts, n = self.options.lrm, f_student.shape[0]
        m = min(opts.batch_size, n)
        with torch.no_grad():
            x_real = self.clean_latents(batch, None, m).to(f_student.device)
            members = (f_student[:m], f_target[:m], x_real)
            expert = torch.stack([self.reward(self.bundle.decode_latents(z).clamp(-1, 1), prompts[:m])
                                  for z in members], dim=1)
        states, mask = text_inputs(cond[:m])
        repeat = lambda a: None if a is None else torch.cat([a] * 3)  # noqa: E731
        scores = self.modules["lrm"](torch.cat(members), repeat(states), repeat(mask)).view(3, m).T
        kl = lrm_loss(expert, scores, opts.comparison, opts.expert_logit_scale)
        per_sample = torch.cat([kl * (n / m), kl.new_zeros(n - m)]) * opts.loss_scale
        logs = {"loss_lrm": kl.detach().mean(), "lrm_agreement": pairwise_agreement(expert, scores.detach()).mean()}
        logs.update({f"expert_{k}": v for k, v in zip(("student", "target", "real"), expert.mean(dim=0))})
        return per_sample, logs

    def prompt_estimates(self, generator: torch.Generator) -> tuple[Tensor, Conditioning, list[str]]:
        """The student's one-step estimates from pure noise at the top of the solver grid for k drawn prompts,
        each twice (rows i and i + k share a prompt), with guidance w ~ U[w_min, w_max] as LCD's step."""
        b, opts, device = self.bundle, self.options, generator.device
        k = opts.prompts.batch_size
        picks = torch.randint(len(self.reward_prompts), (k,), generator=generator, device=device).tolist()
        prompts = [self.reward_prompts[i] for i in picks] * 2
        with torch.no_grad(), phase("encode"):
            cond = b.encode_prompt(prompts, image_size=self.image_size)
        t = self.grid[-1].to(device).float().expand(2 * k)
        w = opts.w_min + (opts.w_max - opts.w_min) * torch.rand(2 * k, generator=generator, device=device)
        z = torch.randn(b.latent_shape(2 * k, self.image_size), generator=generator, device=device)
        student_cond = self.with_guidance(cond, w)
        return self.consistency(self.modules["student"], z, t, student_cond), student_cond, prompts

    def prompt_term(self, beta: float, train_lrm: bool, generator: torch.Generator) -> tuple[Tensor, dict]:
        """-beta mean R of the image-free estimates (a scalar added to every sample's loss, so the batch mean
        gains it once), plus, with an online LRM, its KL to the expert on each prompt's pair of estimates."""
        f, cond, prompts = self.prompt_estimates(generator)
        reward = self.student_reward(f, cond, prompts)
        loss = reward_term(reward, beta).mean()
        logs = {"reward_prompts": reward.detach().mean()}
        if train_lrm:
            k = len(prompts) // 2
            with torch.no_grad():
                expert = self.reward(self.bundle.decode_latents(f.detach()).clamp(-1, 1), prompts)
            states, mask = text_inputs(cond)
            scores = self.modules["lrm"](f.detach(), states, mask)
            pair = lambda r: torch.stack([r[:k], r[k:]], dim=1)  # noqa: E731
            kl = preference_kl(pair(expert), pair(scores), self.options.lrm.expert_logit_scale)
            loss = loss + kl.mean() * self.options.lrm.loss_scale
            logs.update({"loss_lrm_prompts": kl.detach().mean(), "expert_prompts": expert.mean(),
                         "lrm_agreement_prompts": pairwise_agreement(pair(expert), pair(scores.detach())).mean()})
        return loss, logs
