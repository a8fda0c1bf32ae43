"""Text conditioning as one batch-first bundle of tensors.

Every backbone family conditions its denoiser differently (SD: one hidden-state
tensor; SDXL: two encoders' states plus pooled embeddings and time ids; SD3:
states plus pooled projections; Sana/PixArt: states plus an attention mask).
`Conditioning` hides that behind a dict of tensors whose first dimension is
the batch, so trainers can index, concatenate (fused CFG batches) and swap in
the empty prompt (caption dropout) without knowing the family.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def _map(tree, fn):
    if isinstance(tree, dict):
        return {k: _map(v, fn) for k, v in tree.items()}
    return fn(tree)


def _zip_map(a, b, fn):
    if isinstance(a, dict):
        return {k: _zip_map(a[k], b[k], fn) for k in a}
    return fn(a, b)


def _first_leaf(tree):
    while isinstance(tree, dict):
        tree = next(iter(tree.values()))
    return tree


@dataclass
class Conditioning:
    """Keyword arguments for a denoiser call; every leaf tensor is batch-first.

    `kwargs` maps the denoiser's keyword names to tensors or to nested dicts of
    tensors (SDXL's `added_cond_kwargs`).
    """

    kwargs: dict

    @property
    def batch_size(self) -> int:
        return _first_leaf(self.kwargs).shape[0]

    def __getitem__(self, index) -> "Conditioning":
        return Conditioning(_map(self.kwargs, lambda t: t[index]))

    def to(self, *args, **kwargs) -> "Conditioning":
        def move(t: torch.Tensor) -> torch.Tensor:
            # Masks and ids keep their integer dtype; only floats follow a dtype.
            if t.is_floating_point():
                return t.to(*args, **kwargs)
            device = kwargs.get("device", next((a for a in args if isinstance(a, (str, torch.device))), None))
            return t.to(device) if device is not None else t

        return Conditioning(_map(self.kwargs, move))

    def detach(self) -> "Conditioning":
        return Conditioning(_map(self.kwargs, lambda t: t.detach()))

    def repeat(self, n: int) -> "Conditioning":
        """Each row repeated n times in place: [a, b] -> [a, a, b, b] for n=2."""
        return Conditioning(_map(self.kwargs, lambda t: t.repeat_interleave(n, dim=0)))

    def where(self, keep: torch.Tensor, other: "Conditioning") -> "Conditioning":
        """Row i from self where keep[i], else from other (caption dropout)."""

        def pick(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            mask = keep.to(a.device).view(-1, *([1] * (a.dim() - 1)))
            return torch.where(mask, a, b.expand_as(a).to(a.dtype))

        return Conditioning(_zip_map(self.kwargs, other.kwargs, pick))

    @staticmethod
    def cat(items: list["Conditioning"]) -> "Conditioning":
        first = items[0].kwargs

        def gather(path_fn):
            return torch.cat([path_fn(c.kwargs) for c in items], dim=0)

        def build(tree, path):
            if isinstance(tree, dict):
                return {k: build(v, path + (k,)) for k, v in tree.items()}

            def get(kw, p=path):
                for k in p:
                    kw = kw[k]
                return kw

            return gather(get)

        return Conditioning(build(first, ()))

    def state(self) -> dict[str, torch.Tensor]:
        """Flat name -> tensor map (for caching to safetensors)."""
        flat: dict[str, torch.Tensor] = {}

        def walk(tree, prefix):
            for k, v in tree.items():
                if isinstance(v, dict):
                    walk(v, f"{prefix}{k}.")
                else:
                    flat[f"{prefix}{k}"] = v

        walk(self.kwargs, "")
        return flat

    @staticmethod
    def from_state(flat: dict[str, torch.Tensor]) -> "Conditioning":
        tree: dict = {}
        for name, value in flat.items():
            node = tree
            *parents, leaf = name.split(".")
            for p in parents:
                node = node.setdefault(p, {})
            node[leaf] = value
        return Conditioning(tree)
