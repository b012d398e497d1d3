"""DDAE UNets: diffusers' UNet2DModel equivalence, taps, grid helper and probe, EDM option, bad inputs."""
import math

import pytest
import timm
import torch
from safetensors.torch import save_file

import ldae_models
from ldae_models.features import extract_features
from ldae_models.models.ddae_unet import unet_diffusers_to_ddae
from ldae_models.data import ImageData
from ldae_models.plots import plot_grid
from ldae_models.probe import fit_linear_probe, grid_probe
from conftest import fake_hf_cache, randomize_, rel_err

TOL = 1e-5
GOOGLE_CFG = dict(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(128, 256, 256, 256),
                  layers_per_block=2, down_block_types=('DownBlock2D', 'AttnDownBlock2D', 'DownBlock2D', 'DownBlock2D'),
                  up_block_types=('UpBlock2D', 'UpBlock2D', 'AttnUpBlock2D', 'UpBlock2D'), downsample_padding=0,
                  flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6, norm_num_groups=32, attention_head_dim=None)
SMALL_CFG = dict(GOOGLE_CFG, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
                 down_block_types=('DownBlock2D', 'AttnDownBlock2D'), up_block_types=('AttnUpBlock2D', 'UpBlock2D'))
SMALL = dict(base_channels=32, channel_mult=(1, 2), num_res_blocks=1, norm_groups=8, out_k=2, t=11)


def diffusers_unet(cfg, seed=0):
    diffusers = pytest.importorskip('diffusers')
    torch.manual_seed(seed)
    return randomize_(diffusers.UNet2DModel(**cfg), seed, std=0.05).eval()


def decoder_outputs(unet, x, t):
    """diffusers' decoder-block outputs: each up resnet, or its attention where there is one."""
    outs = []
    hooks = []
    for blk in unet.up_blocks:
        attns = list(getattr(blk, 'attentions', None) or [])
        for j, res in enumerate(blk.resnets):
            mod = attns[j] if attns else res
            hooks.append(mod.register_forward_hook(lambda m, i, o: outs.append(o[0] if isinstance(o, tuple) else o)))
    with torch.no_grad():
        pred = unet(x, t).sample
    for h in hooks:
        h.remove()
    return pred, outs


@pytest.mark.parametrize('which', ['google', 'small'])
def test_matches_diffusers_unet2dmodel(which):
    cfg, kw = (GOOGLE_CFG, {}) if which == 'google' else (SMALL_CFG, SMALL)
    ref = diffusers_unet(cfg)
    model = timm.create_model('ddae_ddpm_cifar10_32', tap_only=False, **kw).eval()
    ldae_models.hub.load_state_dict_strict(model, unet_diffusers_to_ddae(ref.state_dict()))
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([11, 730])
    pred, outs = decoder_outputs(ref, x, t)
    with torch.no_grad():
        assert rel_err(model.denoise(x, t), pred) < TOL
        ours = model.forward_intermediates(x, t=t, noisy_input=False, intermediates_only=True)
    assert len(ours) == len(outs) == (12 if which == 'google' else 4)
    for a, b in zip(ours, outs):
        assert a.shape == b.shape and rel_err(a, b) < TOL


def test_old_diffusers_attention_names_convert_too():
    ref = diffusers_unet(SMALL_CFG, seed=1)
    renames = {'group_norm': 'group_norm', 'to_q': 'query', 'to_k': 'key', 'to_v': 'value', 'to_out.0': 'proj_attn'}
    old = {}
    for k, v in ref.state_dict().items():
        for new, legacy in renames.items():
            k = k.replace(f'.{new}.', f'.{legacy}.')
        old[k] = v
    assert any('.query.' in k for k in old)
    model = timm.create_model('ddae_ddpm_cifar10_32', tap_only=False, **SMALL).eval()
    ldae_models.hub.load_state_dict_strict(model, unet_diffusers_to_ddae(old))
    x, t = torch.randn(1, 3, 32, 32), torch.tensor([5])
    with torch.no_grad():
        assert rel_err(model.denoise(x, t), ref(x, t).sample) < TOL


