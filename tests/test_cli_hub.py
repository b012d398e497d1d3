"""The command line's features job and torch.hub loading from the local checkout."""
import os
import subprocess
import sys

import pytest
import torch
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
        main(['features', '--noise'])


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
