"""Datasets, the resumable index stream and the latent/text caches, on tiny files built here."""
import dataclasses
import io
import json
import tarfile

import pytest
import torch
from PIL import Image

from pipelines.conditioning import Conditioning
from trainers.data import (
    BUILDERS, DataConfig, HFDiskDataset, ImageFolderDataset, PromptDataset,
    WebDatasetShards, build_dataset, expand_braces, image_to_tensor,
)
from trainers.data_cache import TensorCacheDataset, cache_latents, cache_text_embeddings
from trainers.index_stream import IndexStream

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def png_bytes(size=(12, 8), color=RED, fmt="PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format=fmt)
    return buf.getvalue()


def write_folder(root, records, caption_column="text"):
    """records: (file_name, caption, bytes or None for a missing file)."""
    root.mkdir(exist_ok=True)
    with open(root / "metadata.jsonl", "w") as f:
        for name, caption, data in records:
            f.write(json.dumps({"file_name": name, caption_column: caption}) + "\n")
            if data is not None:
                (root / name).write_bytes(data)
    return root


def test_image_to_tensor_center_crop_and_flip_by_hand():
    """A 4x2 image, left half red, right half blue, at resolution 2.

    The shorter side is already 2, so no resize; a center crop keeps columns 1..2:
    [red, blue]. Red -> (255,0,0)/127.5-1 = (1,-1,-1), blue -> (-1,-1,1). A flip swaps them.
    """
    image = Image.new("RGB", (4, 2), RED)
    image.paste(Image.new("RGB", (2, 2), BLUE), (2, 0))
    x = image_to_tensor(image, 2, center_crop=True, random_flip=False, generator=torch.Generator())
    red, blue = torch.tensor([1.0, -1.0, -1.0]), torch.tensor([-1.0, -1.0, 1.0])
    assert x.shape == (3, 2, 2) and x.dtype == torch.float32
    assert torch.equal(x[:, 0, 0], red) and torch.equal(x[:, 1, 1], blue)
    flipped = [image_to_tensor(image, 2, True, True, torch.Generator().manual_seed(s)) for s in range(16)]
    assert any(torch.equal(f, x) for f in flipped) and any(torch.equal(f, x.flip(-1)) for f in flipped)


def test_imagefolder_items_shapes_range_captions(tmp_path):
    root = write_folder(tmp_path / "d", [("a.png", "a red box", png_bytes((12, 8), RED)),
                                         ("b.jpg", "a green box", png_bytes((6, 9), GREEN, "JPEG"))])
    ds = ImageFolderDataset(str(root), resolution=4)
    assert len(ds) == 2
    item = ds[0]
    assert item["pixel_values"].shape == (3, 4, 4) and item["prompt"] == "a red box" and item["skipped"] == 0
    assert torch.allclose(item["pixel_values"][:, 0, 0], torch.tensor([1.0, -1.0, -1.0]))
    assert ds[1]["pixel_values"].min() >= -1 and ds[1]["pixel_values"].max() <= 1
    assert ds[1]["prompt"] == "a green box"


def test_imagefolder_custom_caption_column(tmp_path):
    root = write_folder(tmp_path / "d", [("a.png", "hello", png_bytes())], caption_column="caption")
    assert ImageFolderDataset(str(root), caption_column="caption", resolution=4)[0]["prompt"] == "hello"
    with pytest.raises(ValueError, match="no column 'text'.*data.caption_column"):
        ImageFolderDataset(str(root), resolution=4)


def test_corrupt_and_missing_images_are_skipped_and_counted(tmp_path):
    good = png_bytes()
    root = write_folder(tmp_path / "d", [("0.png", "zero", good), ("1.png", "truncated", good[: len(good) // 2]),
                                         ("2.png", "missing", None), ("3.png", "garbage", b"not an image"),
                                         ("4.png", "four", good)])
    ds = ImageFolderDataset(str(root), resolution=4, max_consecutive_failures=3)
    assert ds[0]["skipped"] == 0
    item = ds[1]
    assert (item["index"], item["skipped"], item["prompt"]) == (4, 3, "four")
    strict = ImageFolderDataset(str(root), resolution=4, max_consecutive_failures=2)
    with pytest.raises(RuntimeError, match="3 consecutive unreadable.*max_consecutive_failures"):
        strict[1]


@pytest.mark.parametrize("lines, match", [
    ([], "no records"),
    ([{"text": "no file"}], "no column 'file_name'"),
    ([{"file_name": "a.png", "caption": "x"}], "no column 'text'"),
])
def test_imagefolder_structure_errors(tmp_path, lines, match):
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    with pytest.raises(ValueError, match=match):
        ImageFolderDataset(str(tmp_path))


def test_imagefolder_without_metadata_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="metadata.jsonl"):
        ImageFolderDataset(str(tmp_path))


def test_random_crop_is_deterministic_per_seed_and_index(tmp_path):
    ramp = bytes(8 * x for _ in range(8) for x in range(32))  # 32 wide, 8 high, brighter to the right
    image = Image.frombytes("L", (32, 8), ramp).convert("RGB")
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    root = write_folder(tmp_path / "d", [(f"{i}.png", str(i), buf.getvalue()) for i in range(6)])
    kw = dict(resolution=8, center_crop=False)
    a, b = ImageFolderDataset(str(root), seed=1, **kw), ImageFolderDataset(str(root), seed=1, **kw)
    assert all(torch.equal(a[i]["pixel_values"], b[i]["pixel_values"]) for i in range(6))
    crops = {a[i]["pixel_values"].sum().item() for i in range(6)}
    assert len(crops) > 1  # horizontal gradient: different offsets give different sums


def test_hf_disk_dataset(tmp_path):
    datasets = pytest.importorskip("datasets")
    features = datasets.Features({"img": datasets.Image(), "caption": datasets.Value("string")})
    rows = {"img": [{"bytes": png_bytes(), "path": None}, {"bytes": b"broken", "path": None},
                    {"bytes": png_bytes(color=BLUE), "path": None}], "caption": ["red", "broken", "blue"]}
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(tmp_path / "ds"))
    ds = HFDiskDataset(str(tmp_path / "ds"), image_column="img", caption_column="caption", resolution=4)
    assert len(ds) == 3 and ds[0]["prompt"] == "red"
    assert (ds[1]["prompt"], ds[1]["skipped"]) == ("blue", 1)
    assert torch.allclose(ds[1]["pixel_values"][:, 0, 0], torch.tensor([-1.0, -1.0, 1.0]))
    with pytest.raises(ValueError, match="no column 'image'.*data.image_column"):
        HFDiskDataset(str(tmp_path / "ds"), caption_column="caption")


def test_expand_braces():
    assert expand_braces("s-{08..10}.tar") == ["s-08.tar", "s-09.tar", "s-10.tar"]
    assert expand_braces("{a,b}/{0..1}") == ["a/0", "a/1", "b/0", "b/1"]
    assert expand_braces("plain.tar") == ["plain.tar"]


def write_shard(path, members):
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_webdataset_shards_index_captions_and_skips(tmp_path):
    write_shard(tmp_path / "shard-000.tar", [
        ("s/000.jpg", png_bytes(fmt="JPEG")), ("s/000.txt", b"a red box\n"),
        ("s/001.png", png_bytes(color=BLUE)), ("s/001.json", json.dumps({"text": "a blue box"}).encode()),
        ("s/002.txt", b"caption without image")])
    write_shard(tmp_path / "shard-001.tar", [("003.webp", b"corrupt"), ("003.txt", b"bad"),
                                             ("004.png", png_bytes(color=GREEN)), ("004.txt", b"green")])
    ds = WebDatasetShards(str(tmp_path / "shard-{000..001}.tar"), resolution=4)
    assert len(ds) == 4  # 002 has no image
    assert [ds[i]["prompt"] for i in range(2)] == ["a red box", "a blue box"]
    assert (ds[2]["prompt"], ds[2]["skipped"]) == ("green", 1)
    assert len(WebDatasetShards(str(tmp_path / "shard-*.tar"), resolution=4)) == 4
    with pytest.raises(ValueError, match="no key 'caption'.*data.caption_column"):
        WebDatasetShards(str(tmp_path / "shard-000.tar"), caption_column="caption")
    with pytest.raises(FileNotFoundError, match="no tar shards match"):
        WebDatasetShards(str(tmp_path / "none-*.tar"))


def test_webdataset_shards_written_by_webdataset_package(tmp_path):
    wds = pytest.importorskip("webdataset")
    with wds.TarWriter(str(tmp_path / "w-0.tar")) as sink:
        for i, color in enumerate([RED, GREEN]):
            sink.write({"__key__": f"k{i}", "png": png_bytes(color=color), "txt": f"c{i}"})
    ds = WebDatasetShards(str(tmp_path / "w-0.tar"), resolution=4)
    assert [ds[i]["prompt"] for i in range(len(ds))] == ["c0", "c1"]


def test_prompt_datasets(tmp_path):
    (tmp_path / "p.txt").write_text("a cat\n\n  a dog  \n")
    assert PromptDataset(str(tmp_path / "p.txt")).prompts == ["a cat", "a dog"]
    (tmp_path / "p.jsonl").write_text('{"prompt": "x"}\n{"prompt": "y"}\n')
    assert PromptDataset(str(tmp_path / "p.jsonl"))[1]["prompt"] == "y"
    with pytest.raises(ValueError, match="no column 'caption'.*data.prompt_column"):
        PromptDataset(str(tmp_path / "p.jsonl"), prompt_column="caption")
    (tmp_path / "e.txt").write_text("\n\n")
    with pytest.raises(ValueError, match="no prompts"):
        PromptDataset(str(tmp_path / "e.txt"))


def take(stream, n):
    return [next(stream) for _ in range(n)]


def test_index_stream_epochs_are_permutations():
    """7 items, batch 3: steps straddle epochs; each 7 consecutive global items are one permutation."""
    flat = sum(take(IndexStream(7, seed=0, batch_size=3), 7), [])
    assert sorted(flat[:7]) == list(range(7)) and sorted(flat[7:14]) == list(range(7))
    assert flat[:7] != flat[7:14]  # a new permutation each epoch
    assert flat[:7] != sum(take(IndexStream(7, seed=1, batch_size=3), 3), [])[:7]


def test_index_stream_resume_equals_unbroken_run():
    unbroken = take(IndexStream(10, seed=3, rank=1, world_size=2, batch_size=2), 9)
    first = IndexStream(10, seed=3, rank=1, world_size=2, batch_size=2)
    head = take(first, 4)
    state = json.loads(json.dumps(first.state_dict()))  # survives a checkpoint file
    assert state == {"epoch": 1, "position": 6, "num_items": 10, "seed": 3}
    resumed = IndexStream(10, seed=3, rank=1, world_size=2, batch_size=2)
    resumed.load_state_dict(state)
    assert head + take(resumed, 5) == unbroken
    with pytest.raises(ValueError, match="num_items=10"):
        IndexStream(11, seed=3).load_state_dict(state)


def test_index_stream_ranks_are_disjoint_slices_of_one_permutation():
    ranks = [IndexStream(12, seed=5, rank=r, world_size=3, batch_size=2) for r in range(3)]
    single = IndexStream(12, seed=5, world_size=1, batch_size=6)
    for _ in range(4):
        batches = [next(s) for s in ranks]
        flat = sum(batches, [])
        assert len(set(flat)) == 6 and flat == next(single)


def test_index_stream_resume_on_another_world_size_continues_the_stream():
    one = IndexStream(9, seed=2, world_size=1, batch_size=4)
    expected = sum(take(one, 4), [])[8:]
    old = IndexStream(9, seed=2, world_size=2, batch_size=2)
    take(old, 2)
    new = [IndexStream(9, seed=2, rank=r, world_size=4, batch_size=2) for r in range(4)]
    for s in new:
        s.load_state_dict(old.state_dict())
    assert sum([next(s) for s in new], []) == expected


def test_latent_cache_round_trip(tmp_path):
    good = png_bytes()
    root = write_folder(tmp_path / "d", [("0.png", "zero", good), ("1.png", "missing", None),
                                         ("2.png", "two", png_bytes(color=BLUE)), ("3.png", "three", good)])
    ds = ImageFolderDataset(str(root), resolution=4)

    def encode(x):
        return x[:, :, ::2, ::2] * 0.5

    index = cache_latents(ds, encode, str(tmp_path / "cache"), batch_size=2, shard_size=2)
    assert index["skipped"] == 1 and index["source_indices"] == [0, 2, 3]
    assert [s["count"] for s in index["shards"]] == [2, 1]
    cached = TensorCacheDataset(str(tmp_path / "cache"))
    assert len(cached) == 3 and cached[1]["prompt"] == "two"
    for i, j in enumerate([0, 2, 3]):
        assert torch.equal(cached[i]["latents"], encode(ds[j]["pixel_values"][None])[0])
    assert isinstance(build_dataset(DataConfig(kind="latent_cache", path=str(tmp_path / "cache"))), TensorCacheDataset)


def test_a_cache_killed_while_writing_its_index_has_no_index(tmp_path, monkeypatch):
    """index.json marks a cache complete; a write that dies half-way must leave none (a truncated one would
    pass for a finished cache)."""
    import trainers.atomic_files as atomic_files
    import trainers.data_cache as data_cache

    def killed(src, dst):  # the index is on disk under its temporary name; the process dies before the rename
        raise KeyboardInterrupt

    monkeypatch.setattr(atomic_files.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        data_cache.cache_text_embeddings(["a", "b"], lambda ps: torch.zeros(len(ps), 2, 3), str(tmp_path / "text"))
    assert not (tmp_path / "text" / "index.json").exists()


def test_text_cache_round_trip_with_nested_conditioning(tmp_path):
    prompts = ["a", "bb", "ccc"]

    def encode(batch):
        n = torch.tensor([float(len(p)) for p in batch])
        return Conditioning({"encoder_hidden_states": n[:, None, None].expand(-1, 2, 3).clone(),
                             "added_cond_kwargs": {"text_embeds": n[:, None] * 10}})

    cache_text_embeddings(prompts, encode, str(tmp_path / "t"), batch_size=2, shard_size=1)
    cached = TensorCacheDataset(str(tmp_path / "t"))
    item = cached[2]
    assert item["prompt"] == "ccc"
    assert torch.equal(item["cond"]["encoder_hidden_states"], torch.full((2, 3), 3.0))
    assert torch.equal(item["cond"]["added_cond_kwargs"]["text_embeds"], torch.tensor([30.0]))
    cache_text_embeddings(prompts, lambda batch: torch.ones(len(batch), 2), str(tmp_path / "bare"))
    assert torch.equal(TensorCacheDataset(str(tmp_path / "bare"))[0]["cond"]["encoder_hidden_states"], torch.ones(2))


def test_data_config_registry_and_errors(tmp_path):
    assert all(f.metadata.get("help") for f in dataclasses.fields(DataConfig))
    with pytest.raises(ValueError, match="data.kind 'nope'.*imagefolder"):
        DataConfig(kind="nope")
    toy = build_dataset(DataConfig(kind="toy", resolution=32, toy_size=3))
    assert len(toy) == 3 and toy[0]["pixel_values"].shape == (3, 32, 32)
    with pytest.raises(ValueError, match="data.toy_split"):
        DataConfig(kind="toy", toy_split="test")
    assert {"imagefolder", "hf_disk", "webdataset", "prompts", "toy"} <= set(BUILDERS)
    root = write_folder(tmp_path / "d", [("a.png", "hi", png_bytes())])
    ds = build_dataset(DataConfig(kind="imagefolder", path=str(root), resolution=8))
    assert ds[0]["pixel_values"].shape == (3, 8, 8)
