"""Evaluation metrics: Frechet distance, stats cache, CLIP score, diversity, Vendi, extractors, latency."""
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

from evaluation import clip_score as cs
from evaluation import diversity as dv
from evaluation import features as fe
from evaluation import fid
from evaluation.speed import measure_latency

FORCE = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- Frechet distance

def test_fid_self_is_zero_and_grows_with_mean_shift():
    """Shifting every feature by delta leaves the covariance unchanged, so FD = |delta|^2 exactly:
    0 against itself, then strictly increasing in the shift length (here 0, 0.25, 1, 4, 16 * D-free)."""
    x = torch.randn(300, 6, generator=_gen(), dtype=torch.float64)
    ref = fid.stats_from_features(x)
    direction = torch.tensor([1.0, -2.0, 0.5, 0.0, 1.0, 3.0], dtype=torch.float64)
    values = []
    for c in [0.0, 0.5, 1.0, 2.0, 4.0]:
        shifted = fid.stats_from_features(x + c * direction)
        values.append(fid.fid_from_stats(ref, shifted))
        assert values[-1] == pytest.approx(c**2 * float(direction @ direction), abs=1e-8)
    assert abs(values[0]) < 1e-8
    assert all(b > a for a, b in zip(values, values[1:]))


def test_fid_singular_covariance_self_is_zero():
    """n < D gives a rank-deficient covariance; the nuclear-norm route keeps FD(x, x) ~ 0 (a sqrt of
    round-off eigenvalues would leave ~1e-6 here)."""
    x = torch.randn(5, 32, generator=_gen(1))
    s = fid.stats_from_features(x)
    d = fid.frechet_distance(s.mu, s.sigma, s.mu, s.sigma)
    assert d.dtype == torch.float64 and abs(float(d)) < 1e-10


def test_frechet_distance_diagonal_closed_form():
    """Diagonal S_1 = diag(a), S_2 = diag(b) commute: (S_1 S_2)^{1/2} = diag(sqrt(a b)), so
    FD = |mu_1 - mu_2|^2 + sum_i (a_i + b_i - 2 sqrt(a_i b_i)) = |mu_1 - mu_2|^2 + sum_i (sqrt a_i - sqrt b_i)^2.
    Hand case: mu_2 - mu_1 = (3, 4) -> 25; a = (1, 4), b = (4, 9) -> (1 - 2)^2 + (2 - 3)^2 = 2; FD = 27."""
    d = fid.frechet_distance(torch.zeros(2), torch.diag(torch.tensor([1.0, 4.0])),
                             torch.tensor([3.0, 4.0]), torch.diag(torch.tensor([4.0, 9.0])))
    assert float(d) == pytest.approx(27.0, abs=1e-12)
    g = _gen(2)
    mu1, mu2 = torch.randn(7, generator=g, dtype=torch.float64), torch.randn(7, generator=g, dtype=torch.float64)
    a, b = torch.rand(7, generator=g, dtype=torch.float64) + 0.1, torch.rand(7, generator=g, dtype=torch.float64)
    expected = ((mu1 - mu2) ** 2).sum() + ((a.sqrt() - b.sqrt()) ** 2).sum()
    assert float(fid.frechet_distance(mu1, torch.diag(a), mu2, torch.diag(b))) == pytest.approx(float(expected), abs=1e-12)


def _sqrtm_denman_beavers(a, iters=60):
    """Principal square root of a matrix with positive eigenvalues: Y_0 = A, Z_0 = I,
    Y <- (Y + Z^-1) / 2, Z <- (Z + Y^-1) / 2 converges to (A^{1/2}, A^{-1/2}). Pure numpy, no eigh."""
    y, z = a.copy(), np.eye(len(a))
    for _ in range(iters):
        y, z = (y + np.linalg.inv(z)) / 2, (z + np.linalg.inv(y)) / 2
    return y


