"""Every registered architecture, built at reduced depth: one forward pass, features at two layers and two t through
the encoder contract, and the merge where it applies; the registry, the pretrained tags and the one builder."""
import pytest
import timm
import torch

import ldae_models
from ldae_models.models import MergedViT, has_weights, list_models, names_weights, pretrained_cfg_for
from conftest import randomize_, rel_err

ALL = list_models()


def reduced(name):
    """Keyword arguments that keep every family small: one block (a UNet is small enough as it is)."""
    return {} if name.startswith('ddae_') else dict(depth=1)


def test_families_are_registered():
    assert len(list_models('ldae')) == 8 and len(list_models('dit')) == 24 and len(list_models('ddae')) == 2
    assert set(ALL) <= set(timm.list_models())
    assert timm.models.model_entrypoint('dit_xl_patch2_256').__doc__.startswith('DiT-XL/2 encoder on 256 px')


@pytest.mark.parametrize('name', ALL)
def test_every_architecture(name):
    torch.manual_seed(0)
    model = timm.create_model(name, merged=False, **reduced(name)).eval()
    randomize_(model, std=0.02)
    c, h, w = model.pretrained_cfg['input_size']
    x = torch.randn(1, c, h, w)
    t0, t1 = (0.0, model.t) if model.t != 0 else (model.t, 40.0)
    with torch.no_grad():
        y = model(x) if not getattr(model, 'noisy_input', False) else model(x, generator=torch.Generator().manual_seed(0))
        feats = ldae_models.extract_features(model, x, layers=[0, -1], ts=[t0, t1], noisy_input=False)
    assert y.shape == (1, model.num_features) and torch.isfinite(y).all()
    assert set(feats) == {(0, t0), (-1, t0), (0, t1), (-1, t1)}
    assert all(f.shape[0] == 1 and f.dim() == 2 and torch.isfinite(f).all() for f in feats.values())
    if hasattr(model, 'merge'):
        vit = model.merge(t1)
        assert isinstance(vit, MergedViT) and vit.t == t1
        with torch.no_grad():
            assert rel_err(vit(x), model(x, t1)) < 1e-4
            merged = ldae_models.extract_features(vit, x, layers=[0, -1])
        assert rel_err(merged[(-1, t1)], feats[(-1, t1)]) < 1e-4


def test_tags_and_their_bytes():
    listed = timm.list_pretrained('dit*') + timm.list_pretrained('ddae*') + timm.list_pretrained('ldae*')
    assert all('.' in n for n in listed), listed  # no untagged duplicates of the tagged weights
    assert {'dit_xl_patch2_256.fb_in1k', 'ddae_ddpm_cifar10_32.google', 'ldae_vit_tiny_patch4_32.cifar10'} <= set(listed)
    assert has_weights('ldae_vit_tiny_patch4_32') and has_weights('dit_xl_patch2_512.fb_in1k_diffusers')
    assert not has_weights('ldae_vit_b') and not has_weights('dit_s_patch2_256')
    assert names_weights('ldae_vit_tiny_patch4_32.cifar10') and names_weights('local-dir:x')
    assert not names_weights('ldae_vit_tiny_patch4_32')
    assert pretrained_cfg_for('ldae_vit_b')['architecture'] == 'ldae_vit_base_patch16_256'  # an alias
    with pytest.raises(ValueError, match=r"unknown pretrained tag 'ldae_vit_tiny_patch4_32.imagenet'.*cifar10"):
        pretrained_cfg_for('ldae_vit_tiny_patch4_32.imagenet')
    with pytest.raises(ValueError, match='did you mean ldae_vit_tiny_patch4_32'):
        pretrained_cfg_for('ldae_vit_tiny_patch4_23')


def test_hubconf_exposes_every_model():
    import importlib.util
    import os
    spec = importlib.util.spec_from_file_location(
        'hubconf_under_test', os.path.join(os.path.dirname(os.path.dirname(__file__)), 'hubconf.py'))
    hub = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hub)
    assert all(callable(getattr(hub, n)) for n in ALL)


# -- timm's model contract, one small model of each family -------------------------------------------------------------

SMALL_UNET = dict(base_channels=32, channel_mult=(1, 2), num_res_blocks=1, norm_groups=8, attn_resolutions=(16,),
                  out_k=2)
FAMILIES = {  # name, constructor arguments
    'ldae merged': ('ldae_vit_tiny_patch4_32', dict(depth=2)),
    'ldae conditional': ('ldae_vit_tiny_patch4_32', dict(depth=2, merged=False)),
    'dit merged': ('dit_s_patch2_256', dict(depth=1, img_size=64)),
    'dit conditional': ('dit_s_patch2_256', dict(depth=1, img_size=64, merged=False)),
    'ddae unet': ('ddae_ddpm_cifar10_32', SMALL_UNET),
}


