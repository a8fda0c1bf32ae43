"""Schedules, sampling grids and parameterization conversions (float64)."""
import math

import pytest
import torch
from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler,
                       FlowMatchEulerDiscreteScheduler, LCMScheduler, PNDMScheduler)

from pipelines.schedules import (FlowSchedule, VPSchedule, append_dims, flow_to_trigflow_input,
                                 flow_to_trigflow_time, flow_velocity_to_trigflow, from_x0_eps,
                                 schedule_from_scheduler, to_x0_eps, trigflow_angle, trigflow_consistency,
                                 trigflow_to_flow_input, trigflow_to_flow_time, trigflow_to_flow_velocity,
                                 x0_eps_to_trigflow)

SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1)
PREDICTION_TYPES = ["epsilon", "v_prediction", "sample", "flow"]
f64 = torch.float64


def _close(a, b, tol=1e-12):
    assert torch.allclose(a, b, rtol=0, atol=tol), (a - b).abs().max().item()


# ---------------------------------------------------------------------------------------------- VP


@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
@pytest.mark.parametrize("zero_snr", [False, True])
def test_vp_alphas_cumprod_equals_diffusers(beta_schedule, zero_snr):
    """abar is built in float32 like diffusers (what the teacher trained on), so it must match bit for bit."""
    ref = DDIMScheduler(beta_schedule=beta_schedule, beta_start=0.00085, beta_end=0.012,
                        rescale_betas_zero_snr=zero_snr)
    schedule = VPSchedule.from_scheduler_config(ref.config)
    assert schedule.alphas_cumprod.dtype == f64
    assert torch.equal(schedule.alphas_cumprod, ref.alphas_cumprod.to(f64))
    assert (schedule.max_angle == math.pi / 2) == zero_snr


def test_vp_unit_norm_and_exact_at_integers():
    """alpha^2 + sigma^2 = abar + (1 - abar) = 1 at any t; at integer t, w = 0 so abar = abar[t] exactly."""
    schedule = VPSchedule.from_scheduler_config(SD)
    t = torch.cat([torch.rand(64, generator=torch.Generator().manual_seed(0), dtype=f64) * 999,
                   torch.tensor([0.0, 998.0, 999.0], dtype=f64)])
    alpha, sigma = schedule.alpha_sigma(t)
    _close(alpha**2 + sigma**2, torch.ones_like(t), 1e-14)
    ints = torch.arange(1000, dtype=f64)
    alpha, sigma = schedule.alpha_sigma(ints)
    assert torch.equal(alpha, schedule.alphas_cumprod.sqrt())
    assert torch.equal(sigma, (1 - schedule.alphas_cumprod).sqrt())


def test_vp_interpolation_and_inverse_hand_values():
    """abar = [0.9, 0.5, 0.1] (T = 3), linear in abar between integers:
    t = 0.5  -> 0.5*0.9 + 0.5*0.5 = 0.7;   t = 1.75 -> 0.25*0.5 + 0.75*0.1 = 0.2.
    Inverse: abar = cos^2 s, so s = acos(sqrt(0.7)) -> t = 0.5 and s = acos(sqrt(0.2)) -> t = 1.75.
    max_angle = acos(sqrt(0.1)), min_angle = acos(sqrt(0.9)); outside that range is an error."""
    schedule = VPSchedule(torch.tensor([0.9, 0.5, 0.1], dtype=f64))
    alpha, sigma = schedule.alpha_sigma(torch.tensor([0.5, 1.75], dtype=f64))
    _close(alpha, torch.tensor([0.7, 0.2], dtype=f64).sqrt())
    _close(sigma, torch.tensor([0.3, 0.8], dtype=f64).sqrt())
    angles = torch.tensor([math.acos(0.7**0.5), math.acos(0.2**0.5)], dtype=f64)
    _close(schedule.t_from_angle(angles), torch.tensor([0.5, 1.75], dtype=f64))
    assert schedule.max_angle == pytest.approx(math.acos(0.1**0.5))
    with pytest.raises(ValueError, match="angle out of"):
        schedule.t_from_angle(torch.tensor([1.5], dtype=f64))
    with pytest.raises(ValueError, match="out of range"):
        schedule.alpha_sigma(torch.tensor([2.5], dtype=f64))