def test_frechet_distance_non_diagonal_matches_numpy_reference():
    """General SPD covariances: reference tr((S_1 S_2)^{1/2}) from a Denman-Beavers iteration on the
    non-symmetric product (independent of our symmetric eigh route), checked to square back to S_1 S_2."""
    rng = np.random.default_rng(0)
    d = 6
    x1, x2 = rng.standard_normal((d, 2 * d)), rng.standard_normal((d, 2 * d))
    s1, s2 = x1 @ x1.T / d + 0.1 * np.eye(d), x2 @ x2.T / d + 0.05 * np.eye(d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    root = _sqrtm_denman_beavers(s1 @ s2)
    np.testing.assert_allclose(root @ root, s1 @ s2, atol=1e-10)
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(root)
    got = fid.frechet_distance(*(torch.from_numpy(a) for a in (mu1, s1, mu2, s2)))
    assert float(got) == pytest.approx(expected, rel=1e-10, abs=1e-10)
    assert float(got) == pytest.approx(float(fid.frechet_distance(*(torch.from_numpy(a) for a in (mu2, s2, mu1, s1)))), abs=1e-10)


# ---------------------------------------------------------------- stats, cache, gathering

class _Counting:
    """Toy extractor: per-channel mean and std (D = 6); counts images seen."""

    def __init__(self, name="toy"):
        self.seen = 0
        self.ext = fe.module_extractor(self._fn, name, 8, resize="none")

    def _fn(self, x):
        self.seen += x.shape[0]
        return torch.cat([x.mean((2, 3)), x.std((2, 3))], 1)


def _write_pngs(folder, n, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(exist_ok=True)
    for k in range(n):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(folder / f"{k:03d}.png")


def test_stats_npz_roundtrip(tmp_path):
    s = fid.stats_from_features(torch.randn(10, 4, generator=_gen()), {"extractor": "e", "resolution": 8, "resize": "r"})
    s.save(tmp_path / "s.npz")
    t = fid.FeatureStats.load(tmp_path / "s.npz")
    assert t.n == 10 and t.protocol == s.protocol and t.mu.dtype == torch.float64
    assert torch.equal(t.mu, s.mu) and torch.equal(t.sigma, s.sigma)


def test_reference_stats_cached_then_recomputed_on_protocol_mismatch(tmp_path, capsys):
    _write_pngs(tmp_path / "imgs", 5)
    cache = tmp_path / "ref.npz"
    toy = _Counting()
    first = fid.reference_stats(tmp_path / "imgs", toy.ext, cache, batch_size=2)
    assert toy.seen == 5 and cache.is_file() and first.n == 5
    again = fid.reference_stats(tmp_path / "imgs", toy.ext, cache, batch_size=2)
    assert toy.seen == 5 and torch.equal(again.sigma, first.sigma)  # reused, nothing recomputed
    other = _Counting(name="toy-v2")
    fid.reference_stats(tmp_path / "imgs", other.ext, cache)
    assert other.seen == 5 and "recomputing" in capsys.readouterr().out
    assert fid.FeatureStats.load(cache).protocol["extractor"] == "toy-v2"
    _write_pngs(tmp_path / "imgs", 6, seed=1)  # sample count changes -> recompute
    assert fid.reference_stats(tmp_path / "imgs", other.ext, cache).n == 6 and other.seen == 11
    with pytest.raises(ValueError, match="different protocols"):
        fid.fid_from_stats(first, fid.FeatureStats.load(cache))


def test_reference_stats_from_saved_dataset_equal_folder(tmp_path):
    """The same images as files or as a `save_to_disk` dataset's image column give identical statistics
    (one resize path for both); a dataset without an image column is refused by name."""
    import datasets
    _write_pngs(tmp_path / "imgs", 5)
    files = sorted((tmp_path / "imgs").glob("*.png"))
    datasets.Dataset.from_dict({"image": [str(f) for f in files]}).cast_column("image", datasets.Image()) \
        .save_to_disk(str(tmp_path / "ds"))
    assert fid.is_saved_dataset(tmp_path / "ds") and not fid.is_saved_dataset(tmp_path / "imgs")
    from_files = fid.reference_stats(tmp_path / "imgs", _Counting().ext, tmp_path / "a.npz", image_size=4)
    from_ds = fid.reference_stats(tmp_path / "ds", _Counting().ext, tmp_path / "b.npz", image_size=4)
    assert from_ds.n == 5 and torch.equal(from_ds.mu, from_files.mu) and torch.equal(from_ds.sigma, from_files.sigma)
    datasets.Dataset.from_dict({"text": ["a"]}).save_to_disk(str(tmp_path / "no_images"))
    with pytest.raises(ValueError, match="no 'image' column"):
        fid.reference_stats(tmp_path / "no_images", _Counting().ext, tmp_path / "c.npz")


def test_compute_stats_rebatches_and_gathers_with_accelerator():
    from accelerate import Accelerator
    g = _gen(3)
    items = [torch.rand(3, 8, 8, generator=g) * 2 - 1, torch.rand(4, 3, 8, 8, generator=g) * 2 - 1,
             {"pixel_values": torch.rand(3, 8, 8, generator=g) * 2 - 1}]
    toy = _Counting()
    all_images = torch.cat([items[0][None], items[1], items[2]["pixel_values"][None]])
    expected = fid.stats_from_features(toy.ext(all_images))
    got = fid.compute_stats(items, toy.ext, batch_size=4)
    gathered = fid.compute_stats(items, toy.ext, batch_size=4, accelerator=Accelerator(cpu=True))
    for s in (got, gathered):
        assert s.n == 6 and torch.allclose(s.sigma, expected.sigma, atol=1e-6) and s.protocol["extractor"] == "toy"


# ---------------------------------------------------------------- extractors

def test_to_uint8_matches_png_rounding():
    """(x + 1) / 2 * 255 rounded half-to-even and clamped: -1 -> 0, 0 -> 127.5 -> 128, 1 -> 255, 2 -> 255."""
    x = torch.tensor([-1.5, -1.0, 0.0, 1.0, 2.0]).view(1, 1, 1, 5)
    assert fe.to_uint8(x).flatten().tolist() == [0, 0, 128, 255, 255]


def test_inception_extractor_missing_weights_names_file_and_folder(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match=fe.INCEPTION_FILE) as err:
        fe.inception_extractor(weights=tmp_path)
    assert str(tmp_path) in str(err.value)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))  # default: the torch hub cache
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "hub" / "checkpoints")):
        fe.inception_extractor()


