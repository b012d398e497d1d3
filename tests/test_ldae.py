"""l-DAE encoders and DAE: reference check, merge equivalence, loss, timm API, feature taps, bad input."""
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models import VisionTransformer

import ldae_models
from ldae_models.layers import patchify
from ldae_models.models import MergedViT
from conftest import TINY, randomize_, rel_err, smooth_images
from reference import reference_encoder

TOL = 1e-5  # relative error in float32, see conftest.rel_err
TINY_ENC = {k: v for k, v in TINY.items()}


def tiny_encoder(seed=0, **kw):
    enc = timm.create_model('ldae_vit_tiny_patch4_32', merged=False, **{**TINY_ENC, **kw})
    return randomize_(enc, seed).eval()


@pytest.mark.parametrize('t', [0, 10, 437.5, 999])
def test_conditional_encoder_matches_reference(t):
    enc = tiny_encoder()
    x = torch.randn(3, 3, 16, 16)
    ref = reference_encoder(enc.state_dict(), x, t, patch=4, heads=2, num_blocks=2)
    inter = enc.forward_intermediates(x, t=t, output_fmt='NLC', intermediates_only=True)
    for ours, theirs in zip(inter, ref):
        assert rel_err(ours, theirs) < TOL
    assert rel_err(enc(x, t), ref[-1].mean(1)) < TOL


@pytest.mark.parametrize('t', [0, 10, 250, 999])
def test_merged_matches_conditional(t):
    enc = tiny_encoder(seed=t)
    vit = enc.merge(t)
    assert isinstance(vit, VisionTransformer) and isinstance(vit, MergedViT) and vit.t == t
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        assert rel_err(vit(x), enc(x, t)) < TOL
        fa, ia = enc.forward_intermediates(x, t=t)
        fb, ib = vit.forward_intermediates(x)
    assert rel_err(fb, fa) < TOL and len(ia) == len(ib) == 2
    for a, b in zip(ia, ib):
        assert a.shape == b.shape == (4, 32, 4, 4) and rel_err(b, a) < TOL


def test_merged_skeleton_is_the_fold_of_a_fresh_encoder():
    """Without weights the merged model is built without a fold; it has exactly the structure the fold of a freshly
    initialised adaLN-Zero encoder has: unit LayerNorms, zero attention and MLP outputs (identity blocks), the same
    sin-cos positions, xavier-scaled qkv and fc1."""
    torch.manual_seed(3)
    skeleton = timm.create_model('ldae_vit_tiny_patch4_32', **TINY_ENC)
    folded = timm.create_model('ldae_vit_tiny_patch4_32', merged=False, **TINY_ENC).merge()
    assert isinstance(skeleton, MergedViT) and skeleton.t == folded.t == 10
    sa, sb = skeleton.state_dict(), folded.state_dict()
    assert sa.keys() == sb.keys() and all(sa[k].shape == sb[k].shape for k in sa)
    for k in sa:
        if k.endswith(('norm1.weight', 'norm2.weight', 'norm1.bias', 'norm2.bias', 'proj.bias', 'fc2.weight',
                       'fc2.bias', 'fc1.bias', 'qkv.bias', 'attn.proj.weight')) or k == 'pos_embed':
            assert torch.equal(sa[k], sb[k]), k  # the deterministic part of the fold is identical
        else:  # random: the same scale (xavier), other draws
            assert torch.isfinite(sa[k]).all() and abs(sa[k].std() / sb[k].std() - 1) < 0.2, k
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert rel_err(skeleton.forward_features(x), skeleton.patch_embed(x)
                       + skeleton.pos_embed) < 1e-6  # identity blocks


def test_merged_with_t_kwarg_and_dynamic_size():
    enc = tiny_encoder(dynamic_img_size=True)
    vit = enc.merge(40)
    for size in (16, 24, 12):
        x = torch.randn(2, 3, size, size)
        with torch.no_grad():
            assert rel_err(vit(x), enc(x, 40)) < TOL


def test_dae_blocks_are_encoder_then_decoder(tiny_dae):
    x = smooth_images(2)
    with torch.no_grad():
        inter = tiny_dae.forward_intermediates(x, t=10, indices=[0, 1], intermediates_only=True)
        enc_inter = tiny_dae.encoder.forward_intermediates(x, t=10, intermediates_only=True)
    for a, b in zip(inter, enc_inter):
        assert torch.equal(a, b)
    # the DAE's forward runs encoder blocks then decoder blocks, as the reference does
    sd = {k: v for k, v in tiny_dae.state_dict().items()}
    flat = {k[len('encoder.'):]: v for k, v in sd.items() if k.startswith('encoder.')}
    for i, blk in enumerate(tiny_dae.decoder_blocks):
        for k, v in blk.state_dict().items():
            flat[f'blocks.{i + 2}.{k}'] = v
    ref = reference_encoder(flat, x, 10, patch=4, heads=2, num_blocks=4)
    with torch.no_grad():
        ours = tiny_dae.forward_intermediates(x, t=10, output_fmt='NLC', intermediates_only=True)
    for a, b in zip(ours, ref):
        assert rel_err(a, b) < TOL


