"""The patch-wise PCA tokenizer of l-DAE (arXiv 2401.14404, Sec. 4.2 and 4.3).

A patch is p x p x C pixels flattened in (row, column, channel) order, the order of DiT's unpatchify,
giving a vector of D = C * p * p. The tokenizer keeps the mean ``mu`` (D), the full basis ``V`` (D x D,
rows are components, eigenvalues descending) and the eigenvalues, all as buffers, so every checkpoint
carries its tokenizer. The latent of a patch is ``z = V_d (x - mu) / s`` with ``V_d`` the first
``latent_dim`` rows and ``s`` the latent scale (ours, see ``latent_scale``).

Fitting streams over batches and accumulates float64 sums, so any number of patches fits in memory;
the eigendecomposition runs in float64 and each component gets a deterministic sign (its entry of
largest magnitude is positive), so the same data always gives the same bases.

The transforms always run in float32, also under ``torch.autocast``: at small t the noise l-DAE adds in the
latent is smaller than bf16's rounding of a pixel, so a bf16 tokenizer would bury the signal it is asked to keep.
"""
import contextlib
from typing import Iterable, Iterator, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn

__all__ = ['PatchPCA', 'PatchStats', 'patchify', 'unpatchify', 'float32_region']

LATENT_SCALES = ('global', 'whiten', 'none')


def patchify(x: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, p * p * C), patches in row-major order, each in (row, col, channel) order."""
    B, C, H, W = x.shape
    p = patch_size
    if H % p or W % p:
        raise ValueError(f'image size {H}x{W} is not divisible by the patch size {p}')
    x = x.reshape(B, C, H // p, p, W // p, p)
    x = torch.einsum('nchpwq->nhwpqc', x)
    return x.reshape(B, (H // p) * (W // p), p * p * C)


def unpatchify(x: torch.Tensor, patch_size: int, grid_size: Tuple[int, int], channels: int) -> torch.Tensor:
    """Inverse of ``patchify``: (B, N, p * p * C) -> (B, C, H, W)."""
    B = x.shape[0]
    h, w = grid_size
    p = patch_size
    x = x.reshape(B, h, w, p, p, channels)
    x = torch.einsum('nhwpqc->nchpwq', x)
    return x.reshape(B, channels, h * p, w * p)


@contextlib.contextmanager
def float32_region(x: torch.Tensor) -> Iterator[None]:
    """Autocast off for the tensors' device type: the enclosed code computes in the dtype of its inputs."""
    with torch.autocast(device_type=x.device.type, enabled=False):
        yield


class PatchStats:
    """Streaming first and second moments of patch vectors, in float64.

    ``update`` adds a batch of patches; ``all_reduce`` sums the statistics over a process group so
    that a distributed fit equals a single-process fit on the union of the data.
    """

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.count = 0
        self.sum = torch.zeros(dim, dtype=torch.float64)
        self.sum_outer = torch.zeros(dim, dim, dtype=torch.float64)

    def update(self, patches: torch.Tensor) -> None:
        """Add patches (..., D)."""
        p = patches.reshape(-1, self.dim).detach().to('cpu', torch.float64)
        self.count += p.shape[0]
        self.sum += p.sum(0)
        self.sum_outer += p.T @ p

    def all_reduce(self, device: Optional[torch.device] = None) -> None:
        """Sum the statistics over the default process group (no-op when not distributed)."""
        if not (dist.is_available() and dist.is_initialized()):
            return
        flat = torch.cat([torch.tensor([float(self.count)], dtype=torch.float64), self.sum, self.sum_outer.flatten()])
        flat = flat.to(device or 'cpu')
        dist.all_reduce(flat)
        flat = flat.cpu()
        self.count = int(round(flat[0].item()))
        self.sum = flat[1:1 + self.dim].clone()
        self.sum_outer = flat[1 + self.dim:].reshape(self.dim, self.dim).clone()

    def mean_and_covariance(self) -> Tuple[torch.Tensor, torch.Tensor]:
        if self.count < 2:
            raise RuntimeError(f'PCA needs at least 2 patches, got {self.count}')
        mean = self.sum / self.count
        cov = (self.sum_outer - self.count * torch.outer(mean, mean)) / (self.count - 1)
        return mean, (cov + cov.T) / 2


