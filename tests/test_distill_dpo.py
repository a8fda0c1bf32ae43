"""Distillation-DPO: the published surrogate's missing gradient, the intended objective against hand values,
its direction and the loser bound, ranking and ties, group isolation, student initialisation, one real loop
step, the one-step export through plain diffusers, and 2-process DDP + exact resume through the CLI."""
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from trainers.distill_dpo import best_and_worst, candidate_noises, distill_dpo_loss, loser_cap_weight, pick
from checkpoint_state import assert_resume_is_exact, checkpoint_tensors
from distributed_launch import assert_ranks_identical, launch_training

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a red circle", "a blue square", "a green star", "a small red square"]


def col(*values):
    """A [1, len, 1, 1] latent from values."""
    return torch.tensor(values).reshape(1, -1, 1, 1)


# ------------------------------------------------------------------ the trap and the fix


def test_published_surrogate_has_no_gradient_and_ours_moves_the_student(tiny_sd, tiny_clip):
    """(a) The published generator loss mean(sg(diff) * (x_t - x_0)) with LiDiff's x_t = x_0 + sigma eps is
    mean(sg(diff) * sigma eps): x_0 cancels, so every student parameter's gradient is exactly 0. With a VP
    x_t = alpha x_0 + sigma eps its gradient on x_0 is (alpha - 1) sg(diff) / N: antiparallel to the intended
    DMD step sg(diff) / N (cosine -1). (b) On the same student output, the Distillation-DPO loss gives a
    non-zero gradient to the student."""
    method, _ = make_method(tiny_sd, tiny_clip)
    method.bind(method.trainable(), {})
    g = torch.Generator().manual_seed(0)
    cond = method.bundle.encode_prompt(PROMPTS[:2], image_size=(16, 16))
    x_T = torch.randn(method.bundle.latent_shape(2, (16, 16)), generator=g)
    x_0 = method.generate_x0(method.student, x_T, cond)
    diff, eps, sigma = torch.randn(x_0.shape, generator=g), torch.randn(x_0.shape, generator=g), 0.7
    published = (diff.detach() * ((x_0 + sigma * eps) - x_0)).flatten(1).mean(1)
    published.sum().backward(retain_graph=True)
    grads = [p.grad for p in method.student.parameters()]
    assert all(gr is None or not gr.any() for gr in grads), "published surrogate reached the student"
    assert any(p.grad is not None for p in method.student.parameters()), "the graph did reach the parameters"

    x = x_0.detach().clone().requires_grad_(True)
    alpha = 0.6
    (diff * ((alpha * x + sigma * eps) - x)).flatten(1).mean(1).sum().backward()
    cos = torch.nn.functional.cosine_similarity(x.grad.flatten(1), diff.flatten(1), dim=1)
    torch.testing.assert_close(cos, -torch.ones(2))

    method.student.zero_grad(set_to_none=True)
    teacher, fake = x_0.detach() + diff, x_0.detach()  # fake tracks the student; the teacher differs by diff
    ours, _ = distill_dpo_loss(x_0, x_0.flip(0), teacher, teacher.flip(0), fake, fake.flip(0), torch.ones(2))
    ours.sum().backward()
    assert sum(float(p.grad.abs().sum()) for p in method.student.parameters() if p.grad is not None) > 0