def test_loss_with_unit_weights_is_plain_mse():
    dae = ldae_models.LatentDAE(**TINY, residual_weight=1.0, loss_weight='none')
    dae.fit_tokenizer([smooth_images(8, seed=s) for s in range(3)])
    randomize_(dae, seed=5)
    x = smooth_images(4, seed=11)
    out = dae(x, generator=torch.Generator().manual_seed(0))
    assert abs(out['loss'].item() - F.mse_loss(out['pred'], x).item()) < 1e-6 * max(1.0, out['loss'].item())


def test_final_loss_formula(tiny_dae):
    """lambda_t * mean_i w_i r_i^2 with r = V (x - x_hat), recomputed here from the buffers."""
    x = smooth_images(3, seed=2)
    out = tiny_dae(x, generator=torch.Generator().manual_seed(1))
    V = tiny_dae.tokenizer.components
    r = patchify(x - out['pred'], 4) @ V.T
    w = torch.full((48,), 0.1)
    w[:6] = 1
    sigma = math.sqrt(2) * out['t'].float() / 999  # the linear-sigma schedule, written out
    expected = ((r ** 2 * w).mean(-1).mean(1) / (1 + sigma ** 2)).mean()
    assert abs(out['loss'].item() - expected.item()) < 1e-5 * expected.item()


def test_latent_noise_input(tiny_dae):
    x = smooth_images(2, seed=4)
    g = torch.Generator().manual_seed(0)
    noisy, eps = tiny_dae.add_noise(x, torch.tensor([0, 999]), generator=g)
    tok = tiny_dae.tokenizer
    assert eps.shape == (2, 16, 6)
    assert rel_err(noisy[0], tok.project(x)[0]) < 1e-5  # t = 0: the PCA projection, no noise
    z = tok.encode(noisy[1:]) - tok.encode(x[1:])
    assert rel_err(z, math.sqrt(2) * eps[1:]) < 1e-4  # t = 999: sigma = sqrt(2) in the latent


@pytest.mark.parametrize('kw', [
    dict(target='latent'), dict(target='noise'), dict(noise_space='pixel'),
    dict(noise_space='pixel', target='noise'), dict(schedule='single'), dict(latent_dim=48),
    dict(latent_scale='whiten'), dict(adaln_hidden_ratio=None), dict(schedule='vp_linear', target='noise'),
    dict(schedule='vp_linear', target='latent'),
])
def test_ablation_switches(kw):
    dae = ldae_models.LatentDAE(**{**TINY, **kw})
    dae.fit_tokenizer([smooth_images(8, seed=s) for s in range(3)])
    randomize_(dae, seed=1)
    out = dae(smooth_images(3, seed=5), generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out['loss']) and out['loss'] > 0 and out['pred'].shape == (3, 3, 16, 16)
    if kw.get('schedule') == 'single':
        assert torch.allclose(dae.schedule.coefficients(out['t'])[1], torch.full((3,), math.sqrt(1 / 3)))
        assert dae.encoder.t == round(math.sqrt(1 / 3) / math.sqrt(2) * 999) == 408
        assert torch.equal(out['t'], torch.full((3,), 408.0))  # conditioned on its own t
    if kw.get('schedule') == 'vp_linear':  # input scaling: the clean latent is scaled by gamma_t
        z = dae.tokenizer.encode(smooth_images(3, seed=5))
        t = torch.tensor([0.0, 500.0, 999.0])
        noisy, eps = dae.add_noise(smooth_images(3, seed=5), t, generator=torch.Generator().manual_seed(1))
        gamma2 = 1 - (t + 1) / 1000
        expect = gamma2.sqrt()[:, None, None] * z + (1 - gamma2).sqrt()[:, None, None] * eps
        assert rel_err(dae.tokenizer.encode(noisy), expect) < 1e-4


def test_latent_target_ignores_discarded_components(tiny_dae):
    tiny_dae.target = 'latent'
    x = smooth_images(2, seed=3)
    tok = tiny_dae.tokenizer
    pred = tok.project(x)
    per = tiny_dae.compute_loss(pred + 0 * x, x, None, torch.zeros(2))  # t = 0
    assert per.abs().max() < 1e-10