def test_inception_extractor_loads_local_file_without_pickle(tmp_path, monkeypatch):
    """Smoke test of the load path on randomly initialised weights saved as a plain state dict:
    built offline, read under the tensor-only unpickler, 2048-d float32 features for [-1, 1] input."""
    import torch_fidelity.feature_extractor_inceptionv3 as tfi
    monkeypatch.setattr(tfi, "load_state_dict_from_url", lambda *a, **k: {})
    monkeypatch.setattr(tfi.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None)
    torch.save(tfi.FeatureExtractorInceptionV3("x", ["2048"]).state_dict(), tmp_path / fe.INCEPTION_FILE)
    monkeypatch.undo()
    seen = []
    load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: seen.append(os.environ.get(FORCE)) or load(*a, **k))
    ext = fe.inception_extractor(weights=tmp_path)
    assert seen == ["1"] and FORCE not in os.environ  # forced tensor-only while loading, restored after
    out = ext(torch.rand(2, 3, 32, 32, generator=_gen(7)) * 2 - 1)
    assert out.shape == (2, 2048) and out.dtype == torch.float32 and torch.isfinite(out).all()
    assert (ext.name, ext.resolution, ext.resize) == ("inception-v3-compat-2048", 299, fe.INCEPTION_RESIZE)


class _NotATensor:
    pass


def test_inception_extractor_refuses_pickled_objects(tmp_path):
    """A weights file holding arbitrary Python objects is rejected by the tensor-only unpickler."""
    torch.save({"payload": _NotATensor()}, tmp_path / fe.INCEPTION_FILE)
    with pytest.raises(Exception, match="[Ww]eights only load failed"):
        fe.inception_extractor(weights=tmp_path)


