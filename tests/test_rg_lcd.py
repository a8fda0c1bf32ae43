"""RG-LCD: the reward term and the LRM loss by hand, gradient routing, config refusals, the LRM checkpoint and
its pre-training script, the recipes on tiny architectures, and 2-process DDP + exact resume.

LCD itself is covered by tests/test_lcd.py; only what RG-LCD adds is tested here.
"""
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from trainers.latent_reward import (LatentRewardConfig, LatentRewardModel, load_latent_reward, lrm_loss,
                                    pairwise_agreement, preference_kl, preference_targets, save_latent_reward)
from trainers.losses.reward import clip_reward
from trainers.rg_lcd import rg_lcd_loss
from checkpoint_state import checkpoint_tensors
from distributed_launch import assert_ranks_identical, launch_training
from test_clean_latents import assert_cache_trains_like_images, build_world
from image_folders import write_image_folder

ROOT = Path(__file__).resolve().parents[1]
TINY_ARCH = {"patch_size": 2, "width": 16, "depth": 1, "heads": 2, "text_depth": 1, "embed_dim": 8}




# ------------------------------------------------------------------ maths by hand


def test_reward_term_and_ceiling_by_hand():
    """L = d - beta R: d = [1, 2], R = [4, -2], beta = 0.5 -> [1 - 2, 2 + 1] = [-1, 3]; dL/dR = -beta, so a
    descent step on L raises R. Ceiling 2 (ImageReward): -relu(2 - R) for R = [3, 2, 0.5, -1] is [0, 0, -1.5, -3],
    with gradient 0 at or above the ceiling (no push past it) and 1 below."""
    reward = torch.tensor([4.0, -2.0], requires_grad=True)
    loss = rg_lcd_loss(torch.tensor([1.0, 2.0]), reward, 0.5)
    assert loss.tolist() == [-1.0, 3.0]
    loss.sum().backward()
    assert reward.grad.tolist() == [-0.5, -0.5]
    r = torch.tensor([3.0, 2.0, 0.5, -1.0], requires_grad=True)
    clipped = clip_reward(r, 2.0)
    assert clipped.tolist() == [0.0, 0.0, -1.5, -3.0]
    clipped.sum().backward()
    assert r.grad.tolist() == [0.0, 0.0, 1.0, 1.0]


def test_preference_kl_by_hand():
    """p = softmax(a r_expert), q = softmax(r_lrm), KL = sum p log(p / q), dKL/dr_lrm = q - p.

    Triplet r_expert = [0, 0, ln 2]: p = [1/4, 1/4, 1/2]; r_lrm = 0: q = 1/3 each.
    KL = 2 (1/4) ln(3/4) + (1/2) ln(3/2) = 0.5 (-0.287682) + 0.5 (0.405465) = 0.058892;
    gradient q - p = [1/12, 1/12, -1/6].
    Pairs (reference code): (0,1) p = q -> 0; (0,2) and (1,2): p = [1/3, 2/3], q = [1/2, 1/2],
    KL = (1/3) ln(2/3) + (2/3) ln(4/3) = -0.135155 + 0.191788 = 0.056633; sum 0.113266.
    Logit scale a = 2 on r_expert = [0, ln 2 / 2, ...] gives the same p as a = 1 on [0, ln 2]: p = [1/3, 2/3].
    The second row has q = p (r_lrm = r_expert + 5, softmax is shift-invariant): KL = 0.
    """
    expert = torch.tensor([[0.0, 0.0, math.log(2)], [1.0, 2.0, 3.0]], dtype=torch.float64)
    lrm = torch.tensor([[0.0, 0.0, 0.0], [6.0, 7.0, 8.0]], dtype=torch.float64, requires_grad=True)
    kl = preference_kl(expert, lrm)
    assert kl[0].item() == pytest.approx(0.5 * math.log(0.75) + 0.5 * math.log(1.5), abs=1e-7)
    assert kl[1].item() == pytest.approx(0.0, abs=1e-7)
    kl[0].backward()
    assert torch.allclose(lrm.grad[0].double(), torch.tensor([1 / 12, 1 / 12, -1 / 6], dtype=torch.float64), atol=1e-7)
    pairs = lrm_loss(expert, lrm.detach(), "pairs")
    assert pairs[0].item() == pytest.approx(2 * (math.log(2 / 3) / 3 + 2 * math.log(4 / 3) / 3), abs=1e-6)
    assert lrm_loss(expert, lrm.detach(), "triplet")[0].item() == pytest.approx(kl[0].item(), abs=1e-7)
    assert torch.allclose(preference_targets(torch.tensor([0.0, 0.0, math.log(2)])), torch.tensor([0.25, 0.25, 0.5]))
    assert torch.allclose(preference_targets(torch.tensor([0.0, math.log(2) / 2]), logit_scale=2.0),
                          torch.tensor([1 / 3, 2 / 3]))