def test_optimisation_lowers_loss():
    torch.manual_seed(0)
    dae = ldae_models.LatentDAE(**TINY)
    data = [smooth_images(16, seed=s) for s in range(4)]
    dae.fit_tokenizer(data)
    held = smooth_images(16, seed=100)

    def held_loss():
        with torch.no_grad():
            return dae(held, generator=torch.Generator().manual_seed(0))['loss'].item()

    before = held_loss()
    opt = torch.optim.AdamW(dae.parameters(), lr=2e-3, weight_decay=0)
    for step in range(40):
        loss = dae(data[step % 4])['loss']
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert held_loss() < 0.7 * before


# -- the three paper sizes ---------------------------------------------------------------------------

# Parameters of the merged encoders (no head): ViT blocks + patch embedding + 256 positions.
# ViT-B: 85,841,664; ViT-1/2L: 152,204,288; ViT-L: 303,358,976. The encoder blocks and patch embedding
# have exactly the parameters of timm's ViT-B/16 and ViT-L/16 (12 / 24 blocks), without class token
# and final norm. The conditional encoders add the timestep MLP and the W/4-hidden modulation MLPs.
PAPER_SIZES = {
    'ldae_vit_b': (85_841_664, 'vit_base_patch16_224', 12),
    'ldae_vit_half_l': (152_204_288, 'vit_large_patch16_224', 12),
    'ldae_vit_l': (303_358_976, 'vit_large_patch16_224', 24),
}


@pytest.mark.parametrize('name', list(PAPER_SIZES))
def test_paper_size_parameter_counts(name):
    expected, timm_name, depth = PAPER_SIZES[name]
    with torch.device('meta'):
        enc = timm.create_model(name, merged=False)
        merged = VisionTransformer(**enc.vit_args())  # what enc.merge() builds, without the weights
        ref = timm.create_model(timm_name, num_classes=0, depth=depth)
    n = sum(p.numel() for p in merged.parameters())
    assert n == expected
    # same blocks and patch embedding as timm's ViT of that width and depth
    ref_n = sum(p.numel() for k, p in ref.named_parameters() if not k.startswith(('cls_token', 'pos_embed', 'norm.')))
    assert n - merged.pos_embed.numel() == ref_n
    assert len(enc.blocks) == depth and enc.embed_dim == ref.embed_dim


# -- timm integration --------------------------------------------------------------------------------

def test_registered_names_and_aliases():
    names = timm.list_models('ldae*')
    for n in ('ldae_vit_base_patch16_256', 'ldae_vit_halflarge_patch16_256', 'ldae_vit_large_patch16_256',
              'ldae_vit_b', 'ldae_vit_half_l', 'ldae_vit_l', 'ldae_vit_tiny_patch4_32', 'ldae_vit_small_patch4_32'):
        assert n in names


@pytest.mark.parametrize('merged', [True, False])
def test_features_only(merged):
    m = timm.create_model('ldae_vit_tiny_patch4_32', features_only=True, merged=merged, out_indices=(0, 5, 11))
    feats = m(torch.randn(2, 3, 32, 32))
    assert [f.shape for f in feats] == [(2, 192, 8, 8)] * 3
    assert m.feature_info.channels() == [192] * 3 and m.feature_info.reduction() == [4] * 3


def test_merged_timm_api():
    vit = tiny_encoder().merge()
    cfg = timm.data.resolve_model_data_config(timm.create_model('ldae_vit_tiny_patch4_32'))
    assert cfg['input_size'] == (3, 32, 32) and cfg['mean'] == (0.5, 0.5, 0.5) and cfg['crop_pct'] == 1.0
    x = torch.randn(2, 3, 16, 16)
    assert vit(x).shape == (2, 32)
    vit.reset_classifier(7)
    assert vit(x).shape == (2, 7)
    # fine-tuning: gradients reach every parameter and a step changes the output
    vit.train()
    opt = torch.optim.SGD(vit.parameters(), lr=0.1)
    loss = F.cross_entropy(vit(x), torch.tensor([1, 3]))
    loss.backward()
    assert all(p.grad is not None for p in vit.parameters())
    before = vit(x).detach()
    opt.step()
    assert not torch.allclose(vit(x).detach(), before)


def test_conditional_timm_api_and_grad_checkpointing():
    enc = tiny_encoder()
    x = torch.randn(2, 3, 16, 16)
    enc.train()
    a = enc(x)
    enc.set_grad_checkpointing(True)
    b = enc(x)
    assert torch.allclose(a, b)
    b.sum().backward()
    enc.reset_classifier(5)
    assert enc(x).shape == (2, 5) and enc.get_classifier().out_features == 5


