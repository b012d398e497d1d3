"""Noise schedules: the one place that says what "the input at timestep t" is.

Every model of the zoo holds a ``NoiseSchedule``. It owns the meaning of ``t`` for that model and everything that
follows from it:

==============  ===========================================  =================================  ====================
schedule        ``t`` is                                     ``x_t``                            network time input
==============  ===========================================  =================================  ====================
``ddpm``        a step index in [0, T)                       sqrt(abar_t) x + sqrt(1-abar_t) e  t
``linear_sigma`` a step index in [0, T)                      x + sigma_max t / (T-1) e          t
``single``      a step index in [0, T) (one noise level)     x + sigma e, sigma fixed           t (its own t)
``vp_linear``   a step index in [0, T)                       gamma_t x + sqrt(1-gamma_t^2) e    t
``edm``         the noise level sigma > 0                    x + sigma e                        ln(sigma) / 4
==============  ===========================================  =================================  ====================

- ``ddpm``: DDPM's linear betas 1e-4..0.02 (Ho et al.; DiT; the DDAE UNets).
- ``linear_sigma``: l-DAE's final schedule (arXiv 2401.14404, Sec. 4.3, "remove input scaling"): gamma = 1 and sigma
  linear from 0 to sqrt(2).
- ``single``: l-DAE's single-level ablation, sigma = sqrt(1/3) for every sample; the network is conditioned on the
  step whose linear-sigma level is that sigma (t = 408 of 1000), and that t is the schedule's ``default_t``.
- ``vp_linear``: the variance-preserving schedule the l-DAE paper switches to in Tab. 1 ("replace noise schedule")
  and keeps in Tab. 3 rows 1-2: gamma_t^2 linear, from 1 - 1/T at t = 0 down to 0 at t = T - 1 (ours: the paper
  says only "1 > gamma^2 >= 0"), sigma_t^2 = 1 - gamma_t^2, the input scaled by gamma_t.
- ``edm``: Karras et al.'s parametrisation (sigma-indexed; the network sees c_in x_t and c_noise = ln(sigma) / 4).

``noise`` (or ``eps``) always means the Gaussian draw e; the switch that decides whether an encoder's input is
noised at all is called ``noisy_input`` elsewhere. A schedule validates t (``check_t``), samples it for training
(``sample_t``), adds noise (``add_noise``), gives the network's inputs (``network_input``) and the loss weight of a
clean-data target (``loss_weight``). Validation happens once, where a t enters from outside (``timesteps``); the
training loop samples valid t and does not check again, so it never waits on the device.
"""
import math
from typing import Any, Dict, Optional, Tuple, Union

import torch

__all__ = [
    'NoiseSchedule', 'DDPMSchedule', 'LinearSigmaSchedule', 'SingleLevelSchedule', 'VPLinearSchedule', 'EDMSchedule',
    'SCHEDULES', 'create_schedule', 'randn', 'TimestepLike',
]

TimestepLike = Union[int, float, torch.Tensor, None]
TARGETS = ('image', 'latent', 'noise')


def randn(shape: Tuple[int, ...], generator: Optional[torch.Generator] = None,
          device: Optional[Union[str, torch.device]] = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard normal noise drawn on the generator's device (so a seeded draw does not depend on where the result
    goes), then moved to ``device``."""
    gen_device = generator.device if generator is not None else (device or 'cpu')
    return torch.randn(shape, generator=generator, device=gen_device).to(device or gen_device, dtype)


def _expand(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, ..., 1) broadcastable against ``like``, in its dtype."""
    return v.to(like.dtype).reshape(-1, *([1] * (like.dim() - 1)))