def test_pairwise_agreement_by_hand():
    """Expert [1, 2, 3] orders pairs (0,1), (0,2), (1,2) as <, <, <. LRM [0, 5, 1] gives <, <, >: 2/3.
    A reversed LRM [3, 2, 1] agrees on none; ties count as disagreement."""
    expert = torch.tensor([[1.0, 2.0, 3.0]] * 3)
    lrm = torch.tensor([[0.0, 5.0, 1.0], [3.0, 2.0, 1.0], [1.0, 1.0, 1.0]])
    assert torch.allclose(pairwise_agreement(expert, lrm), torch.tensor([2 / 3, 0.0, 0.0]))


@pytest.mark.parametrize("fusion", ["cosine", "cross"])
def test_lrm_scores_any_latent_size_and_round_trips_through_safetensors(tmp_path, fusion):
    """Both fusions: 8x8 and 6x10 latents both score (cosine scores are exp(s) cos in [-100, 100]); padded
    tokens do not change a score; a saved checkpoint reloads to the same outputs, and a checkpoint whose
    architecture differs from the config is one clear line."""
    arch = LatentRewardConfig(**TINY_ARCH, fusion=fusion)
    torch.manual_seed(0)
    model = LatentRewardModel(arch, 4, 32)
    text, mask = torch.randn(2, 5, 32), torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1]])
    for shape in ((2, 4, 8, 8), (2, 4, 6, 10)):
        scores = model(torch.randn(shape), text, mask)
        assert scores.shape == (2,) and (fusion == "cross" or scores.abs().max() <= 100.0)
    padded = text.clone()
    padded[0, 2:] = 99.0
    z = torch.randn(2, 4, 8, 8)
    assert torch.allclose(model(z, text, mask)[0], model(z, padded, mask)[0], atol=1e-5), "masked tokens ignored"
    path = save_latent_reward(model, tmp_path / "lrm.safetensors")
    again = load_latent_reward(path, arch, 4, 32)
    assert torch.equal(model(z, text, mask), again(z, text, mask))
    with pytest.raises(ValueError, match=r"lrm.init: .* saved with arch=.*set rg_lcd.lrm.arch to match") as err:
        load_latent_reward(path, LatentRewardConfig(**{**TINY_ARCH, "width": 32, "fusion": fusion}), 4, 32)
    assert "\n" not in str(err.value)