def test_parameter_counts():
    with torch.device('meta'):
        ddpm = timm.create_model('ddae_ddpm_cifar10_32', tap_only=False)
        ddpmpp = timm.create_model('ddae_ddpmpp_cifar10_32', tap_only=False)
        tapped = timm.create_model('ddae_ddpm_cifar10_32')  # the extractor: the decoder up to out_6
    assert sum(p.numel() for p in ddpm.parameters()) == 35_746_307  # Ho et al.'s 35.7M
    assert sum(p.numel() for p in ddpmpp.parameters()) == 56_524_291  # DDAE's 56.5M
    assert sum(p.numel() for p in tapped.parameters()) == 26_206_848 and tapped.num_taps == 6
    assert ddpm.block_info[5] == dict(num_chs=256, resolution=8, reduction=4)  # out_6: 8x8, 256 channels
    assert ddpm.out_k == 6 and ddpm.t == 11 and ddpm.num_features == 256


def test_pretrained_tag_from_offline_cache(tmp_path):
    ref = diffusers_unet(SMALL_CFG, seed=2)
    w = tmp_path / 'diffusion_pytorch_model.safetensors'
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(w))
    fake_hf_cache(tmp_path / 'hf', 'google/ddpm-cifar10-32', {w.name: w})
    cfg = timm.models.get_pretrained_cfg('ddae_ddpm_cifar10_32.google')
    assert cfg.hf_hub_id == 'google/ddpm-cifar10-32' and cfg.license == 'apache-2.0'
    assert 'ddae_ddpm_cifar10_32.google' in timm.list_pretrained('ddae*')
    model = timm.create_model('ddae_ddpm_cifar10_32.google', pretrained=True, cache_dir=str(tmp_path / 'hf'),
                              tap_only=False, **SMALL).eval()
    tapped = timm.create_model('ddae_ddpm_cifar10_32.google', pretrained=True, cache_dir=str(tmp_path / 'hf'),
                               **SMALL).eval()  # the checkpoint's decoder past the tap is left out, the rest strict
    with torch.no_grad():
        xx = torch.randn(2, 3, 32, 32)
        assert torch.equal(tapped(xx), model(xx))
    x, t = torch.randn(1, 3, 32, 32), torch.tensor([11])
    with torch.no_grad():
        assert rel_err(model.denoise(x, t), ref(x, t).sample) < TOL


def small_model(seed=0, **kw):
    return randomize_(timm.create_model('ddae_ddpm_cifar10_32', **{**SMALL, 'tap_only': False, **kw}), seed,
                      std=0.05).eval()


def test_features_default_and_noise_is_seeded():
    m = small_model()
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        a = m(x, generator=torch.Generator().manual_seed(0))
        b = m(x, generator=torch.Generator().manual_seed(0))
        c = m(x, generator=torch.Generator().manual_seed(1))
        xt, _ = m.add_noise(x, 11, generator=torch.Generator().manual_seed(0))
        clean_path = m.forward_intermediates(xt, t=11, indices=[1], noisy_input=False, intermediates_only=True)[0]
    assert a.shape == (3, 64) and torch.equal(a, b) and not torch.equal(a, c)
    assert rel_err(a, clean_path.mean((-2, -1))) < 1e-6  # model(x) = pooled out_k of the DDPM-noised input
    abar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)[11]
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    assert rel_err(xt, (abar.sqrt() * x + (1 - abar).sqrt() * eps).float()) < 1e-6


def ddae_grid_features(model, images, out_ks, ts, **kw):
    """DDAE's grid with DDAE's 1-based decoder blocks (out_k = layer + 1), from the encoder contract."""
    feats = extract_features(model, images, layers=[k - 1 for k in out_ks], ts=ts, **kw)
    return {(layer + 1, t): f for (layer, t), f in feats.items()}


def test_grid_equals_separate_calls():
    m = small_model()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    calls = []
    m.conv_in.register_forward_hook(lambda *a: calls.append(1))
    grid = ddae_grid_features(m, x, out_ks=[1, 2, 4], ts=[1, 11, 21], noisy_input=False)
    assert len(calls) == 3 and len(grid) == 9
    for t in (1, 11, 21):
        for k in (1, 2, 4):
            m.out_k = k
            with torch.no_grad():
                sep = m.forward_head(m.forward_intermediates(x, t=t, indices=[k - 1], noisy_input=False,
                                                             intermediates_only=True)[0])
            assert torch.allclose(grid[(k, t)], sep, rtol=1e-5, atol=1e-6)
    for t in (1, 21):  # with noise: one grid call per t equals the model's own call with the same seed
        g = ddae_grid_features(m, x, out_ks=[2], ts=[t], generator=torch.Generator().manual_seed(3))
        m.out_k = 2
        with torch.no_grad():
            assert torch.allclose(g[(2, t)], m(x, t=t, generator=torch.Generator().manual_seed(3)), rtol=1e-5, atol=1e-6)


