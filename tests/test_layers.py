"""The shared layers against their formulas: positions, timestep embedding, PCA tokenizer."""
import pytest
import torch

from ldae_models.layers import PatchPCA, patchify, sincos_pos_embed_2d, timestep_frequency_embedding, unpatchify
from reference import dit_timestep_embedding, mae_sincos_pos_embed
from conftest import rel_err, smooth_images


@pytest.mark.parametrize('dim,grid', [(32, 4), (384, 16), (1152, 16)])
def test_sincos_pos_embed_matches_mae(dim, grid):
    assert rel_err(sincos_pos_embed_2d(dim, (grid, grid)), mae_sincos_pos_embed(dim, grid)) < 1e-6


def test_sincos_rejects_bad_dim():
    with pytest.raises(ValueError, match='divisible by 4'):
        sincos_pos_embed_2d(30, (2, 2))


def test_timestep_embedding_cos_first():
    t = torch.tensor([0.0, 1.0, 10.0, 999.0])
    emb = timestep_frequency_embedding(t)
    assert emb.shape == (4, 256)
    assert torch.allclose(emb[0, :128], torch.ones(128)) and torch.allclose(emb[0, 128:], torch.zeros(128))
    assert rel_err(emb, dit_timestep_embedding(t)) < 1e-6


def test_patchify_roundtrip_and_order():
    x = torch.randn(2, 3, 8, 12)
    p = patchify(x, 4)
    assert p.shape == (2, 6, 48)
    # patch 1 is row 0, column 1; its vector is (row, col, channel) ordered
    assert torch.equal(p[0, 1].reshape(4, 4, 3), x[0, :, 0:4, 4:8].permute(1, 2, 0))
    assert torch.equal(unpatchify(p, 4, (2, 3), 3), x)


def _fit(seed=0, **kw):
    pca = PatchPCA(4, latent_dim=kw.pop('latent_dim', 8), **kw)
    return pca.fit([smooth_images(6, seed=seed + i) for i in range(3)])


def test_pca_bases_orthonormal_and_sorted():
    pca = _fit()
    V = pca.components.double()
    assert torch.allclose(V @ V.T, torch.eye(48, dtype=torch.float64), atol=1e-6)
    ev = pca.eigenvalues
    assert (ev[:-1] >= ev[1:]).all() and ev[0] > 0
    assert pca.num_patches.item() == 18 * 16


def test_pca_full_dim_reconstructs_exactly():
    pca = _fit(latent_dim=48)
    x = smooth_images(4, seed=9)
    assert rel_err(pca.project(x), x) < 1e-5


def test_pca_streaming_equals_one_batch_and_is_reproducible():
    batches = [smooth_images(5, seed=s) for s in range(4)]
    a = PatchPCA(4, latent_dim=8).fit(batches)
    b = PatchPCA(4, latent_dim=8).fit([torch.cat(batches)])
    c = PatchPCA(4, latent_dim=8).fit(batches)
    assert torch.equal(a.components, c.components) and torch.equal(a.mean, c.mean)
    assert rel_err(a.components, b.components) < 1e-5
    assert rel_err(a.eigenvalues, b.eigenvalues) < 1e-6


def test_pca_matches_numpy_and_signs_are_deterministic():
    x = torch.cat([smooth_images(6, seed=s) for s in range(3)])
    pca = PatchPCA(4, latent_dim=8).fit([x])
    P = patchify(x, 4).reshape(-1, 48).double().numpy()
    import numpy as np
    cov = np.cov(P, rowvar=False)
    evals, evecs = np.linalg.eigh(cov)
    top = evecs[:, ::-1][:, :5].T  # leading components, arbitrary sign
    ours = pca.components[:5].double().numpy()
    assert np.allclose(np.abs((top * ours).sum(1)), 1, atol=1e-5)  # same directions
    assert np.allclose(pca.eigenvalues[:5].double().numpy(), evals[::-1][:5], rtol=1e-5)
    pivot = np.abs(ours).argmax(1)
    assert (ours[np.arange(5), pivot] > 0).all()  # the sign convention


def test_pca_patch_sampling_is_seeded():
    imgs = [smooth_images(4, seed=s) for s in range(3)]
    a = PatchPCA(4, latent_dim=8).fit(imgs, patches_per_image=5, generator=torch.Generator().manual_seed(1))
    b = PatchPCA(4, latent_dim=8).fit(imgs, patches_per_image=5, generator=torch.Generator().manual_seed(1))
    assert a.num_patches.item() == 60 and torch.equal(a.components, b.components)


@pytest.mark.parametrize('scale', ['global', 'whiten', 'none'])
def test_pca_latent_scale(scale):
    pca = _fit(latent_scale=scale)
    z = pca.encode(torch.cat([smooth_images(6, seed=s) for s in range(3)]))
    var = z.reshape(-1, 8).var(0)
    if scale == 'global':
        assert abs(var.mean().item() - 1) < 1e-3
    elif scale == 'whiten':
        assert torch.allclose(var, torch.ones(8), atol=1e-3)
    x = smooth_images(2, seed=7)
    assert rel_err(pca.decode(pca.encode(x), (4, 4)), pca.project(x)) < 1e-6


def test_pca_unfitted_and_bad_args():
    pca = PatchPCA(4, latent_dim=8)
    with pytest.raises(RuntimeError, match='not fitted'):
        pca.encode(torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match='latent_dim'):
        PatchPCA(4, latent_dim=49)
    with pytest.raises(ValueError, match='latent_scale'):
        PatchPCA(4, latent_scale='bogus')