class PatchPCA(nn.Module):
    """Patch-wise PCA tokenizer: image <-> per-patch latent of ``latent_dim`` components.

    Args:
        patch_size: p; a patch has D = in_chans * p * p values.
        in_chans: Image channels.
        latent_dim: d, the number of leading components kept as the latent.
        latent_scale: How the kept latent is scaled (ours): ``'global'`` divides by
            ``sqrt(mean of the top-d eigenvalues)`` so the latent has unit average variance, like LDM's
            scale factor; ``'whiten'`` divides each component by its own standard deviation;
            ``'none'`` leaves it unscaled.
    """

    def __init__(self, patch_size: int, in_chans: int = 3, latent_dim: int = 32, latent_scale: str = 'global') -> None:
        super().__init__()
        dim = in_chans * patch_size * patch_size
        if not 1 <= latent_dim <= dim:
            raise ValueError(f'latent_dim must be in [1, {dim}] for {patch_size}x{patch_size}x{in_chans} patches, '
                             f'got {latent_dim}')
        if latent_scale not in LATENT_SCALES:
            raise ValueError(f'latent_scale must be one of {LATENT_SCALES}, got {latent_scale!r}')
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.dim = dim
        self.latent_dim = latent_dim
        self.latent_scale = latent_scale
        self.register_buffer('mean', torch.zeros(dim))
        self.register_buffer('components', torch.eye(dim))  # (D, D), rows are components
        self.register_buffer('eigenvalues', torch.ones(dim))  # descending
        self.register_buffer('num_patches', torch.zeros((), dtype=torch.int64))  # patches seen by the fit; 0 = unfitted
        self._fitted = False  # num_patches > 0, kept on the host: a forward pass never reads the device for it

    @property
    def fitted(self) -> bool:
        """Whether the buffers hold a fit (set by ``set_from_stats`` and by loading a state dict; no host sync)."""
        return self._fitted

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        count = state_dict.get(prefix + 'num_patches')
        if count is not None and count.device.type != 'meta':
            self._fitted = bool(count.item() > 0)

    def _require_fitted(self) -> None:
        if not self.fitted:
            raise RuntimeError('the PCA tokenizer is not fitted: call .fit(batches) (or train.py does it), '
                               'or load a checkpoint that carries its fitted buffers')

    # -- fitting ---------------------------------------------------------------------------------------
    def new_stats(self) -> PatchStats:
        return PatchStats(self.dim)

    def accumulate(
            self,
            stats: PatchStats,
            images: torch.Tensor,
            patches_per_image: Optional[int] = None,
            generator: Optional[torch.Generator] = None,
    ) -> None:
        """Add the patches of a batch of images (B, C, H, W) to ``stats``.

        ``patches_per_image`` samples that many patches per image at random (with ``generator``);
        None takes every patch.
        """
        p = patchify(images, self.patch_size)  # (B, N, D)
        if patches_per_image is not None and patches_per_image < p.shape[1]:
            scores = torch.rand(p.shape[0], p.shape[1], generator=generator, device=generator.device if generator else 'cpu')
            idx = scores.argsort(dim=1)[:, :patches_per_image].to(p.device)
            p = torch.gather(p, 1, idx[..., None].expand(-1, -1, p.shape[-1]))
        stats.update(p)

    @torch.no_grad()
    def set_from_stats(self, stats: PatchStats) -> 'PatchPCA':
        """Eigendecompose the covariance in float64 and store mean, bases (deterministic signs), eigenvalues."""
        mean, cov = stats.mean_and_covariance()
        evals, evecs = torch.linalg.eigh(cov)  # ascending, columns are eigenvectors
        order = torch.argsort(evals, descending=True, stable=True)
        evals = evals[order].clamp_min(0)
        comps = evecs[:, order].T.contiguous()  # (D, D), rows are components
        pivot = comps.abs().argmax(dim=1)
        signs = torch.sign(comps[torch.arange(self.dim), pivot])
        comps = comps * signs[:, None]
        self.mean.copy_(mean.to(self.mean.dtype))
        self.components.copy_(comps.to(self.components.dtype))
        self.eigenvalues.copy_(evals.to(self.eigenvalues.dtype))
        self.num_patches.fill_(stats.count)
        self._fitted = stats.count > 0
        return self

    def fit(
            self,
            batches: Iterable[torch.Tensor],
            patches_per_image: Optional[int] = None,
            generator: Optional[torch.Generator] = None,
    ) -> 'PatchPCA':
        """Fit on an iterable of image batches (B, C, H, W) in one streaming pass; all-reduces when distributed."""
        stats = self.new_stats()
        for images in batches:
            self.accumulate(stats, images, patches_per_image, generator)
        stats.all_reduce(device=self.mean.device if self.mean.is_cuda else None)
        return self.set_from_stats(stats)

    # -- transforms ------------------------------------------------------------------------------------
    def scale(self) -> torch.Tensor:
        """The latent scale ``s`` as a (d,) vector."""
        top = self.eigenvalues[:self.latent_dim].clamp_min(1e-12)
        if self.latent_scale == 'global':
            return top.mean().sqrt().expand(self.latent_dim)
        if self.latent_scale == 'whiten':
            return top.sqrt()
        return torch.ones_like(top)

    def grid_size(self, x: torch.Tensor) -> Tuple[int, int]:
        return x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        return patchify(x, self.patch_size)

    def unpatchify(self, patches: torch.Tensor, grid_size: Tuple[int, int]) -> torch.Tensor:
        return unpatchify(patches, self.patch_size, grid_size, self.in_chans)

    def coefficients(self, patches: torch.Tensor, center: bool = True) -> torch.Tensor:
        """Coordinates of patch vectors (..., D) in the full PCA basis: ``V (x - mu)`` (..., D)."""
        self._require_fitted()
        with float32_region(patches):
            patches = patches.float()
            if center:
                patches = patches - self.mean
            return patches @ self.components.T

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) -> scaled latents (B, N, d), float32."""
        self._require_fitted()
        with float32_region(x):
            z = (self.patchify(x.float()) - self.mean) @ self.components[:self.latent_dim].T
            return z / self.scale()

    def decode(self, z: torch.Tensor, grid_size: Tuple[int, int]) -> torch.Tensor:
        """Scaled latents (B, N, d) -> images (B, C, H, W) by inverse PCA (the discarded components are zero)."""
        self._require_fitted()
        with float32_region(z):
            patches = (z.float() * self.scale()) @ self.components[:self.latent_dim] + self.mean
            return self.unpatchify(patches, grid_size)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """The image as the latent sees it: ``decode(encode(x))``."""
        return self.decode(self.encode(x), self.grid_size(x))

    def extra_repr(self) -> str:
        return (f'patch_size={self.patch_size}, in_chans={self.in_chans}, dim={self.dim}, '
                f'latent_dim={self.latent_dim}, latent_scale={self.latent_scale!r}')