def test_descent_moves_winner_to_teacher_and_loser_away():
    """Hand-made linear student x = W z with z_w = e_1, z_l = e_2, so x_w = W[:, 0] and x_l = W[:, 1]: one
    descent step on W moves the winner's column towards the teacher's x_0 and the loser's column away from it.
    Fake scores track the student (fake_w = x_w, fake_l = x_l), so the steps are along teacher - x_w (winner)
    and x_l - teacher (loser). Winner step size lr lambda_w / (N mean|x_w - teacher|) per unit of (teacher - x_w)."""
    W = torch.tensor([[1.0, 0.5], [-1.0, 2.0], [2.0, -0.5]], requires_grad=True)
    teacher = col(0.0, 0.0, 1.0)
    x_w, x_l = W[:, 0].reshape(1, 3, 1, 1), W[:, 1].reshape(1, 3, 1, 1)
    loss, _ = distill_dpo_loss(x_w, x_l, teacher, teacher, x_w.detach(), x_l.detach(), torch.ones(1))
    loss.sum().backward()
    assert W.grad.abs().sum() > 0
    lr = 0.3
    new = W.detach() - lr * W.grad
    t = teacher.flatten()
    dist = lambda v: float((v - t).norm())  # noqa: E731
    assert dist(new[:, 0]) < dist(W.detach()[:, 0]) and dist(new[:, 1]) > dist(W.detach()[:, 1])
    # winner: dL/dx_w = (x_w - teacher) / mean|x_w - teacher| / N, N = 3, mean|x_w - t| = (1 + 1 + 1) / 3 = 1
    torch.testing.assert_close(W.grad[:, 0], (W.detach()[:, 0] - t) / 3.0)


def test_loss_hand_values_and_tie():
    """Winner: x_w = [1, 3], teacher 0, fake [2, 2]: w_dmd = 1 / mean|x_w - teacher| = 1/2,
    g = (fake - teacher) w_dmd = [1, 1], L_dm = 1/2 mean(g^2) = 1/2, dL/dx_w = g / N = [1/2, 1/2].
    Loser: the same numbers, m = mean|g| = 1, cap factor (kappa = 1) tanh(1) / 1, capped g = tanh(1) [1, 1],
    L_dm,l = tanh(1)^2 / 2. With lambda_w = 1, lambda_l = 1/2: L = 1/2 - tanh(1)^2 / 4,
    dL/dx_l = -lambda_l tanh(1) / 2 = -tanh(1) / 4 per element. A tie (d = 0): L = 0 and no gradient."""
    x_w, x_l = col(1.0, 3.0).requires_grad_(True), col(1.0, 3.0).requires_grad_(True)
    zero, fake = col(0.0, 0.0), col(2.0, 2.0)
    loss, logs = distill_dpo_loss(x_w, x_l, zero, zero, fake, fake, torch.ones(1), 1.0, 0.5, 1.0)
    th = math.tanh(1.0)
    assert float(loss.detach()) == pytest.approx(0.5 - th ** 2 / 4)
    assert float(logs["loser_cap_factor"]) == pytest.approx(th)
    loss.sum().backward()
    torch.testing.assert_close(x_w.grad.flatten(), torch.tensor([0.5, 0.5]))
    torch.testing.assert_close(x_l.grad.flatten(), torch.full((2,), -th / 4))
    x_w.grad = x_l.grad = None
    tie, _ = distill_dpo_loss(x_w, x_l, zero, zero, fake, fake, torch.zeros(1))
    tie.sum().backward()
    assert float(tie.detach()) == 0.0 and not x_w.grad.any() and not x_l.grad.any()


def test_reference_term_hand_values_and_ties_still_move():
    """lambda_ref = 1, fake_all at [2, 2] for both images, x_w = x_l = [1, 3], teacher 0: each image's plain DMD
    term is the winner's of the test above, L_dm = 1/2 with dL/dx = g / N = [1/2, 1/2] (no cap, no sign flip).
    A tie (d = 0) keeps only the reference: L = 1/2 + 1/2 = 1 and both images get [1/2, 1/2]. Decided, the
    winner's gradient adds up to [1, 1] and the loser's to 1/2 - tanh(1) / 4 per element."""
    zero, fake = col(0.0, 0.0), col(2.0, 2.0)
    for decided, want_w, want_l in ((0.0, 0.5, 0.5), (1.0, 1.0, 0.5 - math.tanh(1.0) / 4)):
        x_w, x_l = col(1.0, 3.0).requires_grad_(True), col(1.0, 3.0).requires_grad_(True)
        loss, logs = distill_dpo_loss(x_w, x_l, zero, zero, fake, fake, torch.full((1,), decided), 1.0, 0.5, 1.0,
                                      (fake, fake), 1.0)
        loss.sum().backward()
        torch.testing.assert_close(x_w.grad.flatten(), torch.full((2,), want_w))
        torch.testing.assert_close(x_l.grad.flatten(), torch.full((2,), want_l))
        assert float(logs["loss_dm_reference"]) == pytest.approx(0.5)
    assert float(loss.detach()) == pytest.approx(0.5 - math.tanh(1.0) ** 2 / 4 + 1.0)


