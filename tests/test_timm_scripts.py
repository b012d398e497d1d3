"""timm's scripts as clients: the calls timm's ``train.py`` makes (``create_model`` with its keyword arguments, its
data pipeline, ``create_optimizer_v2`` with layer decay, ``ModelEmaV3``, ``CheckpointSaver`` and ``resume_checkpoint``)
on every family, its checkpoints read back as pretrained weights, the regularisation flags doing what timm's ViT does
with them, and the UNet's side of timm's contract (features_only indices, layer groups, meta device, torch.fx)."""
import argparse
import warnings

import pytest
import timm
import torch
from timm.data import create_transform, resolve_data_config
from timm.optim import create_optimizer_v2
from timm.models import resume_checkpoint
from timm.utils import CheckpointSaver, ModelEmaV3
from torchvision.datasets import ImageFolder

import ldae_models  # noqa: F401  (registers the models)
from conftest import randomize_

SMALL_UNET = dict(base_channels=32, channel_mult=(1, 2), num_res_blocks=1, norm_groups=8, out_k=2)


def tiny_vae(tmp_path):
    """A random diffusers AutoencoderKL saved as a folder: what --model-kwargs vae=PATH loads."""
    diffusers = pytest.importorskip('diffusers')
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8, 8),
                                  down_block_types=('DownEncoderBlock2D',) * 4,
                                  up_block_types=('UpDecoderBlock2D',) * 4, norm_num_groups=4, layers_per_block=1)
    vae.save_pretrained(tmp_path / 'vae')
    return str(tmp_path / 'vae')


def family_kwargs(family, tmp_path):
    """(name, create_model kwargs as timm's train.py passes them with --model-kwargs) of each family."""
    common = dict(in_chans=3, num_classes=2, drop_rate=0.1)
    return {
        'ldae': ('ldae_vit_tiny_patch4_32.cifar10', dict(pretrained=True, drop_path_rate=0.1, **common)),
        'dit': ('dit_s_patch2_256', dict(vae=tiny_vae(tmp_path), depth=1, img_size=2, drop_path_rate=0.1, **common)),
        'ddae': ('ddae_ddpm_cifar10_32', dict(drop_path_rate=0.1, **SMALL_UNET, **common)),
    }[family]


@pytest.mark.parametrize('family', ['ldae', 'dit', 'ddae'])
def test_timms_fine_tuning_recipe_on_each_family(family, folder, tmp_path):
    name, kwargs = family_kwargs(family, tmp_path)
    model = timm.create_model(name, **kwargs)
    cfg = resolve_data_config(model=model)  # what train.py feeds: an image cfg (a DiT with a VAE: RGB images)
    assert cfg['input_size'][0] == 3 and len(cfg['mean']) == 3
    data = ImageFolder(str(folder / 'train'), transform=create_transform(**cfg, is_training=True))
    loader = torch.utils.data.DataLoader(data, batch_size=8, shuffle=True)
    opt = create_optimizer_v2(model, 'adamw', lr=1e-3, weight_decay=0.05, layer_decay=0.75)
    assert len({g['lr_scale'] for g in opt.param_groups}) > 2  # layer groups from the model's group_matcher
    ema = ModelEmaV3(model, decay=0.9)
    model.train()
    for step, (x, y) in enumerate(loader):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema.update(model, step=step)
        if step == 2:
            break
    assert torch.isfinite(loss)
    (tmp_path / 'out').mkdir()
    saver = CheckpointSaver(model, opt, args=argparse.Namespace(model=name, lr=1e-3), model_ema=ema,
                            checkpoint_dir=str(tmp_path / 'out'), recovery_dir=str(tmp_path / 'out'))
    saver.save_checkpoint(epoch=0, metric=50.0)
    last = tmp_path / 'out' / 'last.pth.tar'
    again = timm.create_model(name, **{**kwargs, 'pretrained': False})
    resume_checkpoint(again, str(last), optimizer=create_optimizer_v2(again, 'adamw', lr=1e-3, weight_decay=0.05,
                                                                      layer_decay=0.75))
    # timm's checkpoint (its arguments an argparse.Namespace) as pretrained weights: --pretrained-path / file=
    loaded = timm.create_model(name, **{**kwargs, 'pretrained': True},
                               pretrained_cfg_overlay=dict(file=str(last))).eval()
    model.eval()
    x = next(iter(loader))[0][:2]
    with torch.no_grad():
        assert torch.allclose(loaded(x), model(x), atol=1e-5) and torch.allclose(again.eval()(x), model(x), atol=1e-5)


def test_a_fine_tuned_merged_encoder_loads_into_the_merged_model(tmp_path):
    """A plain-ViT state dict with a head (what fine-tuning a merged encoder writes) loads straight into the merged
    model, head included; a file holding something else is still refused key by key."""
    from safetensors.torch import save_file
    from ldae_models.hub import CheckpointMismatchError
    tuned = randomize_(timm.create_model('ldae_vit_tiny_patch4_32', depth=2, num_classes=3), std=0.05).eval()
    path = tmp_path / 'tuned.safetensors'
    save_file({k: v.contiguous() for k, v in tuned.state_dict().items()}, str(path))
    back = timm.create_model('ldae_vit_tiny_patch4_32', depth=2, num_classes=3, pretrained=True,
                             pretrained_cfg_overlay=dict(file=str(path))).eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(back(x), tuned(x))
    fresh_head = timm.create_model('ldae_vit_tiny_patch4_32', depth=2, num_classes=5, pretrained=True,
                                   pretrained_cfg_overlay=dict(file=str(path)))
    assert fresh_head(x).shape == (2, 5)  # another number of classes: a new head, the rest loaded
    with pytest.raises(CheckpointMismatchError, match='missing keys: blocks.2'):
        timm.create_model('ldae_vit_tiny_patch4_32', depth=3, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))