def test_cross_fusion_trains_every_parameter_and_older_cosine_checkpoints_still_load(tmp_path):
    """A cross-fusion score reaches every parameter (none idle, which DDP would refuse); a checkpoint written
    before `fusion` and `fusion_depth` existed (its header's arch lacks them) loads as the cosine LRM it is;
    an unknown fusion is a one-line error."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = LatentRewardModel(LatentRewardConfig(**TINY_ARCH, fusion="cross"), 4, 32)
    model(torch.randn(2, 4, 8, 8), torch.randn(2, 5, 32), torch.ones(2, 5)).sum().backward()
    idle = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not idle, idle

    cosine = LatentRewardModel(LatentRewardConfig(**TINY_ARCH), 4, 32)
    old_arch = {**TINY_ARCH, "logit_scale": 100.0}
    save_file({k: v.contiguous() for k, v in cosine.state_dict().items()}, str(tmp_path / "old.safetensors"),
              metadata={"arch": json.dumps(old_arch, sort_keys=True), "latent_channels": "4", "text_dim": "32"})
    loaded = load_latent_reward(tmp_path / "old.safetensors", LatentRewardConfig(**TINY_ARCH), 4, 32)
    z, text = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 32)
    assert torch.equal(loaded(z, text), cosine(z, text))
    with pytest.raises(ValueError, match="lrm.arch.fusion must be one of"):
        LatentRewardConfig(fusion="film")


# ------------------------------------------------------------------ fixtures: tiny SD, tiny CLIP reward, images


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    from pipelines.tiny import save_tiny_pipeline

    return save_tiny_pipeline("sd", tmp_path_factory.mktemp("rg_lcd_sd") / "pipe")


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A random transformers CLIPModel folder that build_reward('toy_clip', path=...) loads (32 px input)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from pipelines.tiny import clip_tokenizer

    tokenizer = clip_tokenizer()
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=8)
    folder = tmp_path_factory.mktemp("rg_lcd_clip")
    CLIPModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("rg_lcd_images")
    write_image_folder(folder, caption="shape {i}")
    return folder


def write_recipe(path: Path, source, images, clip, run_dir, rg_lcd: str = "", top: str = "",
                 resolution: int = 16) -> Path:
    path.write_text("\n".join([
        "# python scripts/distill.py --config recipe.yaml", "method: rg_lcd", f"output_dir: {run_dir}",
        f"model: {{source: {source}}}", f"data: {{kind: imagefolder, path: {images}, resolution: {resolution}}}",
        "train: {max_steps: 2, batch_size: 2, log_every: 1, log_with: none}", "optim: {lr: 1.0e-3}", *top.splitlines(),
        "rg_lcd:", "  num_ddim_timesteps: 10", "  sample_steps: 2", "  guidance: 3.0",
        f"  reward: {{name: toy_clip, options: {{path: {clip}}}}}", f"  lrm: {{batch_size: 1, arch: {TINY_ARCH}}}",
        *[f"  {line}" for line in rg_lcd.splitlines()]]) + "\n")
    return path


def make_method(tmp_path, source, images, clip, rg_lcd: str = "", resolution: int = 16):
    from trainers.config import load_config
    from trainers.rg_lcd import RGLCD
    from trainers.run import load_run_bundle

    cfg = load_config(write_recipe(tmp_path / "recipe.yaml", source, images, clip, tmp_path / "run", rg_lcd,
                                   resolution=resolution))
    return cfg, RGLCD(cfg, load_run_bundle(cfg, torch.device("cpu")))


# ------------------------------------------------------------------ direction, gradient routing, config


def test_reward_gradient_step_raises_the_decoded_estimates_reward(tmp_path, tiny_sd, images, tiny_clip):
    """optimize: expert: one normalised descent step on rg_lcd_loss(0, R(D(f)), 1) w.r.t. the latent f raises the
    expert reward of the decoded estimate (the sign of the reward term through the real VAE and reward)."""
    _, method = make_method(tmp_path, tiny_sd, images, tiny_clip, "optimize: expert")
    f = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0), requires_grad=True)
    prompts = ["a cat", "a dog"]
    reward = method.student_reward(f, None, prompts)
    rg_lcd_loss(torch.zeros(2), reward, 1.0).sum().backward()
    step = f.grad / f.grad.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    after = method.student_reward((f - 0.05 * step).detach(), None, prompts)
    assert (after > reward.detach()).all(), (reward, after)


def _grads(module):
    return {k: p.grad.clone() for k, p in module.named_parameters() if p.grad is not None}


def test_each_term_reaches_only_its_network_and_a_step_changes_only_trained_ones(tmp_path, tiny_sd, images, tiny_clip):
    """Same step noise, three loss weightings: the reward term changes the student's gradient but gives the LRM
    none; the LRM's KL gives the LRM a gradient and leaves the student's exactly as pure LCD's. Then one SGD step
    moves the student and the LRM, never the teacher, the VAE or the expert reward."""
    from trainers.ema import make_average

    _, method = make_method(tmp_path, tiny_sd, images, tiny_clip)
    student, lrm = method.student, method.lrm
    method.bind({"student": student, "lrm": lrm}, {"target": make_average(student)})
    batch = {"pixel_values": torch.rand(2, 3, 16, 16) * 2 - 1, "prompt": ["a cat", "a dog"]}

    def grads(beta, kl_scale):
        method.options.reward_scale, method.options.lrm.loss_scale = beta, kl_scale
        student.zero_grad(set_to_none=True)
        lrm.zero_grad(set_to_none=True)
        out = method.loss(batch, 0, ["student", "lrm"], torch.Generator().manual_seed(0))
        out.loss.mean().backward()
        return _grads(student), _grads(lrm), out

    lcd_only, lrm_none, _ = grads(0.0, 0.0)
    with_reward, lrm_from_reward, _ = grads(1.0, 0.0)
    with_kl, lrm_from_kl, out = grads(0.0, 1.0)
    assert all(not g.any() for g in lrm_none.values()) and all(not g.any() for g in lrm_from_reward.values())
    assert any(not torch.equal(lcd_only[k], with_reward[k]) for k in lcd_only), "reward reaches the student"
    assert all(torch.equal(lcd_only[k], with_kl[k]) for k in lcd_only), "the KL leaves the student alone"
    assert any(g.abs().sum() > 0 for g in lrm_from_kl.values()), "the KL trains the LRM"
    assert {"loss_lrm", "lrm_agreement", "expert_student", "expert_target", "expert_real", "reward"} <= set(out.logs)

    frozen = {"teacher": method.teacher, "vae": method.bundle.vae, "reward": method.reward}
    before = {name: {k: v.clone() for k, v in m.state_dict().items()} for name, m in frozen.items()}
    trained = {name: {k: v.clone() for k, v in m.state_dict().items()} for name, m in (("student", student),
                                                                                      ("lrm", lrm))}
    method.options.reward_scale = 1.0
    grads(1.0, 1.0)
    torch.optim.SGD([*student.parameters(), *lrm.parameters()], lr=0.1).step()
    for name, m in (("student", student), ("lrm", lrm)):
        assert any(not torch.equal(trained[name][k], v) for k, v in m.state_dict().items()), f"{name} did not move"
    for name, m in frozen.items():
        assert not any(p.requires_grad for p in m.parameters()), f"{name} is trainable"
        assert all(torch.equal(before[name][k], v) for k, v in m.state_dict().items()), f"{name} changed"


def test_flow_teacher_step_gets_the_reward_gradient(tmp_path, images, tiny_clip):
    """On a flow (Sana) teacher, LCD's f = x - sigma v carries the reward term to the student: its gradient
    differs from pure LCD's under the same step noise, and a step moves the student, not the teacher."""
    from pipelines.tiny import save_tiny_pipeline

    source = save_tiny_pipeline("sana", tmp_path / "sana")
    _, method = make_method(tmp_path, source, images, tiny_clip, "guidance_embedding: false\ntarget_decay: 0.0",
                            resolution=32)
    assert method.boundary is None
    student = method.student
    method.bind({"student": student, "lrm": method.lrm}, {})
    batch = {"pixel_values": torch.rand(2, 3, 32, 32) * 2 - 1, "prompt": ["a cat", "a dog"]}

    def grads(beta):
        method.options.reward_scale = beta
        student.zero_grad(set_to_none=True)
        out = method.loss(batch, 0, ["student", "lrm"], torch.Generator().manual_seed(0))
        assert torch.isfinite(out.loss).all()
        out.loss.mean().backward()
        return _grads(student)

    lcd_only, with_reward = grads(0.0), grads(1.0)
    assert any(not torch.equal(lcd_only[k], with_reward[k]) for k in lcd_only), "reward reaches the student"
    teacher0 = {k: v.clone() for k, v in method.teacher.state_dict().items()}
    student0 = {k: v.clone() for k, v in student.state_dict().items()}
    torch.optim.SGD(student.parameters(), lr=0.1).step()
    assert any(not torch.equal(student0[k], v) for k, v in student.state_dict().items())
    assert all(torch.equal(teacher0[k], v) for k, v in method.teacher.state_dict().items())