def test_preference_guidance_moves_the_reference_teacher_only():
    """gamma = 1, preference (x0_fake_w - x0_fake_l) = [2, 0] at both images, x_w = x_l = [1, 3], teacher 0,
    fake_all [2, 2]: the reference term's teacher becomes 0 + 1 [2, 0] = [2, 0], so fake_all - teacher' = [0, 2]
    and DMD's normaliser is 1 / mean|x - teacher'| = 1 / mean(|1 - 2|, |3 - 0|) = 1/2: g = [0, 1], L_dm =
    1/2 mean(g^2) = 1/4 and dL/dx = g / N = [0, 1/2] per image (the first element already sits where the
    guided teacher puts it). A tie keeps only that. Decided, the paper's terms still use the unguided
    teacher: the winner adds [1/2, 1/2] (test above) and the loser -tanh(1) / 4 per element. gamma = 0 is the
    plain reference term, whatever the preference."""
    zero, fake, pref = col(0.0, 0.0), col(2.0, 2.0), col(2.0, 0.0)
    t1 = math.tanh(1.0) / 4
    for decided, want_w, want_l in ((0.0, [0.0, 0.5], [0.0, 0.5]), (1.0, [0.5, 1.0], [-t1, 0.5 - t1])):
        x_w, x_l = col(1.0, 3.0).requires_grad_(True), col(1.0, 3.0).requires_grad_(True)
        loss, logs = distill_dpo_loss(x_w, x_l, zero, zero, fake, fake, torch.full((1,), decided), 1.0, 0.5, 1.0,
                                      (fake, fake), 1.0, (pref, pref), 1.0)
        loss.sum().backward()
        torch.testing.assert_close(x_w.grad.flatten(), torch.tensor(want_w))
        torch.testing.assert_close(x_l.grad.flatten(), torch.tensor(want_l))
        assert float(logs["loss_dm_reference"]) == pytest.approx(0.25) and float(logs["preference_size"]) == 1.0
    plain, _ = distill_dpo_loss(col(1.0, 3.0), col(1.0, 3.0), zero, zero, fake, fake, torch.zeros(1), 1.0, 0.5,
                                1.0, (fake, fake), 1.0, (pref, pref), 0.0)
    assert float(plain) == pytest.approx(1.0)  # two plain reference terms of 1/2 (test above)


def test_loser_term_is_bounded_and_plain_dmd_when_small():
    """Bound: the capped step has mean|g_cap| = kappa tanh(m / kappa) < kappa, so the loser's gradient on its
    sample has L1 norm sum|dL/dx_l| = lambda_l mean|g_cap| < lambda_l kappa, even when the fake score
    disagrees by 1e6 or the loser sits almost on the teacher's prediction (DMD's normaliser -> 1e9).
    (tanh saturates to 1.0 in floating point, hence <= with a rounding margin.) Small m: kappa tanh(m / kappa) / m
    = 1 - m^2 / (3 kappa^2) + ..., so at m = 1e-2 the update is DMD's to 3e-5."""
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(2, 4, 3, 3, generator=g)
    x_w = teacher + 0.5
    for offset, scale in ((0.5, 1e6), (1e-9, 1.0)):
        x_l = (teacher + offset).requires_grad_(True)
        fake_l = teacher + scale * torch.randn(2, 4, 3, 3, generator=g)
        loss, _ = distill_dpo_loss(x_w, x_l, teacher, teacher, x_w, fake_l, torch.ones(2), 1.0, 0.5, 2.0)
        loss.sum().backward()
        l1 = x_l.grad.flatten(1).abs().sum(1)
        assert (l1 <= 0.5 * 2.0 * (1 + 1e-6)).all() and (l1 > 0.5 * 2.0 * 0.999).all()  # saturated at the bound
    small = torch.full((1, 4, 1, 1), 1e-2)
    assert float(loser_cap_weight(small, 1.0)) == pytest.approx(1.0 - 1e-4 / 3, rel=1e-6)


