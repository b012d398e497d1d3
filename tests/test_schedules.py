"""Noise schedules against their formulas: coefficients, t validation and sampling, network inputs, loss weights."""
import math

import pytest
import torch

from ldae_models.layers.schedules import (
    SCHEDULES, DDPMSchedule, EDMSchedule, LinearSigmaSchedule, SingleLevelSchedule, VPLinearSchedule, create_schedule,
)


def test_ddpm_matches_ho_et_al():
    s = DDPMSchedule()
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    t = torch.tensor([0.0, 11.0, 121.0, 999.0])
    alpha, sigma = s.coefficients(t)
    abar = torch.stack([torch.prod(1 - betas[:int(k) + 1]) for k in t])
    assert torch.allclose(alpha.double(), abar.sqrt(), atol=1e-7) and torch.allclose(sigma.double(), (1 - abar).sqrt(),
                                                                                      atol=1e-7)
    assert torch.equal(s.coefficients(torch.tensor([10.6]))[0], s.coefficients(torch.tensor([11.0]))[0])  # rounds
    assert torch.allclose(s.loss_weight(t, 'image'), alpha.square()) and torch.equal(s.loss_weight(t, 'noise'),
                                                                                      torch.ones(4))


def test_linear_sigma_is_the_papers_final_schedule():
    s = LinearSigmaSchedule()
    t = torch.tensor([0.0, 500.0, 999.0])
    alpha, sigma = s.coefficients(t)
    assert torch.equal(alpha, torch.ones(3))
    assert torch.allclose(sigma, math.sqrt(2) * t / 999)
    assert torch.allclose(s.loss_weight(t, 'image'), 1 / (1 + sigma ** 2))
    x, eps = torch.randn(3, 4), torch.randn(3, 4)
    xt, back = s.add_noise(x, t, noise=eps)
    assert back is eps and torch.allclose(xt, x + sigma[:, None] * eps)


def test_single_level_conditions_on_its_own_t():
    s = SingleLevelSchedule()
    assert s.default_t == 408 and torch.equal(s.sample_t(5), torch.full((5,), 408.0))
    assert torch.allclose(s.coefficients(torch.tensor([0.0, 999.0]))[1], torch.full((2,), math.sqrt(1 / 3)))
    with pytest.raises(ValueError, match='sigma must be in'):
        SingleLevelSchedule(sigma=3.0)


def test_vp_linear_gamma_squared_is_linear_and_variance_preserving():
    s = VPLinearSchedule()
    t = torch.arange(0, 1000, 37).float()
    alpha, sigma = s.coefficients(t)
    assert torch.allclose(alpha ** 2, 1 - (t + 1) / 1000, atol=1e-6)
    assert torch.allclose(alpha ** 2 + sigma ** 2, torch.ones_like(t), atol=1e-6)
    assert 0 < alpha[0] ** 2 < 1 and s.coefficients(torch.tensor([999.0]))[0].item() == 0  # 1 > gamma^2 >= 0
    assert torch.allclose(s.loss_weight(t, 'latent'), alpha ** 2)  # lambda_t = gamma_t^2 (Sec. 4.3)


def test_edm_t_is_sigma():
    s = EDMSchedule()
    sig = torch.tensor([0.06, 1.0])
    x = torch.randn(2, 3, 4, 4)
    xt, eps = s.add_noise(x, sig, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(xt, x + sig.view(-1, 1, 1, 1) * eps)
    x_in, t_in = s.network_input(xt, sig)
    assert torch.allclose(x_in, xt / torch.sqrt(sig ** 2 + 0.25).view(-1, 1, 1, 1)) and torch.allclose(t_in,
                                                                                                      sig.log() / 4)
    draws = s.sample_t(20000, generator=torch.Generator().manual_seed(0))
    assert (draws > 0).all() and abs(draws.log().mean() + 1.2) < 0.05 and abs(draws.log().std() - 1.2) < 0.05
    for bad in (0.0, -1.0, float('nan')):
        with pytest.raises(ValueError, match='noise level sigma'):
            s.timesteps(bad, 1, 'cpu')


@pytest.mark.parametrize('name', ['ddpm', 'linear_sigma', 'single', 'vp_linear'])
def test_step_schedules_check_and_sample(name):
    s = create_schedule(name)
    assert s == create_schedule(name) and s.config() == type(s)(**s.config()).config()
    t = s.timesteps(10, 4, 'cpu')
    assert t.shape == (4,) and t.dtype == torch.float32
    for bad in (1000, -1, float('nan'), 5000.0):
        with pytest.raises(ValueError, match='timestep t'):
            s.timesteps(bad, 1, 'cpu')
    with pytest.raises(ValueError, match=r'shape \(1,\) or \(3,\)'):
        s.timesteps(torch.zeros(2), 3, 'cpu')
    draws = s.sample_t(4000, generator=torch.Generator().manual_seed(0))
    assert draws.min() >= 0 and draws.max() < 1000 and draws.dtype == torch.float32
    a = s.sample_t(8, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, s.sample_t(8, generator=torch.Generator().manual_seed(1)))  # seeded


def test_create_schedule_errors():
    with pytest.raises(ValueError, match='unknown noise schedule'):
        create_schedule('cosine')
    with pytest.raises(TypeError, match="bad arguments for the 'ddpm' schedule"):
        create_schedule('ddpm', sigma_max=2)
    assert set(SCHEDULES) == {'ddpm', 'linear_sigma', 'single', 'vp_linear', 'edm'}
