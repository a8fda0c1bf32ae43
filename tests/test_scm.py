"""sCM on real images (the TBCM baseline): the angle proposal and noised states by hand and against
diffusers' own noising, the state-to-teacher mapping at initialisation, and one training step."""
import math

import pytest
import torch

from consistency_step import assert_step_trains_student_and_logvar_only
from trainers.scm import noised_state, proposal_angles


def test_proposal_angles_hand_values():
    """tau = 0, sigma_d = 1: atan(e^0 / 1) = atan(1) = pi/4.
    tau = 1.8 (p_mean 0.2 + p_std 1.6 x 1), sigma_d = 0.5: e^1.8 / 0.5 = 6.049647 x 2 = 12.099295,
    atan(12.099295) = pi/2 - atan(x), x = 1 / 12.099295 = 0.0826494, atan(x) = x - x^3/3 + x^5/5 - ...
    = 0.0826494 - 0.0001882 + 0.0000008 = 0.0824620, so s = 1.5707963 - 0.0824620 = 1.4883343."""
    s = proposal_angles(torch.tensor([0.0]), 1.0)
    assert s.item() == pytest.approx(math.pi / 4, abs=1e-7)
    s = proposal_angles(torch.tensor([1.8]), 0.5)
    assert s.item() == pytest.approx(1.4883343, abs=1e-6)


def test_noised_state_hand_values():
    """s = pi/3 (cos 1/2, sin sqrt(3)/2), sigma_d = 0.5: x_0 = 1, z = 0 -> 0.5 x 0.5 = 0.25;
    x_0 = 0, z = 1 -> 0.5 x 0.866025 = 0.433013."""
    s = torch.tensor([math.pi / 3, math.pi / 3])
    x = noised_state(torch.tensor([[1.0], [0.0]]), torch.tensor([[0.0], [1.0]]), s, 0.5)
    assert x[:, 0].tolist() == pytest.approx([0.25, 0.433013], abs=1e-6)


def test_states_match_diffusers_noising():
    """VP (sigma_d 1): at s = atan(sigma_t / alpha_t) the state is DDPMScheduler.add_noise(x_0, z, t).
    Flow (sigma_d 0.5): the state over sigma_d (sin s + cos s) is the flow-matching state
    (1 - sigma) x_0 + sigma z (FlowMatchEuler's scale_noise) at sigma = sin s / (sin s + cos s)."""
    from diffusers import DDPMScheduler

    g = torch.Generator().manual_seed(0)
    x_0, z = torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g)
    ddpm = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    t = torch.tensor([10, 500, 990])
    a_bar = ddpm.alphas_cumprod[t].double()
    s = torch.atan2((1 - a_bar).sqrt(), a_bar.sqrt()).float()
    assert torch.allclose(noised_state(x_0, z, s, 1.0), ddpm.add_noise(x_0, z, t), atol=1e-5)

    s = torch.tensor([0.2, 0.8, 1.4])
    sigma = s.sin() / (s.sin() + s.cos())
    sigma = sigma.reshape(-1, 1, 1, 1)
    theirs = (1 - sigma) * x_0 + sigma * z
    ours = noised_state(x_0, z, s, 0.5) / (0.5 * (s.sin() + s.cos())).reshape(-1, 1, 1, 1)
    assert torch.allclose(ours, theirs, atol=1e-6)


def make_method(tmp_path, family: str, resolution: int, **scm):
    from pipelines.tiny import save_tiny_pipeline
    from trainers.config import load_config
    from trainers.run import load_run_bundle
    from trainers.scm import SCM

    source = save_tiny_pipeline(family, tmp_path / family)
    options = ", ".join(f"{k}: {v}" for k, v in {"tangent_warmup_steps": 2, **scm}.items())
    recipe = tmp_path / "scm.yaml"
    recipe.write_text(f"method: scm\noutput_dir: {tmp_path / 'run'}\nmodel: {{source: {source}, attention: math}}\n"
                      f"data: {{kind: toy, resolution: {resolution}}}\nscm: {{{options}}}\n")
    cfg = load_config(recipe)
    method = SCM(cfg, load_run_bundle(cfg, torch.device("cpu")))
    method.bind(method.trainable(), {})
    return method


def batch(n: int, resolution: int) -> dict:
    pixels = torch.rand(n, 3, resolution, resolution, generator=torch.Generator().manual_seed(3)) * 2 - 1
    return {"prompt": ["a cat", "a dog", "a fox"][:n], "pixel_values": pixels}


@pytest.mark.parametrize("family, resolution", [("sd", 16), ("sana", 32)])
def test_student_equal_to_teacher_has_zero_loss_at_r_zero(family, resolution, tmp_path):
    """At step 0 (r = 0) with the unguided teacher (guidance 1) and the student still equal to it, the
    tangent is -cos^2 s (sigma_d F^- - dx/ds) = -cos^2 s (sigma_d F_teacher - sigma_d F_teacher) = 0 and
    the log-variance head is zero, so every state's loss is exactly 0: the states, the teacher's dx/ds and
    the student's F read the same point of the same parameterization."""
    method = make_method(tmp_path, family, resolution, teacher_guidance="[1.0]")
    out = method.loss(batch(2, resolution), 0, ["student", "logvar"], torch.Generator().manual_seed(0))
    assert out.logs["r"].item() == 0.0
    assert out.logs["tangent_norm"].item() < 1e-5
    assert out.loss.shape == (2,) and out.loss.abs().max().item() < 1e-8


def test_step_trains_student_and_logvar_only(tmp_path):
    method = make_method(tmp_path, "sd", 16, teacher_guidance="[2.0, 3.0]")
    assert_step_trains_student_and_logvar_only(method, batch(3, 16), states=3)


def test_tbcm_only_options_are_rejected(tmp_path):
    from trainers.config import ConfigError, load_config

    recipe = tmp_path / "bad.yaml"
    recipe.write_text("method: scm\noutput_dir: out\ndata: {kind: toy}\nscm: {route_steps: 4}\n")
    with pytest.raises(ConfigError, match="route_steps"):
        load_config(recipe)