def test_lpips_missing_backbone_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(FileNotFoundError, match="alexnet-owt-7be5be79.pth"):
        dv.lpips_model("alex")


def test_clip_preprocess_constant_image():
    """A constant image c in [-1, 1] stays constant through bicubic resize and crop:
    pixel = ((c + 1) / 2 - mean) / std per channel; non-square 24x40 -> short side 16 -> 16x16."""
    out = fe.clip_preprocess(torch.full((1, 3, 24, 40), 0.2), 16)
    expected = (0.6 - torch.tensor(fe.CLIP_MEAN)) / torch.tensor(fe.CLIP_STD)
    assert out.shape == (1, 3, 16, 16)
    assert torch.allclose(out, expected.view(1, 3, 1, 1).expand_as(out), atol=1e-5)


# ---------------------------------------------------------------- CLIP score

VOCAB, CTX = 40, 8


def _tokenize(prompts, **_):
    """Char-level toy tokenizer: BOS=38, letters a..z -> 1..26, EOS=39 (also the padding, as in CLIP)."""
    ids = torch.full((len(prompts), CTX), VOCAB - 1)
    mask = torch.zeros(len(prompts), CTX, dtype=torch.long)
    for b, p in enumerate(prompts):
        toks = [VOCAB - 2] + [ord(c) - 96 for c in p if c.isalpha()][:CTX - 2] + [VOCAB - 1]
        ids[b, :len(toks)] = torch.tensor(toks)
        mask[b, :len(toks)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def _tiny_clip():
    from transformers import CLIPConfig, CLIPModel
    torch.manual_seed(0)  # weight init only; the metric itself takes no RNG
    cfg = CLIPConfig(
        text_config=dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=CTX, bos_token_id=VOCAB - 2,
                         eos_token_id=VOCAB - 1, pad_token_id=VOCAB - 1),
        vision_config=dict(image_size=16, patch_size=8, hidden_size=16, intermediate_size=32,
                           num_hidden_layers=1, num_attention_heads=2),
        projection_dim=8)
    return CLIPModel(cfg).eval()


def test_score_from_embeddings_hand_values_and_clamp():
    """cos((1,0),(1,1)) = 1/sqrt2 -> 70.71; cos((3,4),(6,8)) = 1 -> 100; cos((1,0),(-1,0)) = -1 -> clamped to 0."""
    img = torch.tensor([[1.0, 0.0], [3.0, 4.0], [1.0, 0.0]])
    txt = torch.tensor([[1.0, 1.0], [6.0, 8.0], [-1.0, 0.0]])
    got = cs.score_from_embeddings(img, txt)
    assert torch.allclose(got, torch.tensor([100 / math.sqrt(2), 100.0, 0.0]), atol=1e-4)