def test_ranking_ties_ordering_and_noises():
    """Pairs (k = 2), scores (a, b) = (1, 0), (0, 1), (0.5, 0.5), (0.3, 0.35), margin 0.1: best = 0, 1, 0, 1 and
    worst = 1, 0, 1, 0 (an exact tie: best the first, worst the last candidate); the last two are ties.
    k = 3, scores per prompt (0.2, 0.9, 0.1) and (0.4, 0.4, 0.4): best 1 / worst 2, and the tie 0 / 2.
    pick takes candidate index[i] of prompt i from rows j B + i. Scaled pairs are (eps, 1.1 eps);
    independent draws for k = 3 give three different noises, the first two those of k = 2."""
    best, worst, decided = best_and_worst(torch.tensor([[1.0, 0.0, 0.5, 0.3], [0.0, 1.0, 0.5, 0.35]]), 0.1)
    assert best.tolist() == [0, 1, 0, 1] and worst.tolist() == [1, 0, 1, 0]
    assert decided.tolist() == [1.0, 1.0, 0.0, 0.0]
    best, worst, decided = best_and_worst(torch.tensor([[0.2, 0.4], [0.9, 0.4], [0.1, 0.4]]))
    assert best.tolist() == [1, 0] and worst.tolist() == [2, 2] and decided.tolist() == [1.0, 0.0]
    x = torch.tensor([[10.0], [11.0], [20.0], [21.0], [30.0], [31.0]])  # k = 3 candidates x B = 2 prompts
    assert pick(x, torch.tensor([1, 2])).flatten().tolist() == [20.0, 31.0]
    pair = candidate_noises((2, 3), 2, "scaled", 1.1, torch.Generator().manual_seed(0))
    torch.testing.assert_close(pair[2:], 1.1 * pair[:2])
    pair = candidate_noises((2, 3), 2, "independent", 1.1, torch.Generator().manual_seed(0))
    assert not torch.allclose(pair[2:], 1.1 * pair[:2]) and pair.shape == (4, 3)
    three = candidate_noises((2, 3), 3, "independent", 1.1, torch.Generator().manual_seed(0))
    assert three.shape == (6, 3) and torch.equal(three[:4], pair) and not torch.allclose(three[4:], pair[2:])


# ------------------------------------------------------------------ the method on a tiny SD


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    from pipelines.tiny import save_tiny_pipeline

    return save_tiny_pipeline("sd", tmp_path_factory.mktemp("tiny_sd") / "pipe")


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A tiny random transformers CLIP (toy_clip format) whose continuous scores rarely tie."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=16),
        projection_dim=8)
    folder = tmp_path_factory.mktemp("tiny_clip")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        CLIPModel(config).save_pretrained(folder)
    CLIPTokenizer(vocab=vocab, merges=[]).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def make_method(source, clip, tmp_path=None, **options):
    from pipelines.backbones import load_bundle
    from trainers.config import resolve
    from trainers.distill_dpo import DistillDPO

    options = {"reward": "toy_clip", "reward_options": {"path": str(clip)}, **options}
    tree = {"method": "distill_dpo", "model": {"source": str(source)}, "output_dir": str(tmp_path or "unused"),
            "data": {"kind": "prompts", "path": "unused", "resolution": 16}, "distill_dpo": options,
            "train": {"batch_size": 2, "log_with": "none", "max_grad_norm": 0.0},
            "optim": {"lr": 1e-3, "weight_decay": 0.0}, "export": {"enabled": False}}
    cfg = resolve(tree, "<test>")
    return DistillDPO(cfg, load_bundle(str(source))), cfg


def _grads(module):
    return {n for n, p in module.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}


