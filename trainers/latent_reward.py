"""The latent proxy reward model (LRM) of RG-LCD and the loss that distils an expert reward into it.

Paper: Reward Guided Latent Consistency Distillation, Li et al., arXiv 2403.11027 (Sec. 4, "latent proxy
reward model"). The LRM scores a *latent* and a prompt, R_phi(z, c) = exp(s) cos(E_img(z), E_txt(c)),
so the student can climb a reward without decoding through the VAE and without the expert's
high-frequency adversarial directions. It learns the expert's preferences online: for each prompt the
expert scores (decoded) K candidate latents, e.g. RG-LCD's triplet {student estimate, LCD target, real
latent}, and the LRM's scores are fitted by

    p = softmax(a * r_expert),   q = softmax(r_lrm)                         (over the K candidates)
    KL(p || q) = sum_k p_k (log p_k - log q_k),    dKL / d r_lrm = q - p      (softmax cross-entropy)

with `a` the expert's logit scale (1 for the suite's 100*cos rewards, which are already CLIP logits).
`comparison: pairs` sums the K = 2 KL over the three pairs of a triplet, as the reference code does;
`comparison: triplet` uses one K = 3 softmax.

Architecture (a deliberate deviation, documented in docs/methods/rg_lcd.md): the paper's LRM is an
OpenCLIP model with a 12-layer ViT on 4x64x64 latents and a ViT-H text tower (~350M parameters, its
checkpoint unreleased). Ours is small and configurable: a pre-norm ViT over latent patches with 2-D
sin-cos positions (so any latent size works, which the paper's fixed 64x64 input did not), and a text
tower that reads the teacher's *frozen* token embeddings (`encoder_hidden_states`) through a projection
and a few transformer layers, so no second text encoder or tokenizer is loaded. Latents are the scaled
diffusion latents the student predicts (std ~1), not the VAE's raw latents. `arch.fusion: cross` (not in
the paper) scores with cross-attention from the text tokens to the latent patches instead of the cosine.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.func import functional_call

from pipelines.conditioning import Conditioning
from trainers.strict import field

MAX_LOGIT_SCALE = 100.0  # CLIP's clamp on exp(s)
FUSIONS = ("cosine", "cross")


@dataclass
class LatentRewardConfig:
    patch_size: int = field(4, "side of the square latent patches the image tower embeds (paper: 4)")
    width: int = field(256, "transformer width of both towers")
    depth: int = field(4, "image-tower transformer layers")
    heads: int = field(4, "attention heads (both towers)")
    text_depth: int = field(2, "text-tower transformer layers over the teacher's frozen token embeddings")
    embed_dim: int = field(256, "joint embedding dimension")
    logit_scale: float = field(100.0, "initial exp(s); scores are exp(s) * cos, like the 100*cos experts")
    fusion: str = field("cosine", "how the towers meet: cosine (the paper's CLIP-style exp(s) cos of two pooled "
                                  "embeddings) or cross (text tokens attend to the latent patches, then a scalar head)")
    fusion_depth: int = field(2, "cross-attention layers (fusion: cross)")

    def __post_init__(self):
        if self.fusion not in FUSIONS:
            raise ValueError(f"lrm.arch.fusion must be one of {FUSIONS}, got {self.fusion!r}")
        if self.fusion_depth < 1:
            raise ValueError(f"lrm.arch.fusion_depth must be >= 1, got {self.fusion_depth}")
        if min(self.patch_size, self.width, self.depth, self.heads, self.embed_dim) < 1 or self.text_depth < 0:
            raise ValueError("lrm.arch: sizes must be >= 1 (text_depth >= 0)")
        if self.width % self.heads:
            raise ValueError(f"lrm.arch: width={self.width} must be divisible by heads={self.heads}")
        if not 0 < self.logit_scale <= MAX_LOGIT_SCALE:
            raise ValueError(f"lrm.arch: logit_scale must be in (0, {MAX_LOGIT_SCALE:g}], got {self.logit_scale}")


# ------------------------------------------------------------------ the loss (pure, unreduced)


def preference_targets(expert_scores: Tensor, logit_scale: float = 1.0) -> Tensor:
    """p = softmax(a * r_expert) over the last dim (the K candidates of one prompt)."""
    return torch.softmax(expert_scores.float() * logit_scale, dim=-1)


def preference_kl(expert_scores: Tensor, lrm_scores: Tensor, logit_scale: float = 1.0) -> Tensor:
    """Per-row KL(softmax(a r_expert) || softmax(r_lrm)) over the last dim; [..., K] -> [...]."""
    p = preference_targets(expert_scores, logit_scale)
    log_q = torch.log_softmax(lrm_scores.float(), dim=-1)
    return (torch.xlogy(p, p) - p * log_q).sum(dim=-1)


PAIRS = ((0, 1), (0, 2), (1, 2))


def lrm_loss(expert_scores: Tensor, lrm_scores: Tensor, comparison: str, logit_scale: float = 1.0) -> Tensor:
    """Per-sample LRM loss on [B, 3] triplets: one 3-way KL, or the sum of the three 2-way KLs."""
    if comparison == "triplet":
        return preference_kl(expert_scores, lrm_scores, logit_scale)
    if comparison != "pairs":
        raise ValueError(f"comparison must be 'pairs' or 'triplet', got {comparison!r}")
    return sum(preference_kl(expert_scores[:, [i, j]], lrm_scores[:, [i, j]], logit_scale) for i, j in PAIRS)


def pair_agreement(expert_scores: Tensor, lrm_scores: Tensor) -> Tensor:
    """[..., K] -> [..., K(K-1)/2]: 1 where the LRM orders candidates (i, j), i < j in triu order, as the expert
    does (a tie on one side only counts as disagreement)."""
    k = expert_scores.shape[-1]
    i, j = torch.triu_indices(k, k, offset=1, device=expert_scores.device)
    expert = torch.sign(expert_scores[..., i] - expert_scores[..., j])
    lrm = torch.sign(lrm_scores[..., i] - lrm_scores[..., j])
    return (expert == lrm).float()


def pairwise_agreement(expert_scores: Tensor, lrm_scores: Tensor) -> Tensor:
    """Per-sample fraction of candidate pairs the LRM orders as the expert does."""
    return pair_agreement(expert_scores, lrm_scores).mean(dim=-1)


# ------------------------------------------------------------------ the model


def sincos_2d(height: int, width: int, dim: int, device=None) -> Tensor:
    """Fixed 2-D sin-cos position embeddings [height * width, dim] (half the channels per axis)."""
    quarter = dim // 4
    freqs = torch.exp(-math.log(10000.0) * torch.arange(quarter, device=device, dtype=torch.float32) / quarter)
    ys, xs = torch.meshgrid(torch.arange(height, device=device, dtype=torch.float32),
                            torch.arange(width, device=device, dtype=torch.float32), indexing="ij")
    parts = [f(a.flatten()[:, None] * freqs[None]) for a in (ys, xs) for f in (torch.sin, torch.cos)]
    return nn.functional.pad(torch.cat(parts, dim=1), (0, dim - 4 * quarter))


def _encoder(width: int, heads: int, depth: int) -> nn.Module:
    if depth == 0:
        return nn.Identity()
    layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, activation="gelu", batch_first=True,
                                       norm_first=True)
    return nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)


class LatentRewardModel(nn.Module):
    """A score of scaled latents z under the teacher's text embeddings c.

    fusion "cosine": R_phi(z, c) = exp(s) cos(E_img(z), E_txt(c)), the paper's CLIP-style form, where the
    image is summarised in one vector before it meets the text. fusion "cross": the text tokens attend to the
    latent patches (pre-norm cross-attention layers, as in ImageReward's BLIP fusion) and a linear head reads
    their masked mean, so which word goes with which patch can enter the score.
    """

    def __init__(self, arch: LatentRewardConfig, latent_channels: int, text_dim: int):
        super().__init__()
        self.arch, self.latent_channels, self.text_dim = arch, latent_channels, text_dim
        w = arch.width
        self.patch = nn.Conv2d(latent_channels, w, arch.patch_size, stride=arch.patch_size)
        self.cls = nn.Parameter(torch.randn(1, 1, w) * w**-0.5)
        self.image_blocks = _encoder(w, arch.heads, arch.depth)
        cosine = arch.fusion == "cosine"  # (modules in the order that fixes a seeded cosine LRM's initial weights)
        if cosine:
            self.image_head = nn.Sequential(nn.LayerNorm(w), nn.Linear(w, arch.embed_dim, bias=False))
        self.text_in = nn.Linear(text_dim, w)
        self.text_blocks = _encoder(w, arch.heads, arch.text_depth)
        if cosine:
            self.text_head = nn.Sequential(nn.LayerNorm(w), nn.Linear(w, arch.embed_dim, bias=False))
            self.log_logit_scale = nn.Parameter(torch.tensor(math.log(arch.logit_scale)))
        else:
            layer = nn.TransformerDecoderLayer(w, arch.heads, 4 * w, dropout=0.0, activation="gelu",
                                               batch_first=True, norm_first=True)
            self.fusion_blocks = nn.TransformerDecoder(layer, arch.fusion_depth)
            self.score_head = nn.Sequential(nn.LayerNorm(w), nn.Linear(w, 1))

    def latent_tokens(self, z: Tensor) -> Tensor:
        """[B, 1 + patches, width]: the class token and the patch tokens after the image layers."""
        tokens = self.patch(z.to(self.patch.weight.dtype))
        _, width, h, w = tokens.shape
        tokens = tokens.flatten(2).transpose(1, 2) + sincos_2d(h, w, width, tokens.device).to(tokens.dtype)
        return self.image_blocks(torch.cat([self.cls.expand(len(z), -1, -1).to(tokens.dtype), tokens], dim=1))

    def text_tokens(self, states: Tensor, mask: Tensor | None = None) -> Tensor:
        x = self.text_in(states.to(self.text_in.weight.dtype))
        padding = None if mask is None else ~mask.bool()
        return x if isinstance(self.text_blocks, nn.Identity) else self.text_blocks(x, src_key_padding_mask=padding)

    def embed_latents(self, z: Tensor) -> Tensor:
        return nn.functional.normalize(self.image_head(self.latent_tokens(z)[:, 0]).float(), dim=-1)

    def embed_text(self, states: Tensor, mask: Tensor | None = None) -> Tensor:
        """Mean over the (unmasked) tokens after the text layers; `mask` is 1 for real tokens."""
        x = self.text_tokens(states, mask)
        return nn.functional.normalize(self.text_head(_masked_mean(x, mask).to(x.dtype)).float(), dim=-1)

    def forward(self, z: Tensor, text_states: Tensor, text_mask: Tensor | None = None) -> Tensor:
        if self.arch.fusion == "cross":
            padding = None if text_mask is None else ~text_mask.bool()
            x = self.fusion_blocks(self.text_tokens(text_states, text_mask), self.latent_tokens(z),
                                   tgt_key_padding_mask=padding)
            return self.score_head(_masked_mean(x, text_mask).to(x.dtype)).squeeze(-1).float()
        scale = self.log_logit_scale.clamp(max=math.log(MAX_LOGIT_SCALE)).exp().float()
        return scale * (self.embed_latents(z) * self.embed_text(text_states, text_mask)).sum(-1)


def _masked_mean(x: Tensor, mask: Tensor | None) -> Tensor:
    """[B, L, D] -> [B, D] float32: mean over the tokens where mask is 1 (all tokens without a mask)."""
    keep = torch.ones(x.shape[:2], device=x.device) if mask is None else mask.to(x.device).float()
    return (x.float() * keep[..., None]).sum(1) / keep.sum(1, keepdim=True).clamp(min=1)


def text_inputs(cond: Conditioning) -> tuple[Tensor, Tensor | None]:
    """The teacher's frozen token embeddings (and padding mask, where the family has one) for the LRM."""
    return cond.kwargs["encoder_hidden_states"], cond.kwargs.get("encoder_attention_mask")


def frozen_call(module: nn.Module, *args: Tensor) -> Tensor:
    """module(*args) with its parameters detached: gradients reach the inputs only (the student's reward
    term must not train the LRM, and must not go through the LRM's DDP wrapper)."""
    params = {name: p.detach() for name, p in module.named_parameters()}
    return functional_call(module, params, args)


# ------------------------------------------------------------------ checkpoints (safetensors)


def _header(arch: LatentRewardConfig, latent_channels: int, text_dim: int) -> dict[str, str]:
    return {"arch": json.dumps(asdict(arch), sort_keys=True), "latent_channels": str(latent_channels),
            "text_dim": str(text_dim)}


def save_latent_reward(model: LatentRewardModel, path: str | Path) -> Path:
    """Weights plus the architecture in the safetensors header, which `load_latent_reward` checks."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata=_header(model.arch, model.latent_channels, model.text_dim))
    return path


def load_latent_reward(path: str | Path, arch: LatentRewardConfig, latent_channels: int,
                       text_dim: int) -> LatentRewardModel:
    """An LRM from a checkpoint written by `save_latent_reward` (or a run's plain state dict).

    A header that disagrees with the configured architecture or the teacher's sizes is a one-line error.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"lrm.init: no such checkpoint {path} (write one with scripts/pretrain_lrm.py)")
    with safe_open(str(path), "pt") as fh:
        header = fh.metadata() or {}
    if "arch" in header:  # keys added to the architecture since the file was written take their defaults
        header["arch"] = json.dumps({**asdict(LatentRewardConfig()), **json.loads(header["arch"])}, sort_keys=True)
    expected = _header(arch, latent_channels, text_dim)
    wrong = [k for k in expected if k in header and header[k] != expected[k]]
    if wrong:
        raise ValueError(f"lrm.init: {path} was saved with {', '.join(f'{k}={header[k]}' for k in wrong)}, but this "
                         f"run has {', '.join(f'{k}={expected[k]}' for k in wrong)}: set rg_lcd.lrm.arch to match")
    model = LatentRewardModel(arch, latent_channels, text_dim)
    try:
        model.load_state_dict(load_file(str(path)))
    except RuntimeError as err:
        detail = [line.strip() for line in str(err).splitlines() if line.strip()][-1]
        raise ValueError(f"lrm.init: {path} does not fit rg_lcd.lrm.arch ({detail})") from None
    return model