def test_features_only():
    m = timm.create_model('ddae_ddpm_cifar10_32', features_only=True, out_indices=(2, 5, 8, 11), tap_only=False)
    assert timm.create_model('ddae_ddpm_cifar10_32', features_only=True).out_indices == (1, 3, 5)  # up to out_6
    feats = m(torch.randn(1, 3, 32, 32))
    assert [f.shape[1:] for f in feats] == [(256, 4, 4), (256, 8, 8), (256, 16, 16), (128, 32, 32)]
    assert m.feature_info.channels() == [256, 256, 256, 128]


def test_edm_option():
    m = small_model(schedule='edm', t=0.06)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    xt, eps = m.add_noise(x, generator=torch.Generator().manual_seed(0))
    assert rel_err(xt, x + 0.06 * eps) < 1e-6
    sig = torch.tensor([0.06, 0.06])
    x_in, t_in = m.schedule.network_input(xt, sig)
    assert rel_err(x_in, xt / math.sqrt(0.06 ** 2 + 0.25)) < 1e-6
    assert torch.allclose(t_in, torch.log(sig) / 4)
    with torch.no_grad():
        assert m(x).shape == (2, 64)
    with pytest.raises(ValueError, match='noise level sigma and must be finite and > 0'):
        m(x, t=0.0)


def test_bad_inputs():
    m = small_model()
    with pytest.raises(ValueError, match='expected 32x32 images, got 64x64'):
        m(torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match='expected 3 input channels, got 1'):
        m(torch.randn(1, 1, 32, 32))
    for t in (1000, -1, float('nan')):
        with pytest.raises(ValueError, match='timestep t'):
            m(torch.randn(1, 3, 32, 32), t=t)
    with pytest.raises(ValueError, match=r'out_k must be in \[1, 12\]'):
        timm.create_model('ddae_ddpm_cifar10_32', out_k=13)
    with pytest.raises(ValueError, match='out of range'):
        extract_features(m, torch.randn(1, 3, 32, 32), layers=[4], ts=[11])
    with pytest.raises(ValueError, match='resample'):
        ldae_models.UNet(resample='bilinear')


# -- probes ----------------------------------------------------------------------------------------------

def test_linear_probe_separable_set():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 16, generator=g) * 3
    y = torch.randint(0, 4, (400,), generator=g)
    x = centers[y] + torch.randn(400, 16, generator=g)
    r = fit_linear_probe(x[:300], y[:300], x[300:], y[300:])
    assert r['top1'] > 95


def test_grid_probe_and_heat_map(tmp_path):
    pytest.importorskip('matplotlib')
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 2, (96,), generator=g)
    # class 0 reddish, class 1 bluish (global pooling keeps colour; it would lose position), as uint8 images
    img = torch.full((96, 3, 32, 32), 64.0)
    img[y == 0, 0] = 192
    img[y == 1, 2] = 192
    img = (img + 12 * torch.randn(img.shape, generator=g)).clamp(0, 255).to(torch.uint8)
    m = small_model()
    res = grid_probe(m, ImageData(img[:64], y[:64], ('red', 'blue')), ImageData(img[64:], y[64:], ('red', 'blue')),
                     layers=[0, 1], ts=[1, 11], noisy_input=True, knn=True)
    assert set(res) == {(0, 1), (0, 11), (1, 1), (1, 11)}
    assert min(r['top1'] for r in res.values()) > 90 and min(r['knn_top1'] for r in res.values()) > 90
    path = plot_grid({k: r['top1'] for k, r in res.items()}, str(tmp_path / 'grid.png'),
                     layer_label='decoder block (0-based)')
    assert (tmp_path / 'grid.png').stat().st_size > 1000 and path.endswith('grid.png')