def test_each_update_reaches_only_its_groups_and_ties_give_none(tiny_sd, tiny_clip):
    """k = 3: student, critic, critic, student. Student step: gradients on the student only; critic step:
    both fake scores only; teacher, VAE and reward never. A constant reward makes every pair a tie: the loss
    is 0 and no network gets a gradient."""
    method, _ = make_method(tiny_sd, tiny_clip, student_update_every=3)
    method.bind(method.trainable(), {})
    critic = ["fake_winner", "fake_loser"]
    assert [method.groups_for_step(s) for s in range(4)] == [["student"], critic, critic, ["student"]]
    nets = {"student": method.student, "fake_winner": method.fake_winner, "fake_loser": method.fake_loser,
            "teacher": method.teacher, "vae": method.bundle.vae, "reward": method.reward}
    g = torch.Generator().manual_seed(0)
    out = method.loss({"prompt": PROMPTS[:2]}, 0, ["student"], g)
    out.loss.mean().backward()
    assert {k for k, m in nets.items() if _grads(m)} == {"student"}
    assert float(out.logs["tie_fraction"]) < 1 and float(out.logs["reward_winner"]) > float(out.logs["reward_loser"])
    for m in nets.values():
        m.zero_grad(set_to_none=True)
    out = method.loss({"prompt": PROMPTS[:2]}, 1, critic, g)
    out.loss.mean().backward()
    assert {k for k, m in nets.items() if _grads(m)} == {"fake_winner", "fake_loser"}

    class Constant(torch.nn.Module):
        name, differentiable, scale = "constant", False, "always 1"

        def forward(self, images, prompts):
            return torch.ones(images.shape[0])

    for m in nets.values():
        m.zero_grad(set_to_none=True)
    method.reward = Constant()
    out = method.loss({"prompt": PROMPTS[:2]}, 0, ["student", *critic], g)
    out.loss.mean().backward()
    assert float(out.logs["tie_fraction"]) == 1.0 and not out.loss.any()
    assert not {k for k, m in nets.items() if _grads(m)}


def test_reference_weight_adds_a_third_fake_score_that_moves_the_student_on_ties(tiny_sd, tiny_clip):
    """reference_weight > 0: a third fake score joins the critic group and is trained on every candidate; with a
    constant reward (every pair a tie) the preference terms vanish, yet the student step still reaches the
    student through the plain DMD term. reference_weight 0 builds no third network."""
    method, _ = make_method(tiny_sd, tiny_clip, student_update_every=2, reference_weight=1.0)
    plain, _ = make_method(tiny_sd, tiny_clip)
    assert "fake_all" not in plain.trainable() and plain.fake_all is None
    method.bind(method.trainable(), {})
    assert method.groups_for_step(1) == ["fake_winner", "fake_loser", "fake_all"]

    class Constant(torch.nn.Module):
        name, differentiable, scale = "constant", False, "always 1"

        def forward(self, images, prompts):
            return torch.ones(images.shape[0])

    method.reward = Constant()
    nets = {"student": method.student, "fake_winner": method.fake_winner, "fake_loser": method.fake_loser,
            "fake_all": method.fake_all, "teacher": method.teacher}
    g = torch.Generator().manual_seed(0)
    out = method.loss({"prompt": PROMPTS[:2]}, 0, ["student"], g)
    out.loss.mean().backward()
    assert float(out.logs["tie_fraction"]) == 1.0 and float(out.logs["loss_dm_reference"]) > 0
    assert {k for k, m in nets.items() if _grads(m)} == {"student"}
    for m in nets.values():
        m.zero_grad(set_to_none=True)
    out = method.loss({"prompt": PROMPTS[:2]}, 1, method.groups_for_step(1), g)
    out.loss.mean().backward()
    assert {k for k, m in nets.items() if _grads(m)} == {"fake_all"}  # ties mask the winner and loser critics


