"""CLIP-family rewards: CLIP score, PickScore, HPSv2 / v2.1 and the LAION aesthetic predictor.

* CLIP score (Hessel et al., arXiv 2104.08718): 100 * cos(image, text). We do
  not clamp at 0 as torchmetrics does (that would stop gradients); the two
  agree whenever the cosine is positive, which it is for real CLIPs.
* PickScore (Kirstain et al., arXiv 2305.01569): exp(logit_scale) * cos, the
  scale the authors' inference snippet uses (about 21-23 on real images).
* HPSv2 / v2.1 (Wu et al., arXiv 2306.09341): open_clip ViT-H-14 fine-tuned
  on HPDv2; 100 * cos (the benchmark's reporting scale, about 25-30). The
  evaluation transform resizes the long side to 224 and zero-pads.
* LAION aesthetic v2 ("improved aesthetic predictor"): an MLP on the
  L2-normalised OpenAI CLIP ViT-L/14 image embedding; about 1-10.
"""
from __future__ import annotations

from torch import Tensor, nn

from .base import RewardModule
from .clip_towers import ClipTowers, dtype_of, hf_clip_towers, open_clip_towers
from .weights import find_file, load_state_dict

LAION_CLIP_H = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
OPEN_CLIP_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
HPS_REPO = "xswu/HPSv2"
HPS_FILES = {"hpsv2": "HPS_v2_compressed.pt", "hpsv2.1": "HPS_v2.1_compressed.pt"}
AESTHETIC_FILE = "sac+logos+ava1-l14-linearMSE.pth"
AESTHETIC_SOURCE = "github.com/christophschuhmann/improved-aesthetic-predictor"


def _cosine(a: Tensor, b: Tensor) -> Tensor:
    return (nn.functional.normalize(a.float(), dim=-1) * nn.functional.normalize(b.float(), dim=-1)).sum(-1)


class CosineReward(RewardModule):
    """factor * cos(image embedding, text embedding); factor is 100 or exp(logit_scale)."""

    def __init__(self, name: str, towers: ClipTowers, scale: str, use_logit_scale: bool = False):
        super().__init__()
        self.name, self.scale = name, scale
        self.towers = towers
        self.use_logit_scale = use_logit_scale
        self.freeze()

    def score(self, images: Tensor, prompts: list[str]) -> Tensor:
        pixels = self.towers.transform(images).to(self.device, dtype_of(self.towers))
        cos = _cosine(self.towers.encode_image(pixels), self.towers.encode_text(prompts))
        factor = self.towers.logit_scale().float() if self.use_logit_scale else 100.0
        return factor * cos


