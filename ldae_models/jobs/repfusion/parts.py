"""RepFusion's parts (Yang and Wang, arXiv 2308.10916), each a seam with a table: the timestep policies, the networks
a learned policy uses, its task head and reward baseline, and the distillation losses. ``run.py`` runs them.

- ``POLICIES``: one class per way of choosing t for an image, over a grid of step indices of the teacher's schedule:
  ``fixed`` (one t), ``random`` (uniform over the grid), ``reinforce`` (a network's softmax over the grid, sampled by
  inverting its CDF at the step's uniform draw and trained by REINFORCE).
- ``POLICY_NETS``: ``lenet``, the official ``PolicyNet_Cov`` (conv 5x5 x6, max-pool, conv 5x5 x16, max-pool,
  fc 120, fc 84, fc bins; PyTorch's default initialisation); ``cnn`` (ours): three stride-2 3x3 convolutions, global
  average pooling and a zero-initialised last layer, so that the policy starts uniform and takes any image size.
- ``TASK_HEADS``: the head whose cross-entropy on the teacher's feature gives the reward: ``official`` (Linear d -> d,
  ReLU, Linear d -> d, ReLU, Linear d -> classes) or ``small`` (ours: Linear d -> 256, ReLU, Linear 256 -> classes).
- ``KD_LOSSES``: the distillation losses of the official code (``distill_fn``): ``mse`` (its ``l2``, the paper's),
  ``mse_norm`` (MSE of L2-normalised features), ``l1``, ``cosine`` (1 - cosine similarity).
"""
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ['POLICIES', 'POLICY_NETS', 'TASK_HEADS', 'KD_LOSSES', 'FixedPolicy', 'UniformPolicy', 'LearnedPolicy',
           'PolicyCNN', 'PolicyLeNet', 'sample', 'reinforce_loss', 'MovingBaseline', 'pool']


def sample(logits: torch.Tensor, u: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(index, its log-probability, the entropy) per row, the index drawn by inverting the CDF at ``u`` in [0, 1) (the
    step's draws: the same choice on resume and on any number of processes)."""
    logp = F.log_softmax(logits.float(), dim=-1)
    p = logp.exp()
    idx = (p.cumsum(-1) <= u[:, None]).sum(-1).clamp(max=logits.shape[-1] - 1)
    return idx, logp.gather(1, idx[:, None])[:, 0], -(p * logp).sum(-1)


def reinforce_loss(logp: torch.Tensor, entropy: torch.Tensor, reward: torch.Tensor, baseline: torch.Tensor,
                   entropy_weight: float) -> torch.Tensor:
    """REINFORCE with a baseline and an entropy bonus: ``-mean((r - b) log p) - beta mean(H)``."""
    return -((reward.detach() - baseline) * logp).mean() - entropy_weight * entropy.mean()


class MovingBaseline(nn.Module):
    """REINFORCE's reward baseline (ours; the official code has none): a moving average of the mean reward (a buffer,
    so checkpoints carry it)."""

    def __init__(self, momentum: float) -> None:
        super().__init__()
        self.momentum = momentum
        self.register_buffer('value', torch.zeros(()))

    @torch.no_grad()
    def update(self, reward: torch.Tensor) -> None:
        """Move toward the mean reward of the batch (of all processes under torchrun)."""
        mean = reward.float().mean()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(mean)
            mean /= torch.distributed.get_world_size()
        self.value.mul_(self.momentum).add_((1 - self.momentum) * mean)


# -- the networks of a learned policy ----------------------------------------------------------------------------------

class PolicyCNN(nn.Module):
    """Ours: a small CNN on the image, logits over ``bins`` timesteps (zero-initialised last layer: uniform at the
    start; global pooling: any image size)."""

    def __init__(self, bins: int, in_chans: int = 3, width: int = 32) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(in_chans, width, 3, 2, 1), nn.ReLU(inplace=True),
            nn.Conv2d(width, 2 * width, 3, 2, 1), nn.ReLU(inplace=True),
            nn.Conv2d(2 * width, 2 * width, 3, 2, 1), nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, bins))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).float()


