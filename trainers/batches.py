"""The loop's batches, in the index stream's order, loaded in the main process or by worker processes.

With `train.num_workers = 0` each batch is read when the step asks for it. With workers, a
DataLoader reads ahead (decoding, resizing and collating overlap the previous step, and on a GPU
the batch lands in pinned memory) from its own copy of the index stream, while the loop's stream
counts only the batches a step has taken. A checkpoint therefore saves the position of the next
batch the loop will use, not of the last one a worker prefetched, and a resumed run reads exactly
what an unbroken one would have.
"""
from __future__ import annotations

import copy
from typing import Mapping

import torch
from torch.utils.data import DataLoader, Dataset

from trainers.index_stream import IndexStream


def collate(items: list[dict]) -> dict:
    """Stack tensors, list everything else, and add up the skipped-record counts."""
    batch: dict = {}
    for key in items[0]:
        values = [item[key] for item in items]
        if key == "skipped":
            batch[key] = sum(int(v) for v in values)
        elif isinstance(values[0], torch.Tensor):
            batch[key] = torch.stack(values)
        else:
            batch[key] = values
    return batch


class Batches:
    """Endless iterator of collated batches; `state_dict` / `load_state_dict` make it resumable."""

    def __init__(self, dataset: Dataset, stream: IndexStream, num_workers: int = 0, pin_memory: bool = False,
                 prefetch_factor: int = 2):
        if num_workers < 0:
            raise ValueError(f"train.num_workers must be >= 0, got {num_workers}")
        self.dataset, self.stream = dataset, stream
        self.num_workers, self.pin_memory, self.prefetch_factor = num_workers, pin_memory, prefetch_factor
        self._ahead = None  # the workers' iterator, started at the loop's position on first use

    def __iter__(self) -> "Batches":
        return self

    def __next__(self) -> dict:
        if self.num_workers == 0:
            return collate([self.dataset[i] for i in next(self.stream)])
        if self._ahead is None:  # the workers read from a copy that starts at the loop's position
            self._ahead = iter(DataLoader(self.dataset, batch_sampler=copy.deepcopy(self.stream),
                                          num_workers=self.num_workers, collate_fn=collate, pin_memory=self.pin_memory,
                                          prefetch_factor=self.prefetch_factor, persistent_workers=False))
        next(self.stream)  # the loop's count of batches taken
        return next(self._ahead)

    def state_dict(self) -> dict:
        return self.stream.state_dict()

    def load_state_dict(self, state: Mapping) -> None:
        self.stream.load_state_dict(state)
        self._ahead = None  # prefetched batches belong to the old position