def test_vp_t_from_angle_round_trip():
    """t -> s = atan(sigma/alpha) -> t is the identity over the whole grid, ends included."""
    schedule = VPSchedule.from_scheduler_config(SD)
    t = torch.cat([torch.rand(200, generator=torch.Generator().manual_seed(1), dtype=f64) * 999,
                   torch.tensor([0.0, 1.0, 500.0, 999.0], dtype=f64)])
    _close(schedule.t_from_angle(trigflow_angle(*schedule.alpha_sigma(t))), t, 1e-9)


@pytest.mark.parametrize("spacing", ["trailing", "leading", "linspace"])
def test_vp_timesteps_equal_ddim(spacing):
    schedule = VPSchedule.from_scheduler_config(SD)
    for n in [1, 3, 4, 7, 10, 50, 1000]:
        ref = DDIMScheduler(**SD, timestep_spacing=spacing)
        ref.set_timesteps(n)
        assert torch.equal(schedule.timesteps(n, spacing), ref.timesteps.to(f64)), (spacing, n)


def test_vp_timesteps_hand_values():
    """trailing n=4: round(arange(1000, 0, -250)) - 1 = [999, 749, 499, 249];
    leading n=4, offset 1: arange(4)*250 reversed + 1 = [751, 501, 251, 1]."""
    schedule = VPSchedule.from_scheduler_config(SD)
    assert schedule.timesteps(4).tolist() == [999, 749, 499, 249]
    assert schedule.timesteps(4, "leading").tolist() == [751, 501, 251, 1]
    with pytest.raises(ValueError, match="spacing"):
        schedule.timesteps(4, "karras")


# ---------------------------------------------------------------------------------------------- flow


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_grid_equals_flowmatch_euler(shift):
    """diffusers holds its sigmas in float32; ours are float64, so agreement is to float32 rounding."""
    schedule = schedule_from_scheduler(FlowMatchEulerDiscreteScheduler(shift=shift))
    assert isinstance(schedule, FlowSchedule) and schedule.shift == shift
    for n in [1, 2, 4, 7, 28]:
        ref = FlowMatchEulerDiscreteScheduler(shift=shift)
        ref.set_timesteps(n)
        ours = schedule.timesteps(n)
        assert torch.allclose(ours, ref.sigmas[:-1].to(f64) * 1000, rtol=1e-6, atol=0), (shift, n)


def test_flow_grid_hand_values():
    """shift 1, n = 2: s_min = 1/1000, grid = linspace(1, 0.001, 2) * 1000 = [1000, 1].
    shift 3, n = 2: s_min = 3(0.001)/(1 + 2(0.001)) = 0.003/1.002, shifted again:
    3 s_min / (1 + 2 s_min) = 0.009/1.008 (multiply through by 1.002), so t = 9/1.008 = 8.928571..."""
    _close(FlowSchedule(shift=1.0).timesteps(2), torch.tensor([1000.0, 1.0], dtype=f64), 1e-9)
    _close(FlowSchedule(shift=3.0).timesteps(2), torch.tensor([1000.0, 9 / 1.008], dtype=f64), 1e-9)


def test_flow_alpha_sigma_and_errors():
    """t = 250 -> s = 0.25 -> (alpha, sigma) = (0.75, 0.25); angle pi/4 -> s = 1/2 -> t = 500."""
    schedule = FlowSchedule()
    alpha, sigma = schedule.alpha_sigma(torch.tensor([250.0], dtype=f64))
    assert (alpha.item(), sigma.item()) == (0.75, 0.25)
    _close(schedule.t_from_angle(torch.tensor([math.pi / 4], dtype=f64)), torch.tensor([500.0], dtype=f64))
    dynamic = FlowSchedule.from_scheduler_config(FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True).config)
    with pytest.raises(ValueError, match="use_dynamic_shifting"):
        dynamic.timesteps(4)
    with pytest.raises(ValueError, match="one grid"):
        schedule.timesteps(4, "leading")


