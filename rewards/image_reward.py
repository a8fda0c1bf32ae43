"""ImageReward (Xu et al., arXiv 2304.05977): BLIP ViT-L image encoder, BERT text encoder with
cross-attention to the image tokens, and an MLP on the [CLS] feature.

The ``image-reward`` package (1.5) does not import with transformers 5 (it
imports helpers removed from ``transformers.modeling_utils``, needs
``fairscale`` and OpenAI ``clip``, and unpickles checkpoints), so we rebuild
the same network from transformers' BLIP classes, which are ports of the same
BLIP code: ``BlipVisionModel`` is BLIP's ViT (fused qkv, pre-norm, final
norm) and ``BlipTextModel`` is BLIP's ``med.py`` BERT with identical
parameter names. Only the ViT's names differ; ``ORIGINAL_TO_OURS`` maps them.

Score: MLP(text_encoder(prompt, cross-attending to ViT tokens)[:, 0]),
standardised with the published mean 0.16717 and std 1.03334 (so 0 is an
average image; good ones are 1-2). Preprocessing: bicubic resize of the short
side to 224, centre crop, OpenAI CLIP mean/std. Prompts: bert-base-uncased,
padded to 35 tokens. Architecture sizes are read from the checkpoint shapes.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import Tensor, nn

from .base import RewardModule
from .clip_rewards import AestheticMLP
from .preprocess import ImageTransform
from .weights import WeightsNotFoundError, find_file, find_folder, load_state_dict

REPO = "THUDM/ImageReward"
FILES = ("ImageReward.safetensors", "ImageReward.pt")
TOKENIZER_REPOS = ("google-bert/bert-base-uncased", "bert-base-uncased")
MEAN, STD = 0.16717362830052426, 1.0333394966054072
MAX_TOKENS = 35
HEAD_DIM = 64  # BLIP ViT-B/L and BERT-base all use 64-wide heads

# (original regex, our replacement): BLIP ViT names -> transformers BlipVisionModel names.
ORIGINAL_TO_OURS = (
    (r"^blip\.visual_encoder\.cls_token$", "vision.embeddings.class_embedding"),
    (r"^blip\.visual_encoder\.pos_embed$", "vision.embeddings.position_embedding"),
    (r"^blip\.visual_encoder\.patch_embed\.proj\.", "vision.embeddings.patch_embedding."),
    (r"^blip\.visual_encoder\.blocks\.(\d+)\.norm1\.", r"vision.encoder.layers.\1.layer_norm1."),
    (r"^blip\.visual_encoder\.blocks\.(\d+)\.norm2\.", r"vision.encoder.layers.\1.layer_norm2."),
    (r"^blip\.visual_encoder\.blocks\.(\d+)\.attn\.qkv\.", r"vision.encoder.layers.\1.self_attn.qkv."),
    (r"^blip\.visual_encoder\.blocks\.(\d+)\.attn\.proj\.", r"vision.encoder.layers.\1.self_attn.projection."),
    (r"^blip\.visual_encoder\.blocks\.(\d+)\.mlp\.", r"vision.encoder.layers.\1.mlp."),
    (r"^blip\.visual_encoder\.norm\.", "vision.post_layernorm."),
    (r"^blip\.text_encoder\.", "text."),
    (r"^mlp\.", "mlp."),
)
# Present in the checkpoint, unused for scoring (contrastive heads) or rebuilt (position ids).
IGNORED = (r"^blip\.(vision_proj|text_proj)\.", r"\.position_ids$")


def convert_state_dict(original: dict[str, Tensor]) -> dict[str, Tensor]:
    """ImageReward checkpoint keys -> ImageRewardModel keys; unknown keys raise."""
    converted = {}
    for key, value in original.items():
        if any(re.search(p, key) for p in IGNORED):
            continue
        for pattern, replacement in ORIGINAL_TO_OURS:
            new_key, hits = re.subn(pattern, replacement, key)
            if hits:
                converted[new_key] = value
                break
        else:
            raise ValueError(f"image_reward: unexpected checkpoint key {key!r}; is this an ImageReward checkpoint?")
    return converted


def configs_from_state_dict(state: dict[str, Tensor]):
    """BlipVisionConfig / BlipTextConfig whose sizes match a converted state dict."""
    from transformers import BlipTextConfig, BlipVisionConfig

    width = state["vision.embeddings.class_embedding"].shape[-1]
    patch = state["vision.embeddings.patch_embedding.weight"].shape[-1]
    grid = int(round((state["vision.embeddings.position_embedding"].shape[1] - 1) ** 0.5))
    vision = BlipVisionConfig(
        hidden_size=width,
        intermediate_size=state["vision.encoder.layers.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=1 + max(int(k.split(".")[3]) for k in state if k.startswith("vision.encoder.layers.")),
        num_attention_heads=max(1, width // HEAD_DIM),
        image_size=grid * patch,
        patch_size=patch,
        layer_norm_eps=1e-6,
        hidden_act="gelu",
    )
    hidden = state["text.embeddings.word_embeddings.weight"].shape[1]
    text = BlipTextConfig(
        vocab_size=state["text.embeddings.word_embeddings.weight"].shape[0],
        hidden_size=hidden,
        encoder_hidden_size=width,
        intermediate_size=state["text.encoder.layer.0.intermediate.dense.weight"].shape[0],
        num_hidden_layers=1 + max(int(k.split(".")[3]) for k in state if k.startswith("text.encoder.layer.")),
        num_attention_heads=max(1, hidden // HEAD_DIM),
        max_position_embeddings=state["text.embeddings.position_embeddings.weight"].shape[0],
        layer_norm_eps=1e-12,
        hidden_act="gelu",
        is_decoder=True,  # builds the cross-attention blocks; forward runs them bidirectionally
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        bos_token_id=None,  # decoder-only ids; the encoder never reads them
        eos_token_id=None,
        sep_token_id=None,
    )
    return vision, text


class ImageRewardModel(nn.Module):
    """BLIP ViT + cross-attending BERT + MLP; returns the unstandardised reward."""

    def __init__(self, vision_config, text_config):
        super().__init__()
        from transformers import BlipTextModel, BlipVisionModel

        self.vision = BlipVisionModel(vision_config)
        self.text = BlipTextModel(text_config, add_pooling_layer=False)
        self.mlp = AestheticMLP(text_config.hidden_size)

    def forward(self, pixels: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        image_tokens = self.vision(pixel_values=pixels).last_hidden_state
        image_mask = torch.ones(image_tokens.shape[:-1], dtype=torch.long, device=image_tokens.device)
        text = self.text(
            input_ids=input_ids,
            attention_mask=attention_mask,
            encoder_hidden_states=image_tokens,
            encoder_attention_mask=image_mask,
            is_decoder=False,
        )
        return self.mlp(text.last_hidden_state[:, 0]).squeeze(-1)


class ImageReward(RewardModule):
    name = "image_reward"
    scale = "ImageReward standardised: (raw - 0.16717) / 1.03334; about -2 (bad) to +2 (good), 0 = average"

    def __init__(self, model: ImageRewardModel, tokenizer):
        super().__init__()
        self.model, self.tokenizer = model, tokenizer
        self.transform = ImageTransform(size=model.vision.config.image_size, mode="shortest")
        self.freeze()

    def score(self, images: Tensor, prompts: list[str]) -> Tensor:
        pixels = self.transform(images).to(self.device, self.dtype)
        tokens = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=MAX_TOKENS, return_tensors="pt")
        raw = self.model(pixels, tokens["input_ids"].to(self.device), tokens["attention_mask"].to(self.device))
        return (raw.float() - MEAN) / STD


def _tokenizer(tokenizer_path):
    from transformers import AutoTokenizer

    if tokenizer_path is None:
        for i, repo in enumerate(TOKENIZER_REPOS):
            try:
                tokenizer_path = find_folder(repo_id=repo, what="image_reward tokenizer", marker="vocab.txt")
                break
            except WeightsNotFoundError:
                if i == len(TOKENIZER_REPOS) - 1:
                    raise
    tokenizer = AutoTokenizer.from_pretrained(Path(tokenizer_path))
    # The original adds these two tokens; prompts rarely contain them, but ids must agree if they do.
    tokenizer.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    return tokenizer


def build_image_reward(path=None, tokenizer_path=None) -> ImageReward:
    """ImageReward-v1.0 from ``ImageReward.pt`` (or a .safetensors copy) and a bert-base-uncased tokenizer."""
    file = find_file(FILES, repo_id=REPO, what="image_reward", path=path, search_dirs=("~/.cache/ImageReward",))
    state = convert_state_dict(load_state_dict(file))
    model = ImageRewardModel(*configs_from_state_dict(state))
    model.load_state_dict(state, strict=True)
    return ImageReward(model, _tokenizer(tokenizer_path))