@pytest.mark.parametrize('merged', [True, False])
def test_timms_regularisation_flags_act_in_training_only(merged):
    """drop_rate, drop_path_rate, attn_drop_rate, proj_drop_rate, pos_drop_rate, patch_drop_rate: each changes the
    training-mode output (as in timm's ViT) and none the eval-mode output; the merged ViT gets the same flags."""
    x = torch.randn(4, 3, 32, 32)
    for flag in ('drop_rate', 'drop_path_rate', 'attn_drop_rate', 'proj_drop_rate', 'pos_drop_rate', 'patch_drop_rate'):
        torch.manual_seed(0)
        m = randomize_(timm.create_model('ldae_vit_tiny_patch4_32', merged=merged, depth=2, **{flag: 0.5}), std=0.05)
        with torch.no_grad():
            m.train()
            assert not torch.equal(m(x), m(x)), flag
            m.eval()
            assert torch.equal(m(x), m(x)), flag
    plain = timm.create_model('ldae_vit_tiny_patch4_32', merged=merged, depth=2).train()
    with torch.no_grad():
        assert torch.equal(plain(x), plain(x))  # without them, training mode is deterministic
    with pytest.raises(ValueError, match='drop_block_rate=0.1: DropBlock is for convolutional feature maps'):
        timm.create_model('ldae_vit_tiny_patch4_32', merged=merged, drop_block_rate=0.1)


def test_the_unet_takes_timms_flags_or_names_why_not():
    x = torch.randn(2, 3, 32, 32)
    m = randomize_(timm.create_model('ddae_ddpm_cifar10_32', noisy_input=False, drop_path_rate=0.5, attn_drop_rate=0.5,
                                     proj_drop_rate=0.5, drop_rate=0.5, **SMALL_UNET), std=0.05)
    with torch.no_grad():
        assert not torch.equal(m.train()(x), m(x)) and torch.equal(m.eval()(x), m(x))
    for flag in ('pos_drop_rate', 'patch_drop_rate', 'drop_block_rate'):
        with pytest.raises(ValueError, match=f'{flag}=0.1: the UNet has no'):
            timm.create_model('ddae_ddpm_cifar10_32', **{flag: 0.1}, **SMALL_UNET)


def test_the_unets_features_only_layer_groups_meta_device_and_fx():
    kw = dict(SMALL_UNET, out_k=3)
    last = timm.create_model('ddae_ddpm_cifar10_32', features_only=True, out_indices=(-1,), **kw)
    assert last.out_indices == (2,)  # negative: counted over the blocks kept up to the tap
    assert timm.create_model('ddae_ddpm_cifar10_32', features_only=True, out_indices=2, **kw).out_indices == (1, 2)
    m = timm.create_model('ddae_ddpm_cifar10_32', **kw)
    from timm.models import group_parameters
    groups = group_parameters(m, m.group_matcher())
    assert len(groups) > 5 and m.no_weight_decay() == set()
    with torch.device('meta'):  # an eval-mode forward on the meta device (timm's cfg tests)
        assert timm.create_model('ddae_ddpm_cifar10_32', **kw).eval()(torch.randn(1, 3, 32, 32)).shape == (1, 32)
    clean = randomize_(timm.create_model('ddae_ddpm_cifar10_32', noisy_input=False, **kw), std=0.05).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(torch.fx.symbolic_trace(clean)(x), clean(x))
        feats = timm.create_model('ddae_ddpm_cifar10_32', noisy_input=False, features_only=True, feature_cls='fx',
                                  out_indices=(0, 2), **kw)
        assert [f.shape[1] for f in feats(x)] == [64, 32]
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            assert torch.allclose(torch.jit.trace(clean, x)(x), clean(x), atol=1e-6)
    with pytest.raises(ValueError, match='noisy input is drawn from a torch.Generator.*noisy_input=False'):
        timm.create_model('ddae_ddpm_cifar10_32', features_only=True, feature_cls='fx', **kw)


def test_cfg_conventions_of_timms_models():
    """Without pretrained the model carries its default tag's cfg (as timm's do); an alias has a cfg; the shipped
    file is named the same way on every machine; a DiT's latent weights fed pixels are said, not silent."""
    cfg = timm.create_model('ldae_vit_tiny_patch4_32').pretrained_cfg
    assert cfg['tag'] == 'cifar10' and cfg['license'] == 'apache-2.0'
    assert cfg['file'] == 'ldae_models/weights/ldae_vit_tiny_patch4_32.cifar10.safetensors'
    alias = timm.models.get_pretrained_cfg('ldae_vit_b')
    assert alias is not None and alias.input_size == (3, 256, 256)
    dit = timm.create_model('dit_s_patch2_256', in_chans=3, depth=1)  # timm's train.py always passes in_chans
    assert dit.pretrained_cfg['input_size'] == (3, 32, 32) and dit.pretrained_cfg['mean'] == (0.5, 0.5, 0.5)