def _prompt_file(tmp_path) -> Path:
    path = tmp_path / "reward_prompts.txt"
    path.write_text("a cat\n\na dog\n")
    return path


def test_imagefree_prompt_estimates_pair_each_prompt_with_two_noises_and_climb_the_expert(tmp_path, tiny_sd, images,
                                                                                        tiny_clip):
    """prompts.path: rows i and i + k share a drawn prompt but not a noise; the term is -beta mean R(D(f)) of those
    estimates, so a small step against its normalised gradient raises the mean reward of the same draws (first
    order: the rise is eps ||g|| > 0)."""
    _, method = make_method(tmp_path, tiny_sd, images, tiny_clip,
                            f"optimize: expert\nprompts: {{path: {_prompt_file(tmp_path)}, batch_size: 3}}")
    assert method.reward_prompts == ["a cat", "a dog"]
    student = method.student
    method.bind({"student": student}, {})
    f, _, prompts = method.prompt_estimates(torch.Generator().manual_seed(0))
    assert f.shape[0] == 6 and prompts[:3] == prompts[3:] and set(prompts) <= {"a cat", "a dog"}
    assert not torch.allclose(f[:3], f[3:]), "the two estimates of a prompt come from different noises"

    def mean_reward():
        with torch.no_grad():
            f, cond, prompts = method.prompt_estimates(torch.Generator().manual_seed(0))
            return method.student_reward(f, cond, prompts).mean()

    before = mean_reward()
    loss, logs = method.prompt_term(1.0, False, torch.Generator().manual_seed(0))
    assert torch.allclose(loss, -before) and torch.allclose(logs["reward_prompts"], before)
    student.zero_grad(set_to_none=True)
    loss.backward()
    params = [p for p in student.parameters() if p.grad is not None]
    norm = torch.sqrt(sum(p.grad.pow(2).sum() for p in params))
    with torch.no_grad():
        for p in params:
            p -= 1e-3 * p.grad / norm
    assert mean_reward() > before


def test_imagefree_pairs_train_the_lrm_and_its_reward_reaches_only_the_student(tmp_path, tiny_sd, images, tiny_clip):
    """With an online LRM the prompt term adds KL(softmax(R_expert) || softmax(R_phi)) over each prompt's pair of
    estimates: at beta 0 only the LRM gets a gradient; at beta 1 with the KL weighted 0 only the student does."""
    _, method = make_method(tmp_path, tiny_sd, images, tiny_clip,
                            f"prompts: {{path: {_prompt_file(tmp_path)}, batch_size: 2}}")
    student, lrm = method.student, method.lrm
    method.bind({"student": student, "lrm": lrm}, {})

    def grads(beta, kl_scale):
        method.options.lrm.loss_scale = kl_scale
        student.zero_grad(set_to_none=True)
        lrm.zero_grad(set_to_none=True)
        loss, logs = method.prompt_term(beta, True, torch.Generator().manual_seed(0))
        loss.backward()
        nonzero = lambda m: any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())  # noqa: E731
        return nonzero(student), nonzero(lrm), logs

    assert grads(0.0, 1.0)[:2] == (False, True)
    student_moves, lrm_moves, logs = grads(1.0, 0.0)
    assert (student_moves, lrm_moves) == (True, False)
    assert {"reward_prompts", "loss_lrm_prompts", "expert_prompts", "lrm_agreement_prompts"} <= set(logs)
    assert logs["loss_lrm_prompts"] > 0