def _random_model(family):
    """The family's small model with random weights everywhere (the zero-initialised adaLN outputs too)."""
    name, kw = FAMILIES[family]
    torch.manual_seed(0)
    return randomize_(timm.create_model(name, **kw), std=0.05)


def _input(model, batch=2, seed=0):
    c, h, w = model.pretrained_cfg['input_size']
    return torch.randn(batch, c, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize('family', FAMILIES)
def test_created_on_meta_and_in_bfloat16(family):
    name, kw = FAMILIES[family]
    m = timm.create_model(name, device='meta', **kw)
    assert {p.device.type for p in m.parameters()} == {'meta'}
    m = timm.create_model(name, dtype=torch.bfloat16, **kw).eval()
    assert {p.dtype for p in m.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        y = m(_input(m).bfloat16())
    assert y.dtype == torch.bfloat16 and torch.isfinite(y.float()).all()
    m.reset_classifier(5)  # the new head where the model is, in its dtype
    assert m.get_classifier().weight.dtype == torch.bfloat16 and m(_input(m).bfloat16()).shape == (2, 5)
    assert 'device' not in m._model_args and 'dtype' not in m._model_args


def test_pretrained_weights_in_bfloat16_and_for_other_input_channels():
    ref = timm.create_model('ldae_vit_tiny_patch4_32.cifar10', pretrained=True).eval()
    x = _input(ref)
    m = timm.create_model('ldae_vit_tiny_patch4_32.cifar10', pretrained=True, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        assert rel_err(m(x.bfloat16()).float(), ref(x)) < 2e-2  # bf16 rounding
        gray = x[:, :1]
        one = timm.create_model('ldae_vit_tiny_patch4_32.cifar10', pretrained=True, in_chans=1).eval()
        # timm's adapt_input_conv sums the RGB filters: a gray image in 1 channel = the same image in 3
        assert one.patch_embed.proj.weight.shape[1] == 1 and rel_err(one(gray), ref(gray.expand(-1, 3, -1, -1))) < 1e-4
        four = timm.create_model('ldae_vit_tiny_patch4_32.cifar10', pretrained=True, in_chans=4, merged=False)
        assert four.patch_embed.proj.weight.shape[1] == 4 and not four.tokenizer.fitted  # RGB's PCA does not apply
        assert timm.create_model('ldae_vit_tiny_patch4_32.cifar10', pretrained=True, num_classes=7)(x).shape == (2, 7)


def test_a_unet_checkpoint_for_one_input_channel(tmp_path):
    from safetensors.torch import save_file
    torch.manual_seed(0)
    m = timm.create_model('ddae_ddpm_cifar10_32', **SMALL_UNET).eval()
    randomize_(m, std=0.05)
    path = tmp_path / 'unet.safetensors'
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(path))
    one = timm.create_model('ddae_ddpm_cifar10_32', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                            in_chans=1, **SMALL_UNET).eval()
    gray = _input(one)
    assert one.conv_in.weight.shape[1] == 1
    with torch.no_grad():  # the summed filters: a gray image in 1 channel = the same image in 3
        a = one.forward_intermediates(gray, noisy_input=False, indices=[1], intermediates_only=True)[0]
        b = m.forward_intermediates(gray.expand(-1, 3, -1, -1), noisy_input=False, indices=[1], intermediates_only=True)[0]
    assert rel_err(a, b) < 1e-5


@pytest.mark.parametrize('family', FAMILIES)
def test_forward_intermediates_final_is_forward_features_and_eval_is_deterministic(family):
    m = _random_model(family).eval()
    x = _input(m)
    with torch.no_grad():
        final, inter = m.forward_intermediates(x)
        assert torch.equal(final, m.forward_features(x)) and len(inter) == m.num_taps
        assert torch.equal(m(x), m(x))  # eval mode: the same input, the same features (a UNet's noisy input too)


def test_unet_timm_api_pool_size_global_pool_pruning_and_checkpointing():
    torch.manual_seed(0)
    m = timm.create_model('ddae_ddpm_cifar10_32', **SMALL_UNET)
    randomize_(m, std=0.05)
    x = _input(m)
    assert m.pretrained_cfg['pool_size'] == tuple(m.forward_features(x).shape[-2:]) == (16, 16)
    m.train()
    assert not torch.equal(m(x), m(x))  # training: fresh noise each call (augmentation)
    m.eval()
    maps = timm.create_model('ddae_ddpm_cifar10_32', global_pool='', **SMALL_UNET)
    assert maps(x).dim() == 4 and maps.pretrained_cfg['pool_size'] == (16, 16)
    with pytest.raises(ValueError, match='a linear head needs pooled features'):
        maps.reset_classifier(3)
    m.reset_classifier(0, '')
    assert m(x).shape == (2, 64, 16, 16)
    m.reset_classifier(0, 'avg')
    # gradient checkpointing: the same loss and gradients
    m.train()
    loss = m.forward(x, generator=torch.Generator().manual_seed(1)).square().sum()
    loss.backward()
    ref = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    m.zero_grad()
    m.set_grad_checkpointing(True)
    m.forward(x, generator=torch.Generator().manual_seed(1)).square().sum().backward()
    assert all(torch.allclose(p.grad, ref[n], rtol=1e-5, atol=1e-7) for n, p in m.named_parameters() if n in ref)
    m.set_grad_checkpointing(False)
    m.eval()
    # the extractor timm creates keeps the decoder up to its tap: every parameter takes part in forward (DDP needs no
    # find_unused_parameters), and the whole UNet is one argument away
    whole = timm.create_model('ddae_ddpm_cifar10_32', tap_only=False, **SMALL_UNET)
    assert m.num_taps == 2 and whole.num_taps == 4 and m.conv_out is None and whole.conv_out is not None
    m.train()
    m(x).square().sum().backward()
    assert all(p.grad is not None for p in m.parameters())
    whole.train()
    whole(x).square().sum().backward()
    assert any(p.grad is None for p in whole.parameters())  # its decoder past the tap takes no part
    # pruning really prunes: what follows the last kept tap is gone, the kept taps are unchanged
    m = whole.eval()
    before = sum(p.numel() for p in m.parameters())
    with torch.no_grad():
        keep = m.forward_intermediates(x, indices=[0, 1], intermediates_only=True)
    assert m.prune_intermediate_layers(indices=[0, 1]) == [0, 1]
    assert sum(p.numel() for p in m.parameters()) < before and m.num_taps == 2 and m.conv_out is None
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(keep, m.forward_intermediates(x, indices=[0, 1],
                                                                                   intermediates_only=True)))
    with pytest.raises(ValueError, match='pruned after its last tap'):
        m.denoise(x, 11)


@pytest.mark.parametrize('family', FAMILIES)
def test_torch_fx_and_torchscript(family):
    """The merged encoders (l-DAE and DiT) trace with torch.fx, give timm's fx features_only, and script with
    TorchScript, each equal to eager; the conditional encoders and the UNets refuse feature_cls='fx' naming why."""
    import warnings
    name, kw = FAMILIES[family]
    m = _random_model(family).eval()
    x = _input(m)
    if not getattr(m, 'fx_traceable', False):
        with pytest.raises(ValueError, match="feature_cls='fx' needs a model torch.fx can trace; .* cannot: "):
            timm.create_model(name, features_only=True, feature_cls='fx', **kw)
        return
    with torch.no_grad():
        ref = m(x)
        assert torch.equal(torch.fx.symbolic_trace(m)(x), ref)
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')  # TorchScript's deprecation notice
            assert torch.allclose(torch.jit.script(m)(x), ref, rtol=1e-5, atol=1e-6)
        feats = timm.create_model(name, features_only=True, feature_cls='fx', out_indices=(0,), **kw).eval()
        feats.load_state_dict({f'graph_module.{k}': v for k, v in m.state_dict().items()
                               if f'graph_module.{k}' in feats.state_dict()})
        expected = m.forward_intermediates(x, indices=[0], intermediates_only=True, output_fmt='NLC')
        assert torch.equal(feats(x)[0], expected[0])
    with pytest.raises(ValueError, match='expected'):  # eager calls still name a bad input
        m(torch.randn(1, x.shape[1], x.shape[2] + 1, x.shape[3]))


@pytest.mark.parametrize('family', FAMILIES)
def test_every_parameter_gets_a_gradient_and_checkpointing_changes_nothing(family):
    m = _random_model(family).train()
    x = _input(m)

    def grads(gen_seed=1):
        m.zero_grad()
        extra = {} if m.fixed_t else dict(generator=torch.Generator().manual_seed(gen_seed))
        m(x, **extra).square().sum().backward()
        return {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}

    ref = grads()
    assert set(ref) == {n for n, _ in m.named_parameters()}  # none left without a gradient (DDP as is)
    m.set_grad_checkpointing(True)
    got = grads()
    assert all(torch.allclose(got[n], ref[n], rtol=1e-5, atol=1e-7) for n in ref)


def test_dit_checkpoint_for_other_input_channels(tmp_path):
    from safetensors.torch import save_file
    kw = dict(depth=1, img_size=32)
    torch.manual_seed(0)
    m = timm.create_model('dit_s_patch2_256', merged=False, **kw).eval()
    randomize_(m, std=0.05)
    path = tmp_path / 'dit.safetensors'
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(path))
    one = timm.create_model('dit_s_patch2_256', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                            in_chans=1, **kw).eval()  # merged, from a conditional file, first conv adapted
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert one.patch_embed.proj.weight.shape[1] == 1 and rel_err(one(x), m(x.expand(-1, 4, -1, -1))) < 1e-4
