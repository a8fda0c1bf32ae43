"""The order in which a run reads a map-style dataset: exact to resume, the same for any world size."""
from __future__ import annotations

from typing import Iterator, Mapping

import torch

from trainers.data import mix_seed


class IndexStream:
    """Per-rank index batches from one endless stream of per-epoch permutations.

    The global stream is perm(seed, 0) ++ perm(seed, 1) ++ ...; step k consumes
    items [k*G, (k+1)*G) of it with G = batch_size * world_size, and rank r
    takes [k*G + r*b, k*G + (r+1)*b). Batches may straddle an epoch boundary,
    so no item is dropped and tiny datasets work. The state is the position in
    the global stream, so resuming (even on another world size) is exact.
    """

    def __init__(self, num_items: int, seed: int, rank: int = 0, world_size: int = 1, batch_size: int = 1):
        if num_items <= 0 or batch_size <= 0 or not 0 <= rank < world_size:
            raise ValueError(f"IndexStream needs num_items>0, batch_size>0, 0<=rank<world_size; got "
                             f"num_items={num_items} batch_size={batch_size} rank={rank} world_size={world_size}")
        self.num_items, self.seed, self.rank, self.world_size, self.batch_size = (
            num_items, seed, rank, world_size, batch_size)
        self.consumed = 0  # global items handed out so far, all ranks together
        self._perms: dict[int, torch.Tensor] = {}

    def permutation(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            self._perms = {e: p for e, p in self._perms.items() if e >= epoch - 1}  # keep memory bounded
            g = torch.Generator().manual_seed(mix_seed(self.seed, epoch))
            self._perms[epoch] = torch.randperm(self.num_items, generator=g)
        return self._perms[epoch]

    def _slice(self, start: int, count: int) -> list[int]:
        out: list[int] = []
        while count > 0:
            epoch, pos = divmod(start, self.num_items)
            take = min(count, self.num_items - pos)
            out += self.permutation(epoch)[pos: pos + take].tolist()
            start, count = start + take, count - take
        return out

    def batch_at(self, consumed: int) -> list[int]:
        """This rank's indices for the step that starts at global position `consumed`."""
        return self._slice(consumed + self.rank * self.batch_size, self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        return self

    def __next__(self) -> list[int]:
        batch = self.batch_at(self.consumed)
        self.consumed += self.batch_size * self.world_size
        return batch

    def state_dict(self) -> dict:
        """State before the next batch."""
        epoch, position = divmod(self.consumed, self.num_items)
        return {"epoch": epoch, "position": position, "num_items": self.num_items, "seed": self.seed}

    def load_state_dict(self, state: Mapping) -> None:
        if state["num_items"] != self.num_items or state["seed"] != self.seed:
            raise ValueError(f"data state was saved for num_items={state['num_items']} seed={state['seed']}, "
                             f"this run has {self.num_items} and {self.seed}; resume with the same data and seed")
        self.consumed = state["epoch"] * self.num_items + state["position"]