class AestheticMLP(nn.Module):
    """768 -> 1024 -> 128 -> 64 -> 16 -> 1 with dropout and no activations (keys ``layers.{0,2,4,6,7}``)."""

    def __init__(self, in_features: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(in_features, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


class LaionAesthetic(RewardModule):
    name = "laion_aesthetic"
    scale = "LAION aesthetic v2 MLP on normalised CLIP ViT-L/14 image embeddings; about 1 (bad) to 10 (good)"

    def __init__(self, towers: ClipTowers, mlp: AestheticMLP):
        super().__init__()
        self.towers, self.mlp = towers, mlp
        self.freeze()

    def score(self, images: Tensor, prompts: list[str]) -> Tensor:
        pixels = self.towers.transform(images).to(self.device, dtype_of(self.towers))
        embedding = nn.functional.normalize(self.towers.encode_image(pixels).float(), dim=-1)
        return self.mlp(embedding.to(dtype_of(self.mlp))).squeeze(-1)


def build_clip_score(
    backend: str = "open_clip", path=None, arch: str = "ViT-H-14", repo_id: str | None = None, processor_path=None
) -> CosineReward:
    """CLIP score with open_clip (default ViT-H-14 laion2B, as DiffusionDPO) or a transformers CLIPModel
    (default openai/clip-vit-large-patch14, torchmetrics' default)."""
    scale = "100 * cos(image, text); typically 20-35 for matching pairs"
    if backend == "open_clip":
        towers = open_clip_towers(
            what="clip_score", arch=arch, filenames=OPEN_CLIP_FILES, repo_id=repo_id or LAION_CLIP_H, path=path
        )
    elif backend == "transformers":
        repo_id = repo_id or "openai/clip-vit-large-patch14"
        towers = hf_clip_towers(
            what="clip_score", repo_id=repo_id, path=path, processor_path=processor_path, processor_repo_id=repo_id
        )
    else:
        raise ValueError(f"clip_score: backend must be 'open_clip' or 'transformers', got {backend!r}")
    return CosineReward("clip_score", towers, scale)


def build_pickscore(path=None, processor_path=None) -> CosineReward:
    """PickScore_v1 (a transformers CLIPModel) with the CLIP-H processor."""
    towers = hf_clip_towers(
        what="pickscore",
        repo_id="yuvalkirstain/PickScore_v1",
        path=path,
        processor_path=processor_path,
        processor_repo_id=LAION_CLIP_H,
    )
    scale = "exp(logit_scale) * cos(image, text) (logit scale ~100); about 18-24 on real images"
    return CosineReward("pickscore", towers, scale, use_logit_scale=True)


def _build_hps(version: str, path=None, arch: str = "ViT-H-14") -> CosineReward:
    towers = open_clip_towers(
        what=version,
        arch=arch,
        filenames=(HPS_FILES[version].replace(".pt", ".safetensors"), HPS_FILES[version]),
        repo_id=HPS_REPO,
        path=path,
        mode="longest",
        search_dirs=("~/.cache/hpsv2",),
    )
    return CosineReward(version, towers, "100 * cos(image, text) (the HPS benchmark's scale); about 20-35")


def build_hpsv2(path=None, arch: str = "ViT-H-14") -> CosineReward:
    """HPS v2.0: open_clip ViT-H-14 with the full HPS state dict (the CLIP-H base weights are not needed)."""
    return _build_hps("hpsv2", path, arch)


def build_hpsv2_1(path=None, arch: str = "ViT-H-14") -> CosineReward:
    """HPS v2.1: same model and transform as v2.0, newer weights."""
    return _build_hps("hpsv2.1", path, arch)


def build_laion_aesthetic(
    path=None, clip_backend: str = "transformers", clip_path=None, clip_arch: str = "ViT-L-14"
) -> LaionAesthetic:
    """Aesthetic MLP (``path``: the .pth/.safetensors file) on OpenAI CLIP ViT-L/14 image embeddings.

    clip_backend "transformers": a CLIPModel folder (openai/clip-vit-large-patch14);
    "open_clip": arch ``clip_arch`` with QuickGELU and a state-dict file at ``clip_path``.
    """
    mlp_file = find_file(
        AESTHETIC_FILE, repo_id=None, what="laion_aesthetic", path=path, source=AESTHETIC_SOURCE
    )
    state = load_state_dict(mlp_file)
    mlp = AestheticMLP(in_features=state["layers.0.weight"].shape[1])
    mlp.load_state_dict(state)
    if clip_backend == "transformers":
        repo = "openai/clip-vit-large-patch14"
        towers = hf_clip_towers(
            what="laion_aesthetic CLIP", repo_id=repo, path=clip_path, processor_repo_id=repo
        )
    elif clip_backend == "open_clip":
        towers = open_clip_towers(
            what="laion_aesthetic CLIP", arch=clip_arch, filenames=OPEN_CLIP_FILES,
            repo_id="timm/vit_large_patch14_clip_224.openai",
            path=clip_path, quick_gelu=True,
        )
    else:
        raise ValueError(f"laion_aesthetic: clip_backend must be 'transformers' or 'open_clip', got {clip_backend!r}")
    return LaionAesthetic(towers, mlp)
