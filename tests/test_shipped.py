"""The checkpoint shipped inside the package (ldae_vit_tiny_patch4_32.cifar10): offline, checked, and trained."""
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file

import ldae_models
from ldae_models.hub.sources import resolve_file
from ldae_models.hub import CheckpointError, ChecksumError, WeightSource, cfg_sha256, sha256_of, weight_source
from conftest import rel_err, smooth_images

TAG = 'ldae_vit_tiny_patch4_32.cifar10'


@pytest.fixture(scope='module')
def cfg():
    return timm.models.get_pretrained_cfg(TAG).to_dict()


def test_tag_is_packaged_and_default(cfg):
    from ldae_models.hub.sources import resolve_file
    assert cfg['file'] == 'ldae_models/weights/ldae_vit_tiny_patch4_32.cifar10.safetensors'  # the same everywhere
    path = resolve_file(cfg['file'])
    assert path.is_file() and path.parent == Path(ldae_models.__file__).parent / 'weights'
    assert cfg_sha256(cfg) == sha256_of(path)
    assert cfg['license'] == 'apache-2.0' and cfg['num_classes'] == 0
    # the architecture's default tag: the plain name with pretrained=True loads the same weights
    assert timm.models.get_pretrained_cfg('ldae_vit_tiny_patch4_32').to_dict()['file'] == cfg['file']
    assert path.with_suffix('.md').is_file()  # its model card


def test_package_stays_under_30_mb():
    root = Path(ldae_models.__file__).parent
    size = sum(p.stat().st_size for p in root.rglob('*') if p.is_file() and '__pycache__' not in p.parts)
    assert size < 30 * 2 ** 20, f'{size / 2 ** 20:.1f} MiB'


def test_encoder_loads_offline_merged_equals_conditional():
    vit = timm.create_model(TAG, pretrained=True).eval()
    enc = timm.create_model(TAG, pretrained=True, merged=False).eval()
    assert isinstance(vit, timm.models.VisionTransformer) and vit.t == 10
    x = smooth_images(4, size=32, seed=3)
    with torch.no_grad():
        f = vit(x)
        assert f.shape == (4, 192) and torch.isfinite(f).all()
        assert rel_err(f, enc(x, 10)) < 1e-4
        # trained: unlike the adaLN-Zero initialisation, the blocks are no longer the identity
        first, last = enc.forward_intermediates(x, t=10, indices=[0, 11], intermediates_only=True)
        assert rel_err(first, last) > 0.1
    plain = timm.create_model('ldae_vit_tiny_patch4_32', pretrained=True).eval()
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), vit.state_dict().values()))


def test_full_dae_denoises():
    """The shipped DAE removes most of the latent noise it was trained on, on synthetic images it never saw.

    Measured in the d-dimensional PCA latent, where l-DAE adds its noise (its input keeps only the first d
    components, so the pixel error at small t is dominated by the discarded ones, noisy or not).
    """
    dae = ldae_models.create_dae(TAG, pretrained=True).eval()
    assert dae.tokenizer.fitted and dae.final_layer.linear.weight.abs().sum() > 0
    x = smooth_images(16, size=32, seed=5)
    lat = dae.tokenizer.encode
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for t in (500, 800):
            noisy, _ = dae.add_noise(x, t, generator=g)
            err_noisy = (lat(noisy) - lat(x)).square().mean()
            err_denoised = (lat(dae.denoise(noisy, t)) - lat(x)).square().mean()
            assert err_denoised < 0.6 * err_noisy, (t, err_denoised.item(), err_noisy.item())


def test_overlay_file_is_not_checked_against_the_tags_sha256(cfg, tmp_path):
    """Your own file on the tag's architecture loads; a damaged copy given with the tag's sha256 is refused."""
    sd = load_file(str(resolve_file(cfg['file'])))
    other = tmp_path / 'other.safetensors'
    from safetensors.torch import save_file
    key = 'encoder.patch_embed.proj.bias'
    save_file({k: v * 0.5 if k == key else v for k, v in sd.items()}, str(other))
    m = timm.create_model(TAG, pretrained=True, merged=False, pretrained_cfg_overlay=dict(file=str(other)))
    assert torch.equal(m.patch_embed.proj.bias, sd[key].float() * 0.5)
    damaged = tmp_path / 'damaged.safetensors'
    data = resolve_file(cfg['file']).read_bytes()
    damaged.write_bytes(data[:len(data) // 2])  # truncated
    with pytest.raises(CheckpointError, match='truncated or corrupt'):
        timm.create_model(TAG, pretrained=True, pretrained_cfg_overlay=dict(file=str(damaged)))
    # the tag's own bytes are held to its sha256: a damaged packaged file is refused before it is read
    flipped = tmp_path / 'flipped.safetensors'
    flipped.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(ChecksumError, match='sha256 mismatch'):
        WeightSource('file', str(flipped), sha256=cfg_sha256(cfg)).fetch()
    assert flipped.exists()  # a file of the user's is reported, not deleted
    assert weight_source(cfg).fetch() == resolve_file(cfg['file'])


def test_create_dae_errors_name_the_problem():
    with pytest.raises(ValueError, match='unknown pretrained tag'):
        ldae_models.create_dae('ldae_vit_tiny_patch4_32.imagenet', pretrained=True)
    with pytest.raises(CheckpointError, match='weight file not found'):
        ldae_models.create_dae('ldae_vit_tiny_patch4_32', checkpoint='/nonexistent/model.safetensors')
    with pytest.raises(ldae_models.CheckpointError, match='no pretrained weights exist'):
        ldae_models.create_dae('ldae_vit_base_patch16_256', pretrained=True, depth=1)
    with pytest.raises(ldae_models.CheckpointMismatchError, match='does not hold the full DAE'):
        ldae_models.create_dae(TAG, pretrained=True, depth=2)


def test_demo_command_offline(tmp_path, capsys):
    """The README's main job: shipped model, matplotlib's photos, features file and denoising figure."""
    pytest.importorskip('matplotlib')
    from PIL import Image
    from ldae_models.cli import main
    assert main(['demo', '--out-dir', str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert 'pretrained weights' in out and 'wrote' in out
    mses = [line.split('MSE noised ')[1].split(' -> denoised ') for line in out.splitlines() if 'MSE noised' in line]
    assert len(mses) == 3 and all(float(b) < 0.7 * float(a) for a, b in mses)  # the figure shows denoising helped
    feats = load_file(str(tmp_path / 'features.safetensors'))
    assert set(feats) == {f'layer{b}_t{t}' for b in (5, 11) for t in (0, 10, 80)}
    assert all(v.shape == (3, 192) and torch.isfinite(v).all() for v in feats.values())
    assert not torch.allclose(feats['layer5_t0'], feats['layer11_t0'])  # trained: layers differ
    with Image.open(tmp_path / 'denoising.png') as im:
        assert im.size[0] > im.size[1] / 3 > 100  # 3 rows of (clean, noisy, denoised), enlarged


def test_a_failed_demo_writes_nothing(tmp_path, capsys):
    pytest.importorskip('matplotlib')
    from ldae_models.cli import main
    assert main(['demo', '--out-dir', str(tmp_path), '--t', '-1']) == 2
    assert 't must be in [0, 1000)' in capsys.readouterr().err and list(tmp_path.iterdir()) == []


def test_torch_hub_loads_the_shipped_weights():
    import os
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    m = torch.hub.load(repo, 'ldae_vit_tiny_patch4_32', source='local', pretrained=True)
    ref = timm.create_model(TAG, pretrained=True)
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), ref.state_dict().values()))