def test_schedule_from_scheduler_picks_family():
    for cls in [DDPMScheduler, DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler,
                LCMScheduler, PNDMScheduler]:
        assert isinstance(schedule_from_scheduler(cls(**SD)), VPSchedule), cls.__name__
    sana_like = DPMSolverMultistepScheduler(use_flow_sigmas=True, flow_shift=4.5, prediction_type="flow_prediction")
    flow = schedule_from_scheduler(sana_like)
    assert isinstance(flow, FlowSchedule) and flow.shift == 4.5
    assert isinstance(schedule_from_scheduler({"_class_name": "DDIMScheduler", **SD}), VPSchedule)
    assert isinstance(schedule_from_scheduler(FlowMatchEulerDiscreteScheduler().config), FlowSchedule)
    with pytest.raises(ValueError, match="unknown scheduler class"):
        schedule_from_scheduler({"_class_name": "SCMScheduler"})


# ---------------------------------------------------------------------------------------------- conversions


def test_conversion_hand_values():
    """alpha = 0.6, sigma = 0.8, x_0 = 1, eps = 2: x_t = 0.6 + 1.6 = 2.2, v = 0.6*2 - 0.8*1 = 0.4, u = 2 - 1 = 1.
    Flow schedule s = 0.25 (alpha 0.75, sigma 0.25): v = 0.75*2 - 0.25*1 = 1.25 and back,
    x_0 = (0.75*x_t - 0.25 v)/(0.75^2 + 0.25^2) with x_t = 0.75 + 0.5 = 1.25: (0.9375 - 0.3125)/0.625 = 1."""
    x0, eps = torch.tensor([1.0], dtype=f64), torch.tensor([2.0], dtype=f64)
    a, s = torch.tensor([0.6], dtype=f64), torch.tensor([0.8], dtype=f64)
    expected = {"epsilon": 2.0, "v_prediction": 0.4, "sample": 1.0, "flow": 1.0}
    for pt, value in expected.items():
        assert from_x0_eps(x0, eps, a, s, pt).item() == pytest.approx(value, abs=1e-15)
        x0_back, eps_back = to_x0_eps(torch.tensor([value], dtype=f64), torch.tensor([2.2], dtype=f64), a, s, pt)
        assert (x0_back.item(), eps_back.item()) == (pytest.approx(1.0), pytest.approx(2.0))
    a, s = torch.tensor([0.75], dtype=f64), torch.tensor([0.25], dtype=f64)
    assert from_x0_eps(x0, eps, a, s, "v_prediction").item() == 1.25
    x0_back, _ = to_x0_eps(torch.tensor([1.25], dtype=f64), torch.tensor([1.25], dtype=f64), a, s, "v_prediction")
    assert x0_back.item() == pytest.approx(1.0, abs=1e-15)
    with pytest.raises(ValueError, match="prediction_type"):
        to_x0_eps(x0, x0, a, s, "x0")


@pytest.mark.parametrize("schedule", [VPSchedule.from_scheduler_config(SD), FlowSchedule(shift=3.0)],
                         ids=["vp", "flow"])
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_conversions_round_trip(schedule, prediction_type):
    """x_t = alpha x_0 + sigma eps; out = from(x_0, eps); to(out) = (x_0, eps); from(to(out)) = out."""
    g = torch.Generator().manual_seed(2)
    x0, eps = torch.randn(4, 3, 5, 5, generator=g, dtype=f64), torch.randn(4, 3, 5, 5, generator=g, dtype=f64)
    t = torch.tensor([1.0, 250.5, 600.0, 999.0], dtype=f64)
    alpha, sigma = (append_dims(v, 4) for v in schedule.alpha_sigma(t))
    x_t = alpha * x0 + sigma * eps
    out = from_x0_eps(x0, eps, alpha, sigma, prediction_type)
    x0_back, eps_back = to_x0_eps(out, x_t, alpha, sigma, prediction_type)
    _close(x0_back, x0)
    _close(eps_back, eps)
    _close(from_x0_eps(x0_back, eps_back, alpha, sigma, prediction_type), out)