def test_preference_guidance_is_zero_until_the_fake_scores_differ(tiny_sd, tiny_clip):
    """Both fake scores start as copies of the teacher, so x0_fake_w - x0_fake_l = 0 and the guided student
    step equals the unguided one exactly (same seed, same samples). After the winner's fake score moves,
    the guidance is non-zero, changes the student's loss, and its gradient still reaches the student only.
    preference_guidance without the reference term is a config error."""
    guided, _ = make_method(tiny_sd, tiny_clip, reference_weight=1.0, preference_guidance=2.0)
    plain, _ = make_method(tiny_sd, tiny_clip, reference_weight=1.0)
    plain.fake_all.load_state_dict(guided.fake_all.state_dict())
    for m in (guided, plain):
        m.bind(m.trainable(), {})
    run = {name: m.loss({"prompt": PROMPTS[:2]}, 0, ["student"], torch.Generator().manual_seed(0))
           for name, m in (("guided", guided), ("plain", plain))}
    assert float(run["guided"].logs["preference_size"]) == 0.0
    torch.testing.assert_close(run["guided"].loss, run["plain"].loss)
    with torch.no_grad():
        for p in guided.fake_winner.parameters():
            p.add_(0.05 * torch.randn_like(p))
    out = guided.loss({"prompt": PROMPTS[:2]}, 0, ["student"], torch.Generator().manual_seed(0))
    assert float(out.logs["preference_size"]) > 0 and not torch.allclose(out.loss, run["plain"].loss)
    out.loss.mean().backward()
    nets = {"student": guided.student, "fake_winner": guided.fake_winner, "fake_loser": guided.fake_loser,
            "fake_all": guided.fake_all, "teacher": guided.teacher}
    assert {k for k, m in nets.items() if _grads(m)} == {"student"}
    with pytest.raises(ValueError, match="preference_guidance guides the reference term's teacher"):
        make_method(tiny_sd, tiny_clip, preference_guidance=1.0)


def test_best_of_k_pairs_the_rewards_best_and_worst_sample(tiny_sd, tiny_clip):
    """samples_per_prompt 4: the reward scores all 4 candidates of each prompt; the pair is its argmax and
    argmin (the logged winner and loser rewards are the per-prompt max and min of the scores computed here
    independently). Generating the picked noises again with autograd gives the same samples, and the student
    step's gradient reaches the student only."""
    method, _ = make_method(tiny_sd, tiny_clip, samples_per_prompt=4)
    method.bind(method.trainable(), {})
    prompts = PROMPTS[:2]
    cond = method.bundle.encode_prompt(prompts, image_size=(16, 16))
    x_T, x_0 = method.candidates(cond, 2, torch.Generator().manual_seed(0))
    assert x_T.shape[0] == x_0.shape[0] == 8 and not x_0.requires_grad
    best, worst, decided, logs = method.rank(x_0, prompts)
    images = method.bundle.decode_latents(x_0).float().clamp(-1, 1)
    scores = method.reward(images, prompts * 4).float().reshape(4, 2)
    assert best.tolist() == scores.argmax(0).tolist() and worst.tolist() == scores.argmin(0).tolist()
    torch.testing.assert_close(logs["reward_winner"], scores.max(0).values.mean())
    torch.testing.assert_close(logs["reward_loser"], scores.min(0).values.mean())
    again = method.generate_x0(method.student, torch.cat([pick(x_T, best), pick(x_T, worst)]),
                               type(cond).cat([cond, cond]))
    torch.testing.assert_close(again, torch.cat([pick(x_0, best), pick(x_0, worst)]), atol=1e-5, rtol=1e-5)
    out = method.loss({"prompt": prompts}, 0, ["student"], torch.Generator().manual_seed(1))
    out.loss.mean().backward()
    assert _grads(method.student) and not _grads(method.fake_winner) and not _grads(method.teacher)


def test_student_source_initialises_student_only(tiny_sd, tiny_clip, tmp_path):
    """distill_dpo.student_source reaches f-distill's loader (tests/test_fdistill.py covers its errors): the
    student is that folder's denoiser (another seed here), both fake scores stay copies of the teacher."""
    from pipelines.tiny import save_tiny_pipeline

    other = save_tiny_pipeline("sd", tmp_path / "other", seed=1)
    method, _ = make_method(tiny_sd, tiny_clip, student_source=str(other))
    torch.testing.assert_close(method.student.state_dict(),
                               load_file(other / "unet" / "diffusion_pytorch_model.safetensors"), rtol=0, atol=0)
    for fake in (method.fake_winner, method.fake_loser):
        torch.testing.assert_close(fake.state_dict(), method.teacher.state_dict(), rtol=0, atol=0)
    with pytest.raises(FileNotFoundError, match="distill_dpo.student_source"):
        make_method(tiny_sd, tiny_clip, student_source=str(tmp_path / "missing dir"))


