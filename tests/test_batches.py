"""train.num_workers: worker processes read ahead without changing what a step sees or what a checkpoint saves."""
import json

import pytest
import torch
from torch.utils.data import Dataset

from trainers.batches import Batches
from trainers.index_stream import IndexStream


class Items(Dataset):
    """Item i is the tensor [i]; every third one counts a skipped record, as a corrupt-image dataset would."""

    def __len__(self) -> int:
        return 10

    def __getitem__(self, i: int) -> dict:
        return {"x": torch.tensor([float(i)]), "prompt": f"p{i}", "skipped": int(i % 3 == 0)}


def batches(workers: int, **stream) -> Batches:
    return Batches(Items(), IndexStream(10, seed=3, batch_size=3, **stream), num_workers=workers)


def take(it: Batches, n: int) -> list[list[int]]:
    return [next(it)["x"].flatten().int().tolist() for _ in range(n)]


def test_workers_read_the_stream_order():
    """Two workers with prefetch 2 hand the loop the same 7 batches (3 items, straddling epochs of 10) as the
    main process does, with prompts listed and skipped counts summed per batch."""
    main, ahead = batches(0), batches(2)
    assert take(main, 7) == take(ahead, 7)
    one = next(batches(2, rank=1, world_size=2))
    assert one["prompt"] == [f"p{int(v)}" for v in one["x"].flatten()]
    assert one["skipped"] == sum(int(v) % 3 == 0 for v in one["x"].flatten())


def test_checkpoint_saves_what_the_loop_took_not_what_workers_prefetched():
    """After 4 batches of 3 the loop has taken 12 items (epoch 1, position 2) while the workers have already read
    up to 4 more batches; the saved state is the loop's, and a resumed reader (with workers) continues exactly
    where an unbroken run goes on."""
    unbroken = take(batches(0), 9)
    first = batches(2)
    head = take(first, 4)
    state = json.loads(json.dumps(first.state_dict()))
    assert state == {"epoch": 1, "position": 2, "num_items": 10, "seed": 3}
    resumed = batches(2)
    resumed.load_state_dict(state)
    assert head + take(resumed, 5) == unbroken
    first.load_state_dict(state)  # an object that already prefetched drops its read-ahead too
    assert take(first, 5) == unbroken[4:]


def test_negative_workers_is_an_error():
    with pytest.raises(ValueError, match="num_workers must be >= 0"):
        batches(-1)