def test_append_dims():
    assert append_dims(torch.zeros(3), 4).shape == (3, 1, 1, 1)
    with pytest.raises(ValueError, match="more than"):
        append_dims(torch.zeros(2, 2), 1)


# ---------------------------------------------------------------------------------------------- TrigFlow


def test_trigflow_on_vp_is_v_prediction():
    """alpha = cos s, sigma = sin s on VP, so x_t = cos s x_0 + sin s eps and v = cos s eps - sin s x_0;
    cos s x_t - sin s v = (cos^2 s + sin^2 s) x_0 + (cos s sin s - sin s cos s) eps = x_0.
    Hand value: alpha = 0.6, sigma = 0.8 -> s = atan(4/3)."""
    assert trigflow_angle(torch.tensor(0.6, dtype=f64), torch.tensor(0.8, dtype=f64)).item() == \
        pytest.approx(math.atan(4 / 3), abs=1e-15)
    schedule = VPSchedule.from_scheduler_config(SD)
    g = torch.Generator().manual_seed(3)
    x0, eps = torch.randn(4, 3, 4, 4, generator=g, dtype=f64), torch.randn(4, 3, 4, 4, generator=g, dtype=f64)
    alpha, sigma = (append_dims(v, 4) for v in schedule.alpha_sigma(torch.tensor([0.0, 10.5, 500.0, 999.0], dtype=f64)))
    x_t, angle = alpha * x0 + sigma * eps, trigflow_angle(alpha, sigma)
    v = from_x0_eps(x0, eps, alpha, sigma, "v_prediction")
    _close(x0_eps_to_trigflow(x0, eps, angle), v)
    _close(trigflow_consistency(x_t, v, angle), x0)


@pytest.mark.parametrize("sigma_d", [1.0, 0.5])
def test_flow_to_trigflow_reproduces_x0(sigma_d):
    """TrigFlow state x_t = cos s x_0 + sin s sigma_d eps. With s_f = sin s/(sin s + cos s), the flow model
    sees x_flow = (x_t/sigma_d)/(sin s + cos s) = (1 - s_f) y_0 + s_f eps with y_0 = x_0/sigma_d, and its exact
    velocity is u = eps - y_0. Then F = ((1-2s_f) x_flow + (1-2s_f+2s_f^2) u)/N, N = sqrt(s_f^2+(1-s_f)^2),
    equals cos s eps - sin s y_0 (expand with cos s = (1-s_f)/N, sin s = s_f/N), so
    cos s x_t - sin s sigma_d F = x_0. Hand value: s = pi/4 gives s_f = 1/2, F = u/sqrt(2)."""
    g = torch.Generator().manual_seed(4)
    x0, eps = torch.randn(5, 3, 4, 4, generator=g, dtype=f64), torch.randn(5, 3, 4, 4, generator=g, dtype=f64)
    angle = append_dims(torch.tensor([0.01, 0.4, math.pi / 4, 1.2, math.pi / 2 - 1e-3], dtype=f64), 4)
    x_t = angle.cos() * x0 + angle.sin() * sigma_d * eps
    s_f = trigflow_to_flow_time(angle)
    x_flow = trigflow_to_flow_input(x_t, angle, sigma_d)
    y0 = x0 / sigma_d
    _close(x_flow, (1 - s_f) * y0 + s_f * eps)
    u = eps - y0
    F = flow_velocity_to_trigflow(u, x_flow, s_f)
    _close(F, x0_eps_to_trigflow(x0, eps, angle, sigma_d))
    _close(trigflow_consistency(x_t, F, angle, sigma_d), x0)
    _close(F[2], u[2] / math.sqrt(2))
    # the inverse maps
    _close(trigflow_to_flow_velocity(F, x_flow, s_f), u)
    _close(flow_to_trigflow_input(x_flow, s_f, sigma_d), x_t)
    _close(flow_to_trigflow_time(s_f), angle)
