"""The command line's features job and torch.hub loading from the local checkout."""
import os
import subprocess
import sys

import pytest
import torch
from conftest import rel_err
from safetensors.torch import load_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_features_command_on_sample_images(tmp_path):
    pytest.importorskip('matplotlib')
    out = tmp_path / 'f.safetensors'
    from ldae_models.cli import main
    assert main(['features', '--layers', '3', '11', '--ts', '0', '10', '--out', str(out)]) == 0
    feats = load_file(str(out))
    assert set(feats) == {'layer3_t0', 'layer11_t0', 'layer3_t10', 'layer11_t10'}
    assert all(v.shape == (3, 192) and torch.isfinite(v).all() for v in feats.values())


def test_features_command_merged_default(tmp_path, capsys):
    pytest.importorskip('matplotlib')
    from ldae_models.cli import main
    assert main(['features']) == 0
    assert 'features (3, 192)' in capsys.readouterr().out


def test_noise_without_fitted_tokenizer_is_explained():
    pytest.importorskip('matplotlib')
    from ldae_models.cli import main
    with pytest.raises(SystemExit, match='fitted PCA tokenizer'):
        main(['features', '--model', 'ldae_vit_tiny_patch4_32', '--noise'])  # no tag: random weights


def test_python_m_help():
    r = subprocess.run([sys.executable, '-m', 'ldae_models', 'features', '--help'], capture_output=True, text=True)
    assert r.returncode == 0 and '--layers' in r.stdout


def test_missing_image_is_named(tmp_path):
    from ldae_models.cli import main
    with pytest.raises(SystemExit, match='image not found'):
        main(['features', '--images', str(tmp_path / 'nope.png')])


def test_torch_hub_local():
    model = torch.hub.load(REPO, 'ldae_vit_tiny_patch4_32', source='local', pretrained=False)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 192)
    enc = torch.hub.load(REPO, 'ldae_vit_l', source='local', pretrained=False, merged=False, depth=2)
    assert enc.embed_dim == 1024 and len(enc.blocks) == 2


# -- weights commands ----------------------------------------------------------------------------------

@pytest.fixture
def ckpt(tmp_path):
    import ldae_models
    from conftest import randomize_, smooth_images
    dae = ldae_models.create_dae('ldae_vit_tiny_patch4_32', depth=1)
    dae.fit_tokenizer([smooth_images(4, size=32)])
    randomize_(dae)
    path = tmp_path / 'train.pth'
    torch.save({'model': {'module.' + k: v for k, v in dae.state_dict().items()}, 'epoch': 1}, path)
    return dae, path


def test_list_and_info(capsys):
    from ldae_models.cli import main
    assert main(['list']) == 0
    out = capsys.readouterr().out
    assert 'ldae_vit_large_patch16_256' in out and 'ldae_vit_tiny_patch4_32' in out
    assert main(['info', 'ldae_vit_b']) == 0
    out = capsys.readouterr().out
    assert 'merged 85,841,664' in out and 'arXiv:2401.14404' in out and 'full DAE 198,0' in out
    with pytest.raises(SystemExit, match='Unknown model'):
        main(['info', 'ldae_vit_nonexistent'])


def test_convert_training_checkpoint(ckpt, tmp_path):
    import ldae_models
    from ldae_models.cli import main
    dae, path = ckpt
    dst = tmp_path / 'enc.safetensors'
    # through the model: DAE layout and DDP prefixes unwrapped, every key checked against the model
    with pytest.raises(ldae_models.CheckpointMismatchError, match='missing keys: blocks.1'):
        main(['convert', str(path), str(dst), '--model', 'ldae_vit_tiny_patch4_32'])  # 12 blocks, file has 1
    assert main(['convert', str(path), str(dst), '--model', 'ldae_vit_tiny_patch4_32', '--model-args',
                 '{"depth": 1}']) == 0
    enc = load_file(str(dst))
    assert enc.keys() == dae.encoder.state_dict().keys()
    assert all(torch.equal(enc[k], v) for k, v in dae.encoder.state_dict().items())
    # without a model: only unwrapped and written as safetensors
    raw = tmp_path / 'raw.safetensors'
    assert main(['convert', str(path), str(raw)]) == 0
    sd = load_file(str(raw))
    assert sd.keys() == dae.state_dict().keys() and all(torch.equal(sd[k], v) for k, v in dae.state_dict().items())
    with pytest.raises(SystemExit, match='not valid JSON'):
        main(['convert', str(path), str(dst), '--model', 'ldae_vit_tiny_patch4_32', '--model-args', '{depth'])


def test_convert_full_dae_to_half_precision(ckpt, tmp_path):
    """--dae keeps decoder and tokenizer; --dtype float16 halves the weights but keeps the PCA statistics in
    float32; the result loads back into create_dae (cast to float32) with a float16-sized error."""
    import ldae_models
    from ldae_models.cli import main
    dae, path = ckpt
    with pytest.raises(SystemExit, match='--dae needs --model'):
        main(['convert', str(path), str(tmp_path / 'x.safetensors'), '--dae'])
    dst = tmp_path / 'dae16.safetensors'
    assert main(['convert', str(path), str(dst), '--dae', '--model', 'ldae_vit_tiny_patch4_32', '--model-args',
                 '{"depth": 1}', '--dtype', 'float16']) == 0
    sd = load_file(str(dst))
    assert sd.keys() == dae.state_dict().keys()
    assert sd['encoder.tokenizer.components'].dtype == sd['encoder.pos_embed'].dtype == torch.float32
    assert sd['final_layer.linear.weight'].dtype == torch.float16
    assert torch.equal(sd['encoder.tokenizer.components'], dae.tokenizer.components)
    back = ldae_models.create_dae('ldae_vit_tiny_patch4_32', checkpoint=str(dst), depth=1).eval()
    assert back.final_layer.linear.weight.dtype == torch.float32
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        noisy, _ = dae.eval().add_noise(x, 100, generator=torch.Generator().manual_seed(0))
        assert rel_err(back.denoise(noisy, 100), dae.denoise(noisy, 100)) < 5e-3  # float16 rounding of the weights


def test_export_command_loads_with_timm(ckpt, tmp_path):
    import timm
    from ldae_models.cli import main
    dae, path = ckpt
    with pytest.raises(SystemExit, match='names no weights'):
        main(['export', 'ldae_vit_tiny_patch4_32', str(tmp_path / 'x')])
    out = tmp_path / 'export'
    assert main(['export', 'ldae_vit_tiny_patch4_32', str(out), '--t', '20', '--checkpoint', str(path),
                 '--model-args', '{"depth": 1}']) == 0
    vit = timm.create_model(f'local-dir:{out}', pretrained=True).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = dae.encoder.eval()(x, 20)
        assert ((vit(x) - ref).abs().max() / ref.abs().max()) < 1e-5


@pytest.mark.parametrize('cmd', ['list', 'info', 'convert', 'export', 'features'])
def test_help_of_each_command(cmd):
    r = subprocess.run([sys.executable, '-m', 'ldae_models', cmd, '--help'], capture_output=True, text=True)
    assert r.returncode == 0 and 'usage' in r.stdout


def test_console_script():
    import shutil
    exe = shutil.which('ldae-models') or shutil.which('ldae-models', path=os.path.dirname(sys.executable))
    if exe is None:
        pytest.skip('ldae-models is not installed as a console script (running from a source tree)')
    r = subprocess.run([exe, 'list'], capture_output=True, text=True)
    assert r.returncode == 0 and 'ldae_vit_tiny_patch4_32' in r.stdout
