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