def test_config_refuses_a_nondifferentiable_direct_reward_but_takes_it_as_the_lrm_expert(tmp_path):
    """toy_attributes has no gradient: one line refusing optimize: expert (before any model loads), accepted as
    the LRM's expert; a frozen LRM without a checkpoint is refused too."""
    from trainers.config import ConfigError, load_config

    recipe = ROOT / "configs" / "toy" / "rg_lcd.yaml"
    with pytest.raises(ConfigError, match="toy_attributes is not differentiable.*set rg_lcd.optimize: lrm") as err:
        load_config(recipe, ["rg_lcd.reward.name=toy_attributes", "rg_lcd.optimize=expert"])
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="not differentiable"):
        load_config(recipe, ["rg_lcd.optimize=expert", "rg_lcd.reward.name=weighted",
                             "rg_lcd.reward.options={terms: {toy_clip: 1.0, toy_attributes: 1.0}}"])
    assert load_config(recipe, ["rg_lcd.reward.name=toy_attributes"]).options.optimize == "lrm"
    with pytest.raises(ConfigError, match="online: false.*needs lrm.init"):
        load_config(recipe, ["rg_lcd.lrm.online=false"])
    with pytest.raises(ConfigError, match="unknown reward 'hps'"):
        load_config(recipe, ["rg_lcd.reward.name=hps"])
    with pytest.raises(ConfigError, match="rg_lcd.prompts.path: .*nowhere.txt not found"):
        load_config(recipe, [f"rg_lcd.prompts.path={tmp_path / 'nowhere.txt'}"])
    with pytest.raises(ConfigError, match="prompts.batch_size: need >= 1"):
        load_config(recipe, [f"rg_lcd.prompts.path={recipe}", "rg_lcd.prompts.batch_size=0"])


def test_expert_ceilings_apply_per_weighted_term_and_to_the_total():
    """toy_attributes scores noise 0 (nothing drawn matches the caption). A weighted term 2 x toy_attributes
    with ceiling 0.5 gives 2 (-relu(0.5 - 0)) = -1; a total ceiling of -0.25 on that gives -relu(-0.25 + 1) = -0.75."""
    from trainers.rg_lcd import RewardSpec, build_expert

    terms = {"terms": [{"name": "toy_attributes", "weight": 2.0, "ceiling": 0.5}]}
    images, prompts = torch.zeros(2, 3, 32, 32), ["a small red circle at the top left on a blue background"] * 2
    assert build_expert(RewardSpec("weighted", terms), "cpu", torch.float32)(images, prompts).tolist() == [-1.0, -1.0]
    total = build_expert(RewardSpec("weighted", terms, ceiling=-0.25), "cpu", torch.float32)
    assert total(images, prompts).tolist() == [-0.75, -0.75] and not total.differentiable


# ------------------------------------------------------------------ scripts and recipes on tiny architectures