class NoiseSchedule:
    """A forward noising process ``x_t = alpha(t) x_0 + sigma(t) eps`` and what a model needs of it.

    Subclasses set ``name`` and implement ``coefficients`` (and ``check_t`` / ``sample_t`` where t is not a step
    index). ``config()`` gives the constructor arguments, so a model records its schedule as plain data.
    """

    name = 'base'
    default_t: Optional[float] = None   # the t a model conditioned on this schedule should default to (None: the model's)

    def __init__(self, num_timesteps: int = 1000) -> None:
        if num_timesteps < 2:
            raise ValueError(f'num_timesteps must be >= 2, got {num_timesteps}')
        self.num_timesteps = num_timesteps

    # -- t -------------------------------------------------------------------------------------------
    def check_t(self, t: torch.Tensor) -> torch.Tensor:
        """Raise a ValueError naming the problem when a t is outside the schedule; returns ``t`` unchanged."""
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise ValueError(f'timestep t must be finite, got {t.flatten()[:4].tolist()}')
        bad = (t < 0) | (t >= self.num_timesteps)
        if bad.any():
            raise ValueError(f'timestep t must be in [0, {self.num_timesteps}) (a step index, not a fraction of 1; '
                             f'schedule {self.name!r}), got {t[bad].flatten()[:4].tolist()}')
        return t

    def check_value(self, t: float) -> float:
        """``check_t`` of one number, on the host (no tensor is made): a Python check of a user's t."""
        if not math.isfinite(t):
            raise ValueError(f'timestep t must be finite, got {[t]}')
        if not 0 <= t < self.num_timesteps:
            raise ValueError(f'timestep t must be in [0, {self.num_timesteps}) (a step index, not a fraction of 1; '
                             f'schedule {self.name!r}), got {[t]}')
        return t

    def timesteps(self, t: TimestepLike, batch_size: int, device: Union[str, torch.device]) -> torch.Tensor:
        """Normalise a user's t (a number, a 0-d, (1,) or (B,) tensor) to a checked float (B,) tensor on ``device``.

        Numbers are checked on the host, so a t given as a number never waits for the device.
        """
        if t is None:
            raise ValueError('timestep t is required (the model has no default t)')
        t = torch.as_tensor(t, dtype=torch.float32, device='cpu') if not isinstance(t, torch.Tensor) else t.float()
        if t.dim() == 0:
            t = t[None]
        if t.dim() != 1 or t.shape[0] not in (1, batch_size):
            raise ValueError(f'timestep t must be a number or a tensor of shape (1,) or ({batch_size},), '
                             f'got shape {tuple(t.shape)}')
        self.check_t(t)
        return t.to(device).expand(batch_size)

    def sample_t(self, n: int, generator: Optional[torch.Generator] = None,
                 device: Optional[Union[str, torch.device]] = None) -> torch.Tensor:
        """Training timesteps: uniform over the steps, float (n,)."""
        gen_device = generator.device if generator is not None else (device or 'cpu')
        t = torch.randint(0, self.num_timesteps, (n,), generator=generator, device=gen_device)
        return t.to(device or gen_device, torch.float32)

    # -- noise ---------------------------------------------------------------------------------------
    def coefficients(self, t: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(alpha(t), sigma(t)) as float (B,) tensors on t's device."""
        raise NotImplementedError

    def add_noise(self, x0: torch.Tensor, t: torch.Tensor, noise: Optional[torch.Tensor] = None,
                  generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """``x_t = alpha(t) x0 + sigma(t) noise`` for a checked (B,) t; returns (x_t, noise).

        ``noise`` (the eps draw, shaped like x0) is drawn from ``generator`` when not given.
        """
        if noise is None:
            noise = randn(tuple(x0.shape), generator, x0.device, x0.dtype)
        alpha, sigma = self.coefficients(t)
        return _expand(alpha, x0) * x0 + _expand(sigma, x0) * noise, noise

    def network_input(self, x_t: torch.Tensor, t: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """What the network is called with: (input, time input). The identity and the step index here."""
        return x_t, t

    def loss_weight(self, t: torch.Tensor, target: str) -> torch.Tensor:
        """Per-sample loss weight lambda_t: 1 for a noise target; the schedule's weight of a clean target."""
        if target not in TARGETS:
            raise ValueError(f'target must be one of {TARGETS}, got {target!r}')
        if target == 'noise':
            return torch.ones_like(t, dtype=torch.float32)
        return self.clean_weight(t)

    def clean_weight(self, t: torch.Tensor) -> torch.Tensor:
        """lambda_t for predicting clean data: gamma_t^2, as the l-DAE paper finds best (Sec. 4.3, Eq. 3)."""
        return self.coefficients(t)[0].square()

    # -- description ---------------------------------------------------------------------------------
    def config(self) -> Dict[str, Any]:
        return dict(num_timesteps=self.num_timesteps)

    def __repr__(self) -> str:
        args = ', '.join(f'{k}={v:g}' if isinstance(v, float) else f'{k}={v}' for k, v in self.config().items())
        return f'{type(self).__name__}({args})'

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.config() == self.config()


class DDPMSchedule(NoiseSchedule):
    """DDPM with linear betas (Ho et al. 2020; DiT's ``get_named_beta_schedule('linear', T)``).

    abar is kept in float64 on the host and copied once per device; a fractional t is rounded to its step.
    """

    name = 'ddpm'

    def __init__(self, num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> None:
        super().__init__(num_timesteps)
        self.beta_start, self.beta_end = beta_start, beta_end
        scale = 1000.0 / num_timesteps  # the 1000-step range rescaled to T steps, as DiT does
        betas = torch.linspace(scale * beta_start, scale * beta_end, num_timesteps, dtype=torch.float64, device='cpu')
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)  # (T,), float64
        self._tables: Dict[torch.device, Tuple[torch.Tensor, torch.Tensor]] = {}

    def _table(self, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
        if device not in self._tables:
            abar = self.alphas_cumprod
            self._tables[device] = (abar.sqrt().float().to(device), (1 - abar).sqrt().float().to(device))
        return self._tables[device]

    def coefficients(self, t: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        a, s = self._table(t.device)
        idx = t.round().long()
        return a[idx], s[idx]

    def config(self) -> Dict[str, Any]:
        return dict(num_timesteps=self.num_timesteps, beta_start=self.beta_start, beta_end=self.beta_end)

    def __getstate__(self) -> Dict[str, Any]:  # deepcopy / pickle: the device tables are a cache
        return {**self.__dict__, '_tables': {}}


class LinearSigmaSchedule(NoiseSchedule):
    """l-DAE's final schedule: no input scaling, sigma_t = sigma_max * t / (T - 1), lambda_t = 1 / (1 + sigma_t^2)."""

    name = 'linear_sigma'

    def __init__(self, num_timesteps: int = 1000, sigma_max: float = math.sqrt(2.0)) -> None:
        super().__init__(num_timesteps)
        if not sigma_max > 0:
            raise ValueError(f'sigma_max must be > 0, got {sigma_max}')
        self.sigma_max = float(sigma_max)

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        return self.sigma_max * t.float() / (self.num_timesteps - 1)

    def coefficients(self, t: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        sigma = self.sigma(t)
        return torch.ones_like(sigma), sigma

    def clean_weight(self, t: torch.Tensor) -> torch.Tensor:
        return 1.0 / (1.0 + self.coefficients(t)[1].square())

    def config(self) -> Dict[str, Any]:
        return dict(num_timesteps=self.num_timesteps, sigma_max=self.sigma_max)


class SingleLevelSchedule(LinearSigmaSchedule):
    """l-DAE's single-level ablation: every sample at sigma = ``sigma`` (sqrt(1/3)); the network is conditioned on
    the step of the linear-sigma schedule with that level, which is also the t an encoder defaults to."""

    name = 'single'

    def __init__(self, num_timesteps: int = 1000, sigma: float = math.sqrt(1.0 / 3.0),
                 sigma_max: float = math.sqrt(2.0)) -> None:
        super().__init__(num_timesteps, sigma_max)
        if not 0 < sigma <= sigma_max:
            raise ValueError(f'sigma must be in (0, sigma_max={sigma_max:g}], got {sigma}')
        self.single_sigma = float(sigma)
        self.default_t = float(round(sigma / sigma_max * (num_timesteps - 1)))

    def sample_t(self, n: int, generator: Optional[torch.Generator] = None,
                 device: Optional[Union[str, torch.device]] = None) -> torch.Tensor:
        return torch.full((n,), self.default_t, device=device or 'cpu')

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        return torch.full(t.shape, self.single_sigma, device=t.device)

    def config(self) -> Dict[str, Any]:
        return dict(num_timesteps=self.num_timesteps, sigma=self.single_sigma, sigma_max=self.sigma_max)


class VPLinearSchedule(NoiseSchedule):
    """Variance preserving, input-scaled: gamma_t^2 = 1 - (t + 1) / T (linear), x_t = gamma_t x + sqrt(1 - gamma_t^2) e.

    The schedule of the l-DAE paper's Tab. 1 last row and Tab. 3 rows 1-2; lambda_t = gamma_t^2 for clean targets.
    """

    name = 'vp_linear'

    def coefficients(self, t: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        gamma2 = (1.0 - (t.float() + 1.0) / self.num_timesteps).clamp(0.0, 1.0)
        return gamma2.sqrt(), (1.0 - gamma2).sqrt()


class EDMSchedule(NoiseSchedule):
    """EDM (Karras et al. 2022): t is sigma; the network sees c_in x_t with c_in = 1 / sqrt(sigma^2 + sigma_data^2)
    and the time input c_noise = ln(sigma) / 4; training sigmas are log-normal (P_mean, P_std)."""

    name = 'edm'

    def __init__(self, sigma_data: float = 0.5, p_mean: float = -1.2, p_std: float = 1.2) -> None:
        self.num_timesteps = 0  # continuous
        self.sigma_data, self.p_mean, self.p_std = float(sigma_data), float(p_mean), float(p_std)

    def check_t(self, t: torch.Tensor) -> torch.Tensor:
        if not torch.isfinite(t).all() or (t <= 0).any():
            raise ValueError(f'with the "edm" schedule t is the noise level sigma and must be finite and > 0, got '
                             f'{t.flatten()[:4].tolist()}')
        return t

    def check_value(self, t: float) -> float:
        if not (math.isfinite(t) and t > 0):
            raise ValueError(f'with the "edm" schedule t is the noise level sigma and must be finite and > 0, got '
                             f'{[t]}')
        return t

    def sample_t(self, n: int, generator: Optional[torch.Generator] = None,
                 device: Optional[Union[str, torch.device]] = None) -> torch.Tensor:
        return (randn((n,), generator, device) * self.p_std + self.p_mean).exp()

    def coefficients(self, t: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return torch.ones_like(t, dtype=torch.float32), t.float()

    def network_input(self, x_t: torch.Tensor, t: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        c_in = 1.0 / torch.sqrt(t.float() ** 2 + self.sigma_data ** 2)
        return x_t * _expand(c_in, x_t), torch.log(t.float()) / 4

    def clean_weight(self, t: torch.Tensor) -> torch.Tensor:
        sd = self.sigma_data
        return (t.float() ** 2 + sd ** 2) / (t.float() * sd) ** 2

    def config(self) -> Dict[str, Any]:
        return dict(sigma_data=self.sigma_data, p_mean=self.p_mean, p_std=self.p_std)


SCHEDULES = {cls.name: cls for cls in (DDPMSchedule, LinearSigmaSchedule, SingleLevelSchedule, VPLinearSchedule,
                                       EDMSchedule)}


def create_schedule(schedule: Union[str, NoiseSchedule], **kwargs: Any) -> NoiseSchedule:
    """A schedule by name (``'ddpm'``, ``'linear_sigma'``, ``'single'``, ``'vp_linear'``, ``'edm'``) and its arguments,
    or an instance as it is."""
    if isinstance(schedule, NoiseSchedule):
        if kwargs:
            raise TypeError('schedule arguments go with a schedule name, not an instance')
        return schedule
    if schedule not in SCHEDULES:
        raise ValueError(f'unknown noise schedule {schedule!r}; known: {", ".join(SCHEDULES)}')
    try:
        return SCHEDULES[schedule](**kwargs)
    except TypeError as e:
        raise TypeError(f'bad arguments for the {schedule!r} schedule: {e}') from None