def test_one_loop_step_changes_trained_networks_only(tiny_sd, tiny_clip, tmp_path):
    """One real loop step with k = 1 (all three groups step): student and both fake scores change; teacher,
    VAE and reward do not."""
    from accelerate import Accelerator

    from trainers.loop import train

    method, cfg = make_method(tiny_sd, tiny_clip, tmp_path, student_update_every=1)
    cfg.train.max_steps, cfg.train.checkpoint_every = 1, 0
    frozen = {k: {n: p.clone() for n, p in m.named_parameters()}
              for k, m in (("teacher", method.teacher), ("vae", method.bundle.vae), ("reward", method.reward))}
    before = {k: {n: p.clone() for n, p in m.named_parameters()} for k, m in method.trainable().items()}
    train(cfg, Accelerator(cpu=True), method, [{"prompt": p, "skipped": 0} for p in PROMPTS])
    for group, module in method.trainable().items():
        assert any(not torch.equal(p, before[group][n]) for n, p in module.named_parameters()), group
    for name, module in (("teacher", method.teacher), ("vae", method.bundle.vae), ("reward", method.reward)):
        assert all(torch.equal(p, frozen[name][n]) for n, p in module.named_parameters()), name


def test_export_samples_in_one_step_with_plain_diffusers(tiny_sd, tiny_clip, tmp_path):
    """The export is f-distill's: DDIM, trailing spacing (t = 999), final alpha 1, so diffusers' one-step
    latents equal the generator G(x_T) trained here."""
    from diffusers import DiffusionPipeline

    from trainers.run import export_run

    method, cfg = make_method(tiny_sd, tiny_clip, tmp_path)
    method.bind(method.trainable(), {})
    with torch.no_grad():
        for p in method.student.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    out = export_run(cfg, method, "# recipe\n")
    pipe = DiffusionPipeline.from_pretrained(out)
    pipe.scheduler.set_timesteps(1)
    assert (type(pipe.scheduler).__name__, pipe.scheduler.timesteps.tolist()) == ("DDIMScheduler", [999])
    x_T = torch.randn(method.bundle.latent_shape(2, (16, 16)), generator=torch.Generator().manual_seed(5))
    cond = method.bundle.encode_prompt(PROMPTS[:2], image_size=(16, 16))
    ours = method.generate_x0(method.student.eval(), x_T, cond).detach()
    theirs = pipe(PROMPTS[:2], num_inference_steps=1, guidance_scale=1.0, latents=x_T.clone(), height=16, width=16,
                  output_type="latent").images
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)
    assert "num_inference_steps=1" in (out / "README.md").read_text()


# ------------------------------------------------------------------ CLI: 2-process DDP and exact resume




def test_two_process_ddp_then_resume_is_exact(tmp_path, tiny_sd, tiny_clip, capsys):
    """4 steps (student, critic, student, critic) on 2 processes through the CLI, ranked by a tiny random CLIP:
    both ranks hold the same student; student and fake scores have all moved off the teacher. The same recipe
    on one process, with the step-4 checkpoint deleted and the command re-run, resumes from step 2: every
    tensor of the final checkpoint (student, both fake scores, three optimizers, student EMA) is bitwise
    equal."""
    run, prompts = tmp_path / "run", tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS * 2) + "\n")
    recipe = tmp_path / "distill_dpo.yaml"
    recipe.write_text("\n".join([
        "# python scripts/distill.py --config distill_dpo.yaml", "method: distill_dpo", f"output_dir: {run}",
        "model:", f"  source: {tiny_sd}", "data:", "  kind: prompts", f"  path: {prompts}", "  resolution: 16",
        "train:", "  max_steps: 4", "  batch_size: 2", "  checkpoint_every: 2", "  keep_checkpoints: 3",
        "  log_every: 1", "  log_with: none", "  ema_decay: 0.9", "optim:", "  lr: 1.0e-3", "export:",
        "  enabled: false", "distill_dpo:", "  reward: toy_clip", "  reward_options:", f"    path: {tiny_clip}",
        "  student_update_every: 2", ""]))
    launch_training(recipe)
    assert_ranks_identical(run)
    final = run / "checkpoints" / "step-0000004"
    unbroken = checkpoint_tensors(final)
    teacher = load_file(tiny_sd / "unet" / "diffusion_pytorch_model.safetensors")
    for prefix in ("model", "model_1", "model_2"):  # student, fake_winner, fake_loser
        assert not torch.equal(unbroken[f"{prefix}.conv_in.weight"], teacher["conv_in.weight"]), prefix
    assert any(k.startswith("optimizer_2.") for k in unbroken) and "average_ema.conv_in.weight" in unbroken
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert ["loss_dm_winner" in m for m in metrics] == [True, False, True, False]
    assert all(m["tie_fraction"] < 1 for m in metrics)
    assert_resume_is_exact(recipe, tmp_path / "single", 4, capsys)