class PolicyLeNet(nn.Module):
    """The official ``PolicyNet_Cov`` for 32 px images: LeNet-5's layout, logits over ``bins`` timesteps (the official
    code applies the softmax inside; here ``sample`` does)."""

    def __init__(self, bins: int, in_chans: int = 3, img_size: int = 32) -> None:
        super().__init__()
        side = ((img_size - 4) // 2 - 4) // 2  # 5 at 32 px: 16 x 5 x 5 = 400 inputs to the first fc
        if side < 1:
            raise ValueError(f'the official policy network needs images of at least 16 px, got {img_size}')
        self.features = nn.Sequential(
            nn.Conv2d(in_chans, 6, 5), nn.ReLU(inplace=True), nn.MaxPool2d(2, 2),
            nn.Conv2d(6, 16, 5), nn.ReLU(inplace=True), nn.MaxPool2d(2, 2), nn.Flatten())
        self.classifier = nn.Sequential(nn.Linear(16 * side * side, 120), nn.ReLU(inplace=True), nn.Linear(120, 84),
                                        nn.ReLU(inplace=True), nn.Linear(84, bins))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x)).float()


POLICY_NETS: Dict[str, Callable[[int, int], nn.Module]] = {  # (bins, image size) -> logits over the bins
    'cnn': lambda bins, size: PolicyCNN(bins), 'lenet': lambda bins, size: PolicyLeNet(bins, img_size=size)}


def _official_head(dim: int, classes: int) -> nn.Module:
    return nn.Sequential(nn.Linear(dim, dim), nn.ReLU(True), nn.Linear(dim, dim), nn.ReLU(True),
                         nn.Linear(dim, classes))


def _small_head(dim: int, classes: int) -> nn.Module:
    return nn.Sequential(nn.Linear(dim, 256), nn.ReLU(True), nn.Linear(256, classes))


TASK_HEADS: Dict[str, Callable[[int, int], nn.Module]] = {'official': _official_head, 'small': _small_head}


# -- the policies ----------------------------------------------------------------------------------------------------

class _Policy(nn.Module):
    """A way to choose a timestep per image: ``forward(x, u) -> (t, log-prob or None, entropy or None)`` over
    ``grid`` (step indices of the teacher's schedule; a buffer, not saved)."""

    learned = False

    def __init__(self, grid: torch.Tensor, **_: object) -> None:
        super().__init__()
        self.register_buffer('grid', grid.float(), persistent=False)

    def forward(self, x: torch.Tensor, u: torch.Tensor
                ) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
        raise NotImplementedError


class FixedPolicy(_Policy):
    """One t for every image (the grid's only point)."""

    def forward(self, x, u):
        return self.grid[:1].expand(len(x)).clone(), None, None


class UniformPolicy(_Policy):
    """t uniform over the grid, from the step's draw."""

    def forward(self, x, u):
        n = len(self.grid)
        return self.grid[(u * n).long().clamp(max=n - 1)], None, None


class LearnedPolicy(_Policy):
    """t sampled from a network's softmax over the grid (``POLICY_NETS[net]``), trained by REINFORCE."""

    learned = True

    def __init__(self, grid: torch.Tensor, net: str = 'cnn', img_size: int = 32, **_: object) -> None:
        super().__init__(grid)
        if net not in POLICY_NETS:
            raise ValueError(f'--policy-net must be one of {sorted(POLICY_NETS)}, got {net!r}')
        self.net = POLICY_NETS[net](len(grid), img_size)

    def forward(self, x, u):
        idx, logp, entropy = sample(self.net(x), u)
        return self.grid[idx], logp, entropy


POLICIES: Dict[str, type] = {'fixed': FixedPolicy, 'random': UniformPolicy, 'reinforce': LearnedPolicy}


# -- the distillation losses, on pooled features -----------------------------------------------------------------------------------------

def _mse_norm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(F.normalize(a, dim=-1), F.normalize(b, dim=-1))


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (1 - F.cosine_similarity(a, b, dim=-1, eps=1e-6)).mean()


KD_LOSSES: Dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    'mse': F.mse_loss, 'mse_norm': _mse_norm, 'l1': F.l1_loss, 'cosine': _cosine}


def pool(x: torch.Tensor) -> torch.Tensor:
    """A feature vector per image: the mean over positions of a map (B, C, H, W) or tokens (B, N, C)."""
    if x.dim() == 4:
        return x.mean(dim=(-2, -1))
    if x.dim() == 3:
        return x.mean(dim=1)
    if x.dim() == 2:
        return x
    raise ValueError(f'cannot pool a feature of shape {tuple(x.shape)}')