def _import_script(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pretrain_lrm_refuses_a_held_out_share_that_leaves_nothing_to_fit(tmp_path, capsys):
    """--val-prompts as large as the prompt list is a one-line error before any sampling."""
    (tmp_path / "prompts.txt").write_text("a red circle\na blue square\n")
    code = _import_script("pretrain_lrm").main([
        "--config", str(ROOT / "configs" / "toy" / "rg_lcd.yaml"), "--prompts", str(tmp_path / "prompts.txt"),
        "--val-prompts", "2", "--out", str(tmp_path / "lrm.safetensors")])
    assert code == 2 and "leaves no set to fit (2 prompts)" in capsys.readouterr().err
    assert not (tmp_path / "lrm.safetensors").exists()


def test_pretrained_lrm_feeds_the_toy_recipe_through_the_cli_which_exports_lcm_and_resumes_exactly(
        tmp_path, tiny_sd, images, tiny_clip, capsys):
    """scripts/pretrain_lrm.py fits an LRM on teacher samples scored by the expert, reporting sets it holds out,
    and writes a checkpoint (and again from its saved sets, two files joined);
    configs/toy/rg_lcd.yaml (teacher and data swapped for tiny ones) loads it via rg_lcd.lrm.init and runs 4 steps
    through scripts/distill.py, exporting LCD's LCMScheduler folder that plain diffusers samples. Deleting the
    step-4 checkpoint and re-running resumes at step 2 and rebuilds student, target network, LRM and both
    optimizers bit for bit."""
    from accelerate.state import AcceleratorState
    from diffusers import DiffusionPipeline

    recipe = str(ROOT / "configs" / "toy" / "rg_lcd.yaml")
    shared = [f"model.source={tiny_sd}", "data.kind=imagefolder", f"data.path={images}", "data.resolution=16",
              f"rg_lcd.reward.options={{path: {tiny_clip}}}", f"rg_lcd.lrm.arch={TINY_ARCH}"]
    (tmp_path / "prompts.txt").write_text("a red circle\na blue square\n")
    lrm_path = tmp_path / "lrm.safetensors"
    assert _import_script("pretrain_lrm").main([
        "--config", recipe, "--prompts", str(tmp_path / "prompts.txt"), "--sample-steps", "1,2,3",
        "--train-steps", "3", "--batch-size", "2", "--log-every", "1", "--val-prompts", "1", "--out", str(lrm_path),
        "--save-sets", str(tmp_path / "sets.safetensors"), *shared]) == 0
    out = capsys.readouterr().out
    assert out.count("held-out sets: kl") == 3 and lrm_path.is_file()
    assert "by candidates: 0-1 " in out and "1-2 " in out, "agreement per pair of sample slots"
    sets = str(tmp_path / "sets.safetensors")
    assert _import_script("pretrain_lrm").main([
        "--config", recipe, "--sets", sets, sets, "--train-steps", "1", "--val-prompts", "2",
        "--out", str(tmp_path / "joined.safetensors"), *shared]) == 0
    assert "4 prompts x 3 latents" in capsys.readouterr().out, "two set files are joined"

    run = tmp_path / "run"
    argv = ["--config", recipe, *shared, f"output_dir={run}", "train.max_steps=4", "train.batch_size=2",
            "train.checkpoint_every=2", "train.keep_checkpoints=3", "train.validate_every=0", "train.log_every=1",
            f"rg_lcd.lrm.init={lrm_path}", "rg_lcd.lrm.batch_size=1", "rg_lcd.reward_start=1"]
    distill = _import_script("distill")
    AcceleratorState._reset_state(reset_partial_state=True)
    assert distill.main(argv) == 0
    scheduler = json.loads((run / "pipeline" / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "LCMScheduler" and scheduler["original_inference_steps"] == 20
    pipe = DiffusionPipeline.from_pretrained(run / "pipeline")
    image = pipe(["a cat"], num_inference_steps=2, guidance_scale=3.0, height=16, width=16, output_type="pt",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 3, 16, 16) and torch.isfinite(image).all()
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 4 and all("loss_lrm" in m and "lrm_agreement" in m for m in metrics)

    last = run / "checkpoints" / "step-0000004"
    unbroken = checkpoint_tensors(last)
    assert {"model.conv_in.weight", "model_1.log_logit_scale", "average_target.conv_in.weight"} <= set(unbroken)
    assert any(k.startswith("optimizer_1.") for k in unbroken), "the LRM's optimizer state is checkpointed"
    shutil.rmtree(last)
    capsys.readouterr()
    AcceleratorState._reset_state(reset_partial_state=True)
    assert distill.main(argv) == 0
    captured = capsys.readouterr()
    assert "resumed from" in captured.out + captured.err
    again = checkpoint_tensors(last)
    assert again.keys() == unbroken.keys()
    different = [k for k in unbroken if not torch.equal(unbroken[k], again[k])]
    assert not different, f"{len(different)} tensors differ after resume, e.g. {different[:3]}"
    AcceleratorState._reset_state(reset_partial_state=True)
    online = load_latent_reward(last / "model_1.safetensors", LatentRewardConfig(**TINY_ARCH), 4, 32)
    assert not torch.equal(online.log_logit_scale, load_latent_reward(lrm_path, online.arch, 4, 32).log_logit_scale)


@pytest.mark.parametrize("recipe, family, extra", [
    ("sd15_rg_lcd.yaml", "sd", []),
    ("sdxl_rg_lcd_lora.yaml", "sdxl", ["rg_lcd.optimize=lrm", f"rg_lcd.lrm.arch={TINY_ARCH}"]),
], ids=["sd15-direct", "sdxl-lora-lrm"])
def test_real_recipes_run_two_steps_on_tiny_architectures(recipe, family, extra, tmp_path, images, tiny_clip):
    """The SD1.5 (direct HPS) and SDXL LoRA recipes as written - bf16 autocast, gradient checkpointing, the LoRA
    targets - with bf16 frozen weights, a tiny model of the family and the tiny CLIP as the expert. The SDXL run
    guides through an online LRM on SDXL's 2-encoder text embeddings; its adapters train, other weights do not."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from pipelines.tiny import save_tiny_pipeline
    from trainers.config import load_config
    from trainers.run import run

    source = save_tiny_pipeline(family, tmp_path / "pipe")
    cfg = load_config(ROOT / "configs" / recipe, [
        f"model.source={source}", "model.weight_dtype=bfloat16", f"data.path={images}", "data.resolution=16",
        "train.batch_size=2", "train.max_steps=2", "train.checkpoint_every=0", "train.validate_every=0",
        "train.log_with=none", "train.log_every=1", f"output_dir={tmp_path / 'run'}", "rg_lcd.reward.name=toy_clip",
        f"rg_lcd.reward.options={{path: {tiny_clip}}}", "rg_lcd.lrm.batch_size=1", *extra])
    AcceleratorState._reset_state(reset_partial_state=True)
    assert run(cfg, Accelerator(cpu=True, mixed_precision=cfg.train.mixed_precision)) == 0
    AcceleratorState._reset_state(reset_partial_state=True)
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2 and all(math.isfinite(m["loss"]) and math.isfinite(m["reward"]) for m in metrics)
    assert all(("loss_lrm" in m) == (family == "sdxl") for m in metrics)
    folder = tmp_path / "run" / "pipeline"
    assert json.loads((folder / "scheduler" / "scheduler_config.json").read_text())["_class_name"] == "LCMScheduler"
    if family == "sdxl":
        lora = load_file(folder / "pytorch_lora_weights.safetensors")
        assert any(v.abs().sum() > 0 for k, v in lora.items() if "lora_B" in k or "lora.up" in k)
        base = load_file(next((source / "unet").glob("*.safetensors")))
        merged = load_file(next((folder / "unet").glob("*.safetensors")))
        untouched = [k for k in base if "conv_in" in k or "time_embedding" in k]
        same = lambda a, b: torch.equal(a.to(torch.bfloat16).float(), b.float())  # noqa: E731 (bf16 weights)
        assert untouched and all(same(base[k], merged[k]) for k in untouched), "non-adapted weights stay frozen"


# ------------------------------------------------------------------ 2-process DDP (real CLI)


def test_two_process_ddp_trains_student_and_lrm_in_step(tmp_path, tiny_sd, images, tiny_clip):
    """2 steps on 2 gloo processes through the CLI with an online LRM and image-free prompts (the student runs
    twice per step under DDP): both ranks end with the same student, and the checkpoint holds student, LRM,
    target network and both optimizers (exact resume of all of them is checked single-process above; the loop's
    DDP resume is tests/test_loop.py's)."""
    run = tmp_path / "run"
    recipe = write_recipe(tmp_path / "ddp.yaml", tiny_sd, images, tiny_clip, run, top="export: {enabled: false}",
                          rg_lcd=f"prompts: {{path: {_prompt_file(tmp_path)}, batch_size: 1}}")
    launch_training(recipe)
    assert_ranks_identical(run)
    state = checkpoint_tensors(run / "checkpoints" / "step-0000002")
    assert {"model.conv_in.weight", "model_1.log_logit_scale", "average_target.conv_in.weight"} <= set(state)
    assert any(k.startswith("optimizer_1.") for k in state) and any(k.startswith("optimizer.") for k in state)
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [("loss_lrm" in m and "loss_lrm_prompts" in m) for m in metrics] == [True, True]


def test_cached_latents_train_exactly_like_their_images(tmp_path, monkeypatch, tiny_clip):
    """The LRM's real-latent member comes from the cache too (tests/test_clean_latents.py has the protocol)."""
    world = build_world(tmp_path / "world")
    options = {"num_ddim_timesteps": 10, "sample_steps": 2, "guidance": 3.0,
               "reward": {"name": "toy_clip", "options": {"path": str(tiny_clip)}},
               "lrm": {"batch_size": 1, "arch": TINY_ARCH}}
    assert_cache_trains_like_images(tmp_path, monkeypatch, world, "rg_lcd", {"rg_lcd": options})


def test_agreement_by_candidates_names_each_pair_of_sample_slots():
    """Two sets of K = 3 give pairs (0,1), (0,2), (1,2); agreement flags [[1, 1, 0], [1, 0, 0]] average to
    1.0, 0.5 and 0.0 per pair."""
    by_candidates = _import_script("pretrain_lrm").by_candidates
    assert by_candidates(torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]]), 3) == "0-1 1.00, 0-2 0.50, 1-2 0.00"


def test_pretrain_lrm_fits_contrast_sets_of_toy_renders_and_refuses_them_without_the_toy_world(
        tmp_path, tiny_sd, capsys):
    """--renders 6 --variants 3 on the toy recipe: 6 sets of 3 toy-VAE latents (a train-split render and two
    one-change variants of it, all under the render's caption), scored by the expert, fitted with 2 held out and
    saved with --save-sets; --init from that checkpoint with no steps reports the same held-out numbers; the
    --renders flags on a non-toy model, or an unknown kind of change, are a one-line error before anything
    loads."""
    from safetensors import safe_open

    from pipelines.toy.world import HELDOUT_COMBINATIONS, parse_caption

    recipe = str(ROOT / "configs" / "toy" / "rg_lcd.yaml")
    sets = tmp_path / "renders.safetensors"
    assert _import_script("pretrain_lrm").main([
        "--config", recipe, "--renders", "6", "--variants", "3", "--train-steps", "2", "--batch-size", "2",
        "--log-every", "1", "--val-prompts", "2", "--save-sets", str(sets), "--out", str(tmp_path / "lrm.safetensors"),
        f"rg_lcd.lrm.arch={TINY_ARCH}"]) == 0
    out = capsys.readouterr().out
    assert "6 prompts x 3 latents" in out and out.count("held-out sets: kl") == 2
    assert "held-out sets, 4 pass/fail pairs: the passing sample scores higher under the expert in " in out, \
        "2 held-out sets of (render, 2 variants): the checker passes each render (through the VAE) and no variant"
    with safe_open(str(sets), "pt") as fh:
        latents, prompts = fh.get_tensor("latents"), json.loads(fh.metadata()["prompts"])
    assert latents.shape == (6, 3, 4, 16, 16) and len(prompts) == 6
    assert not any((o.colour, o.shape) in HELDOUT_COMBINATIONS for p in prompts for o in parse_caption(p).objects)
    end = [line for line in out.splitlines() if line.startswith("held-out sets at the end")]

    assert _import_script("pretrain_lrm").main([
        "--config", recipe, "--sets", str(sets), "--init", str(tmp_path / "lrm.safetensors"), "--train-steps", "0",
        "--val-prompts", "2", "--out", str(tmp_path / "same.safetensors"), f"rg_lcd.lrm.arch={TINY_ARCH}"]) == 0
    again = [line for line in capsys.readouterr().out.splitlines() if line.startswith("held-out sets at the end")]
    assert len(end) == 1 and again == end, "--init with no steps measures the checkpoint on the same sets"
    assert torch.equal(load_file(tmp_path / "same.safetensors")["log_logit_scale"],
                       load_file(tmp_path / "lrm.safetensors")["log_logit_scale"])

    code = _import_script("pretrain_lrm").main([
        "--config", recipe, "--renders", "6", "--out", str(tmp_path / "no.safetensors"), f"model.source={tiny_sd}"])
    assert code == 2 and "--renders needs a toy recipe" in capsys.readouterr().err
    code = _import_script("pretrain_lrm").main([
        "--config", recipe, "--renders", "6", "--changes", "shape,spin", "--out", str(tmp_path / "no.safetensors")])
    assert code == 2 and "--changes 'shape,spin': name some of shape, colour" in capsys.readouterr().err


def test_resampled_sets_share_their_noise_and_bad_resample_counts_are_one_line(tiny_sd, tmp_path, capsys):
    """--resample K re-noises each set once to the K-th last grid timestep and samples it back over K DDIM
    steps: equal latents of a set stay equal, the same latents in another set (other noise) do not; K above
    the grid, or with --estimates, is refused before anything loads."""
    from trainers.config import load_config_for_cli
    from trainers.run import load_run_bundle

    script = _import_script("pretrain_lrm")
    cfg = load_config_for_cli(str(ROOT / "configs" / "toy" / "rg_lcd.yaml"), [f"model.source={tiny_sd}"])
    bundle = load_run_bundle(cfg, torch.device("cpu"))
    z = torch.randn(1, 1, 4, 8, 8, generator=torch.Generator().manual_seed(0)).expand(2, 2, -1, -1, -1).contiguous()
    out = script.resample(bundle, z, ["a red circle"] * 2, 3.0, 20, 3, 16, torch.Generator().manual_seed(1))
    assert out.shape == z.shape and torch.isfinite(out).all() and not torch.allclose(out, z)
    assert torch.equal(out[0, 0], out[0, 1]) and not torch.allclose(out[0, 0], out[1, 0])
    for flags in (["--resample", "21"], ["--resample", "2", "--estimates"]):
        code = script.main(["--config", str(ROOT / "configs" / "toy" / "rg_lcd.yaml"), "--renders", "2", *flags,
                            "--out", str(tmp_path / "no.safetensors")])
        assert code == 2 and "--resample must be in [0, num_ddim_timesteps = 20]" in capsys.readouterr().err


def test_one_step_estimates_share_timestep_and_noise_within_a_set(tiny_sd):
    """--estimates re-noises each set once (one t, one eps, shared by its K latents): two equal latents of a set
    get equal estimates, the same latents in another set (other t and eps) do not, and the estimate is the
    teacher's x0 prediction (finite, same shape)."""
    from trainers.config import load_config_for_cli
    from trainers.run import load_run_bundle

    cfg = load_config_for_cli(str(ROOT / "configs" / "toy" / "rg_lcd.yaml"), [f"model.source={tiny_sd}"])
    bundle = load_run_bundle(cfg, torch.device("cpu"))
    z = torch.randn(1, 1, 4, 8, 8, generator=torch.Generator().manual_seed(0)).expand(2, 2, -1, -1, -1)
    out = _import_script("pretrain_lrm").one_step_estimates(bundle, z.contiguous(), ["a red circle", "a red circle"],
                                                            3.0, 20, 16, torch.Generator().manual_seed(1))
    assert out.shape == z.shape and torch.isfinite(out).all()
    assert torch.equal(out[0, 0], out[0, 1]) and torch.equal(out[1, 0], out[1, 1])
    assert not torch.allclose(out[0, 0], out[1, 0])


def test_pass_fail_report_by_hand():
    """Set 1: checker passes sample 0 only; expert (3, 1, 2) ranks it above both others, LRM (1, 2, 0) above
    sample 2 only. Set 2: checker passes samples 1 and 2; expert (0, 5, 1) ranks both above sample 0, LRM
    (3, 2, 1) neither. Pairs with one pass and one fail: (0,1), (0,2) in each set = 4 (the pair (1,2) of set 2
    passes twice, of set 1 fails twice). Expert: 4 of 4 = 1.000; LRM: 1 of 4 = 0.250."""
    report = _import_script("pretrain_lrm").pass_fail_report(
        torch.tensor([[True, False, False], [False, True, True]]),
        torch.tensor([[3.0, 1.0, 2.0], [0.0, 5.0, 1.0]]), torch.tensor([[1.0, 2.0, 0.0], [3.0, 2.0, 1.0]]))
    assert report == "4 pass/fail pairs: the passing sample scores higher under the expert in 1.000, under the LRM in 0.250"