@pytest.mark.parametrize("override, message", [
    ("distill_dpo.reward=nope", r"distill_dpo\.reward: unknown reward 'nope' \(known: .*toy_attributes"),
    ("distill_dpo.reward_options={colour: red}", r"distill_dpo\.reward_options: \['colour'\] not accepted"),
    ("model.lora.rank=4", r"model\.lora\.rank: distill_dpo trains the full student"),
    ("distill_dpo.loser_cap=0", r"loser_cap and noise_scale must be > 0"),
    ("distill_dpo.samples_per_prompt=1", r"samples_per_prompt must be >= 2"),
    (("distill_dpo.pair_noise=scaled", "distill_dpo.samples_per_prompt=4"), r"pair_noise: scaled makes exactly two"),
])
def test_config_errors_name_the_key(override, message):
    from trainers.config import ConfigError, load_config

    overrides = [override] if isinstance(override, str) else list(override)
    with pytest.raises(ConfigError, match=message):
        load_config(ROOT / "configs" / "toy" / "distill_dpo.yaml", overrides)


@pytest.mark.parametrize("recipe, family", [("sd15_distill_dpo.yaml", "sd"), ("sdxl_distill_dpo.yaml", "sdxl"),
                                            ("sd3_distill_dpo.yaml", "sd3")])
def test_real_recipes_run_two_steps_on_tiny_architectures(recipe, family, tiny_sd, tiny_clip, tmp_path):
    """The SD1.5 / SDXL / SD3 recipes as written (bf16 autocast and frozen weights, gradient checkpointing, k = 10)
    with the model, prompts and ranker swapped for tiny ones: a student step then a critic step."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from pipelines.tiny import save_tiny_pipeline
    from trainers.config import load_config
    from trainers.data import build_dataset
    from trainers.distill_dpo import DistillDPO
    from trainers.loop import train
    from trainers.run import load_run_bundle

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    source = tiny_sd if family == "sd" else save_tiny_pipeline(family, tmp_path / family)
    cfg = load_config(ROOT / "configs" / recipe, [
        f"model.source={source}", f"data.path={prompts}", "data.resolution=16", "train.batch_size=2",
        "train.max_steps=2", "train.checkpoint_every=0", "train.validate_every=0", "train.log_with=none",
        "train.log_every=1", f"output_dir={tmp_path / 'run'}", "distill_dpo.student_source=null",
        "distill_dpo.reward=toy_clip", f"distill_dpo.reward_options={{path: {tiny_clip}}}", "export.enabled=false"])
    AcceleratorState._reset_state(reset_partial_state=True)
    accelerator = Accelerator(cpu=True, mixed_precision=cfg.train.mixed_precision)
    method = DistillDPO(cfg, load_run_bundle(cfg, accelerator.device))
    train(cfg, accelerator, method, build_dataset(cfg.data))
    AcceleratorState._reset_state(reset_partial_state=True)
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert "loss_dm_winner" in metrics[0] and "loss_fake_winner" in metrics[1]
    assert all(math.isfinite(m["loss"]) for m in metrics)