# -- feature taps ------------------------------------------------------------------------------------

def test_extract_features_one_pass_per_t():
    enc = tiny_encoder()
    x = torch.randn(3, 3, 16, 16)
    calls = []
    enc.patch_embed.register_forward_hook(lambda *a: calls.append(1))
    feats = ldae_models.extract_features(enc, x, layers=[0, -1], ts=[0, 10, 80])
    assert len(calls) == 3 and len(feats) == 6
    for t in (0, 10, 80):
        inter = enc.forward_intermediates(x, t=t, intermediates_only=True, output_fmt='NLC')
        assert torch.equal(feats[(0, t)], inter[0].mean(1)) and torch.equal(feats[(-1, t)], inter[1].mean(1))
    assert torch.allclose(feats[(-1, 10)], enc(x, 10))


def test_extract_features_noise_is_seeded(tiny_dae):
    enc = tiny_dae.encoder
    x = smooth_images(2)
    kw = dict(layers=1, ts=[10, 500], noisy_input=True)
    a = ldae_models.extract_features(enc, x, generator=torch.Generator().manual_seed(0), **kw)
    b = ldae_models.extract_features(enc, x, generator=torch.Generator().manual_seed(0), **kw)
    c = ldae_models.extract_features(enc, x, generator=torch.Generator().manual_seed(1), **kw)
    clean = ldae_models.extract_features(enc, x, layers=1, ts=[500])
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a[(1, 500)], c[(1, 500)]) and not torch.equal(a[(1, 500)], clean[(1, 500)])
    # the DAE itself: its blocks are numbered encoder first, so block 3 is the last decoder block
    d = ldae_models.extract_features(tiny_dae, x, layers=[1, 3], ts=10)
    assert torch.equal(d[(1, 10)], ldae_models.extract_features(enc, x, layers=1, ts=10)[(1, 10)])


def test_extract_features_merged():
    enc = tiny_encoder()
    vit = enc.merge(10)
    x = torch.randn(2, 3, 16, 16)
    a = ldae_models.extract_features(vit, x, layers=[0, 1])
    b = ldae_models.extract_features(enc, x, layers=[0, 1], ts=10)
    assert rel_err(a[(1, 10)], b[(1, 10)]) < TOL
    with pytest.raises(ValueError, match='merged'):
        ldae_models.extract_features(vit, x, layers=0, ts=20)
    with pytest.raises(ValueError, match='out of range'):
        ldae_models.extract_features(enc, x, layers=2)


# -- bad input ---------------------------------------------------------------------------------------

def test_bad_inputs():
    enc = tiny_encoder()
    with pytest.raises(ValueError, match='expected 16x16 images, got 24x24'):
        enc(torch.randn(1, 3, 24, 24))
    with pytest.raises(ValueError, match='expected 3 input channels, got 1'):
        enc(torch.randn(1, 1, 16, 16))
    with pytest.raises(ValueError, match='shape'):
        enc(torch.randn(3, 16, 16))
    for t in (1000, -1, float('nan'), 5000.0):
        with pytest.raises(ValueError, match='timestep t'):
            enc(torch.randn(1, 3, 16, 16), t=t)
    with pytest.raises(ValueError, match=r'timestep t must be in \[0, 1000\)'):
        timm.create_model('ldae_vit_tiny_patch4_32', t=1000)
    with pytest.raises(RuntimeError, match='Unknown model'):
        timm.create_model('ldae_vit_gigantic')
    with pytest.raises(ValueError, match='unknown l-DAE model'):
        ldae_models.create_dae('ldae_vit_gigantic')
    with pytest.raises(ValueError, match='not divisible'):
        tiny_encoder(dynamic_img_size=True)(torch.randn(1, 3, 18, 18))
    vit = enc.merge()
    with pytest.raises(ValueError, match='expected 16x16 inputs, got 24x24'):
        vit(torch.randn(1, 3, 24, 24))
    with pytest.raises(ValueError, match='merged l-DAE encoder cannot add'):
        timm.create_model('ldae_vit_tiny_patch4_32', noisy_input=True, **TINY_ENC)
    with pytest.raises(ValueError, match='unknown noise schedule'):
        ldae_models.create_dae('ldae_vit_tiny_patch4_32', schedule='cosine')
    with pytest.raises(RuntimeError, match='not fitted'):
        ldae_models.create_dae('ldae_vit_tiny_patch4_32', **TINY)(smooth_images(1))
    with pytest.raises(ValueError, match='target'):
        ldae_models.create_dae('ldae_vit_tiny_patch4_32', target='velocity')