def test_clip_score_matches_manual_transformers_computation():
    model = _tiny_clip()
    images = torch.rand(4, 3, 16, 16, generator=_gen(4)) * 2 - 1
    prompts = ["a cat", "a dog", "red car", "blue sky"]
    with torch.no_grad():
        mean, std = torch.tensor(fe.CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(fe.CLIP_STD).view(1, 3, 1, 1)
        pixels = ((images + 1) / 2 - mean) / std  # 16x16 already: no resize
        img = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
        tok = _tokenize(prompts)
        txt = model.text_projection(model.text_model(**tok).pooler_output)
        cos = (img * txt).sum(-1) / (img.norm(dim=-1) * txt.norm(dim=-1))
        expected = 100 * cos.clamp(min=0)
    got = cs.clip_score(model, _tokenize, images, prompts)
    assert got.shape == (4,) and torch.allclose(got, expected, atol=1e-4)
    mean_score, per = cs.mean_clip_score(model, _tokenize, [(images[:2], prompts[:2]), (images[2:], prompts[2:])])
    assert torch.allclose(per, expected, atol=1e-4) and mean_score == pytest.approx(float(expected.mean()), abs=1e-4)
    ext = fe.clip_extractor(model)
    assert ext.resolution == 16 and torch.allclose(ext(images), img, atol=1e-5)


def test_clip_score_open_clip_model():
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
    torch.manual_seed(0)
    model = CLIP(8, CLIPVisionCfg(layers=1, width=16, head_width=8, image_size=16, patch_size=8),
                 CLIPTextCfg(context_length=CTX, vocab_size=VOCAB, width=16, heads=2, layers=1)).eval()
    images = torch.rand(2, 3, 16, 16, generator=_gen(5)) * 2 - 1
    prompts = ["a cat", "a dog"]
    tokenizer = lambda p: _tokenize(p)["input_ids"]  # open_clip tokenizers return a LongTensor
    with torch.no_grad():
        mean, std = torch.tensor(fe.CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(fe.CLIP_STD).view(1, 3, 1, 1)
        img = model.encode_image(((images + 1) / 2 - mean) / std)
        txt = model.encode_text(tokenizer(prompts))
        expected = 100 * torch.nn.functional.cosine_similarity(img, txt).clamp(min=0)
    assert torch.allclose(cs.clip_score(model, tokenizer, images, prompts), expected, atol=1e-4)


# ---------------------------------------------------------------- diversity

def test_pairwise_cosine_distance_hand_vectors():
    """f = (1,0), (0,2), (-3,0): cos = 0, -1, 0 for pairs (1,2), (1,3), (2,3); distances 1, 2, 1; mean 4/3."""
    f = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-3.0, 0.0]])
    assert float(dv.pairwise_cosine_distance(f)) == pytest.approx(4 / 3, abs=1e-12)


def test_vendi_score_identical_orthogonal_and_two_point():
    """K/n for n identical unit vectors is the all-(1/n) matrix: eigenvalues (1, 0, ..., 0), entropy 0, VS = 1.
    For n orthonormal vectors K = I: eigenvalues all 1/n, entropy log n, VS = n.
    Two unit vectors with cosine c: K/2 = [[1, c], [c, 1]] / 2, eigenvalues (1 +- c) / 2;
    c = 0.6 -> (0.8, 0.2), VS = exp(-(0.8 ln 0.8 + 0.2 ln 0.2))."""
    assert float(dv.vendi_score(torch.tensor([[2.0, 1.0, 0.0]]).repeat(5, 1))) == pytest.approx(1.0, abs=1e-9)
    ortho = torch.linalg.qr(torch.randn(6, 6, generator=_gen(6), dtype=torch.float64))[0][:4] * 3.0
    assert float(dv.vendi_score(ortho)) == pytest.approx(4.0, abs=1e-9)
    two = torch.tensor([[1.0, 0.0], [0.6, 0.8]], dtype=torch.float64)
    assert float(dv.vendi_score(two)) == pytest.approx(math.exp(-(0.8 * math.log(0.8) + 0.2 * math.log(0.2))), abs=1e-9)


def test_grouped_by_prompt():
    """Prompt "a": 3 identical samples -> VS 1; prompt "b": 2 orthogonal -> VS 2; mean over prompts 1.5."""
    f = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    mean, per = dv.grouped(dv.vendi_score, f, ["a", "b", "a", "b", "a"])
    assert per["a"] == pytest.approx(1.0, abs=1e-9) and per["b"] == pytest.approx(2.0, abs=1e-9)
    assert mean == pytest.approx(1.5, abs=1e-9)


# ---------------------------------------------------------------- latency

def test_measure_latency_excludes_warmup():
    """The sync hook brackets each timed call; it must first fire after the warm-up calls have run,
    so the counter seen by the syncs is (2, 3, 3, 4, 4, 5) for warmup=2, repeats=3."""
    import time
    calls, seen = [0], []

    def fn():
        calls[0] += 1
        time.sleep(0.002)

    lat = measure_latency(fn, warmup=2, repeats=3, sync=lambda: seen.append(calls[0]), images_per_call=4)
    assert calls[0] == 5 and seen == [2, 3, 3, 4, 4, 5]
    assert lat.repeats == 3 and lat.median_s > 0 and lat.std_s >= 0
    assert lat.per_image_s == pytest.approx(lat.median_s / 4) and lat.images_per_s == pytest.approx(4 / lat.median_s)
