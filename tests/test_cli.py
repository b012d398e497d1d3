"""The command line: every command in-process, errors as one line with exit status 2, torch.hub from the checkout."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ldae_models.cli import build_parser, main
from conftest import randomize_, rel_err, smooth_images

REPO = Path(__file__).resolve().parents[1]
COMMANDS = ['features', 'denoise', 'demo', 'train', 'distill', 'extract', 'probe', 'linprobe', 'check-data', 'pack',
            'list', 'info', 'convert', 'export', 'timm']


@pytest.mark.parametrize('cmd', COMMANDS)
def test_help_of_each_command(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([cmd, '--help'])
    assert e.value.code == 0 and 'usage: ldae-models ' + cmd in capsys.readouterr().out


def test_every_command_is_in_the_parser():
    sub = next(a for a in build_parser()._actions if a.dest == 'command')
    assert set(sub.choices) == set(COMMANDS)


def test_python_m_and_the_console_script_entry_point():
    r = subprocess.run([sys.executable, '-m', 'ldae_models', 'list', 'ldae_vit_t*'], capture_output=True, text=True)
    assert r.returncode == 0 and 'ldae_vit_tiny_patch4_32.cifar10' in r.stdout and '[offline]' in r.stdout
    import tomllib
    target = tomllib.loads((REPO / 'pyproject.toml').read_text())['project']['scripts']['ldae-models']
    module, func = target.split(':')
    import importlib
    assert getattr(importlib.import_module(module), func) is main


@pytest.mark.parametrize('argv,message', [
    (['features', '--images', '/nonexistent/x.png'], 'image not found: /nonexistent/x.png'),
    (['features', '--model', 'ldae_vit_tiny_patch4_23'], "unknown model 'ldae_vit_tiny_patch4_23'; did you mean"),
    (['features', '--model', 'ldae_vit_tiny_patch4_32.imagenet'], "unknown pretrained tag"),
    (['features', '--model', 'ldae_vit_tiny_patch4_32', '--noisy-input'], 'fitted PCA tokenizer'),
    (['info', 'ldae_vit_nonexistent'], "unknown model 'ldae_vit_nonexistent'"),
    (['export', 'ldae_vit_tiny_patch4_32', '/tmp/x'], 'names no weights'),
    (['convert', 'a.pth', 'b.safetensors', '--model', 'ldae_vit_tiny_patch4_32', '--model-args', '{depth'],
     'not valid JSON'),
    (['denoise', '--checkpoint', '/nonexistent/model.safetensors', '--model', 'ldae_vit_tiny_patch4_32'],
     'weight file not found'),
    (['probe', '--model', 'ldae_vit_tiny_patch4_32'], '--data-root is required'),
    (['train', '--out', '/tmp/x'], '--data-root is required'),
    (['train', '--data-root', '/tmp', '--out', '/tmp/x', '--batch-size', '0'], '--batch-size must be >= 1, got 0'),
    (['train', '--data-root', '/tmp', '--out', '/tmp/x', '--batch-size', '-1'], '--batch-size must be >= 1, got -1'),
    (['train', '--data-root', '/tmp', '--out', '/tmp/x', '--ema', '1.5'], '--ema must be < 1, got 1.5'),
    (['train', '--data-root', '/tmp', '--out', '/tmp/x', '--log-every', '0'], '--log-every must be >= 1, got 0'),
    (['distill', '--data-root', '/tmp', '--out', '/tmp/x', '--batch-size', '0'], '--batch-size must be >= 1, got 0'),
    (['distill', '--data-root', '/tmp', '--out', '/tmp/x', '--student', 'resnet_nope'],
     "unknown student model 'resnet_nope': timm has no such model (did you mean"),
    (['linprobe', '--model', 'ldae_vit_tiny_patch4_32', '--data-root', '/tmp', '--out', '/tmp/x', '--batch-size', '0'],
     '--batch-size must be >= 1, got 0'),
    (['probe', '--model', 'ldae_vit_tiny_patch4_32', '--data-root', '/nonexistent'],
     '--data-root /nonexistent does not exist (--dataset folder reads an ImageFolder'),
    (['probe', '--model', 'ldae_vit_tiny_patch4_32', '--batch-size-features', '0'],
     'argument --batch-size-features: must be >= 1, got 0'),
    (['extract', '--model', 'ldae_vit_tiny_patch4_32', '--data-root', '{folder}', '--out', '{tmp}/x', '--ts', '-1'],
     't must be in [0, 1000)'),
    (['probe', '--model', 'ldae_vit_tiny_patch4_32', '--data-root', '{folder}', '--mode', 'grid', '--ts', '5000'],
     't must be in [0, 1000)'),
    (['probe', '--model', 'ldae_vit_tiny_patch4_32', '--data-root', '{folder}', '--layers', '12'],
     'layer 12 is out of range'),
    (['pack', '--data-root', '{folder}', '--out', '{tmp}/x.zip'], 'the file must end in .npz'),
])
def test_user_mistakes_get_one_line_and_status_2(argv, message, capsys, folder, tmp_path):
    argv = [a.replace('{folder}', str(folder)).replace('{tmp}', str(tmp_path)) for a in argv]
    try:
        assert main(argv) == 2
    except SystemExit as e:  # argparse's own refusal of a flag's value: usage and one line, status 2
        assert e.code == 2
    err = capsys.readouterr().err
    assert message in err and 'Traceback' not in err and len(err.strip().splitlines()) <= 3, err


def test_debug_shows_the_traceback():
    with pytest.raises(FileNotFoundError):
        main(['features', '--images', '/nonexistent/x.png', '--debug'])


def test_a_text_file_as_checkpoint_is_named(tmp_path, capsys):
    bad = tmp_path / 'model.pth'
    bad.write_text('not a checkpoint')
    assert main(['denoise', '--checkpoint', str(bad), '--model', 'ldae_vit_tiny_patch4_32']) == 2
    assert 'model.pth is not a readable checkpoint' in capsys.readouterr().err


# -- features -----------------------------------------------------------------------------------------------------------

def test_features_command_on_sample_images(tmp_path):
    pytest.importorskip('matplotlib')
    out = tmp_path / 'f.safetensors'
    assert main(['features', '--layers', '3', '11', '--ts', '0', '10', '--out', str(out)]) == 0
    feats = load_file(str(out))
    assert set(feats) == {'layer3_t0', 'layer11_t0', 'layer3_t10', 'layer11_t10'}
    assert all(v.shape == (3, 192) and torch.isfinite(v).all() for v in feats.values())


@pytest.mark.parametrize('model', ['ddae_ddpm_cifar10_32', 'dit_s_patch2_256'])
def test_features_and_info_for_every_family(model, tmp_path, capsys):
    img = tmp_path / 'x.png'
    from PIL import Image
    Image.fromarray((torch.rand(40, 48, 3) * 255).byte().numpy()).save(img)
    extra = ['--model-args', '{"depth": 1}'] if model.startswith('dit') else []
    if model.startswith('dit'):  # a DiT encoder takes latents: the message says how to give it images
        assert main(['features', '--model', model, '--images', str(img), *extra]) == 2
        assert 'SD-VAE latents' in capsys.readouterr().err
    else:
        assert main(['features', '--model', model, '--images', str(img), '--layers', '5', '--ts', '11', '21']) == 0
        assert 'layer   5 t     11: features (1, 256)' in capsys.readouterr().out
    assert main(['info', model]) == 0
    assert 'schedule: DDPMSchedule' in capsys.readouterr().out


# -- weights commands ------------------------------------------------------------------------------------------------------

@pytest.fixture
def ckpt(tmp_path):
    import ldae_models
    dae = ldae_models.create_dae('ldae_vit_tiny_patch4_32', depth=1)
    dae.fit_tokenizer([smooth_images(4, size=32)])
    randomize_(dae)
    path = tmp_path / 'train.pth'
    torch.save({'model': {'module.' + k: v for k, v in dae.state_dict().items()}, 'epoch': 1}, path)
    return dae, path


def test_list_and_info(capsys):
    assert main(['list']) == 0
    out = capsys.readouterr().out
    assert 'ldae_vit_large_patch16_256' in out and 'dit_xl_patch2_256.fb_in1k' in out and 'ddae_ddpm_cifar10_32' in out
    assert main(['info', 'ldae_vit_b']) == 0
    out = capsys.readouterr().out
    assert 'merged 85,841,664' in out and 'arXiv:2401.14404' in out and 'full LatentDAE 198,0' in out


def test_convert_training_checkpoint(ckpt, tmp_path, capsys):
    dae, path = ckpt
    dst = tmp_path / 'enc.safetensors'
    # through the model: DAE layout and DDP prefixes unwrapped, every key checked against the model
    assert main(['convert', str(path), str(dst), '--model', 'ldae_vit_tiny_patch4_32']) == 2  # 12 blocks, file has 1
    assert 'missing keys: blocks.1' in capsys.readouterr().err
    assert main(['convert', str(path), str(dst), '--model', 'ldae_vit_tiny_patch4_32', '--model-args',
                 '{"depth": 1}']) == 0
    enc = load_file(str(dst))
    assert enc.keys() == dae.encoder.state_dict().keys()
    assert all(torch.equal(enc[k], v) for k, v in dae.encoder.state_dict().items())
    raw = tmp_path / 'raw.safetensors'
    assert main(['convert', str(path), str(raw)]) == 0  # without a model: unwrapped and written as safetensors
    sd = load_file(str(raw))
    assert sd.keys() == dae.state_dict().keys() and all(torch.equal(sd[k], v) for k, v in dae.state_dict().items())


def test_convert_full_dae_to_half_precision(ckpt, tmp_path):
    """--dae keeps decoder and tokenizer; --dtype float16 halves the weights but keeps the PCA statistics in float32;
    the result loads back into create_dae (cast to float32) with a float16-sized error."""
    import ldae_models
    dae, path = ckpt
    assert main(['convert', str(path), str(tmp_path / 'x.safetensors'), '--dae']) == 2  # needs --model
    dst = tmp_path / 'dae16.safetensors'
    assert main(['convert', str(path), str(dst), '--dae', '--model', 'ldae_vit_tiny_patch4_32', '--model-args',
                 '{"depth": 1}', '--dtype', 'float16']) == 0
    sd = load_file(str(dst))
    assert sd.keys() == dae.state_dict().keys()
    assert sd['encoder.tokenizer.components'].dtype == sd['encoder.pos_embed'].dtype == torch.float32
    assert sd['final_layer.linear.weight'].dtype == torch.float16
    back = ldae_models.create_dae('ldae_vit_tiny_patch4_32', checkpoint=str(dst), depth=1).eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        noisy, _ = dae.eval().add_noise(x, 100, generator=torch.Generator().manual_seed(0))
        assert rel_err(back.denoise(noisy, 100), dae.denoise(noisy, 100)) < 5e-3  # float16 rounding of the weights


def test_export_command_loads_with_timm(ckpt, tmp_path):
    import timm
    dae, path = ckpt
    out = tmp_path / 'export'
    assert main(['export', 'ldae_vit_tiny_patch4_32', str(out), '--t', '20', '--checkpoint', str(path),
                 '--model-args', '{"depth": 1}']) == 0
    vit = timm.create_model(f'local-dir:{out}', pretrained=True).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert rel_err(vit(x), dae.encoder.eval()(x, 20)) < 1e-5


def test_torch_hub_local():
    model = torch.hub.load(str(REPO), 'ldae_vit_tiny_patch4_32', source='local', pretrained=False)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 192)
    enc = torch.hub.load(str(REPO), 'ldae_vit_l', source='local', pretrained=False, merged=False, depth=2)
    assert enc.embed_dim == 1024 and len(enc.blocks) == 2


def test_a_closed_pipe_ends_quietly(monkeypatch, capsys):
    """`ldae-models list | head`: the reader goes away; the command stops with status 0 and no error message."""
    import io

    class Closed(io.StringIO):
        def write(self, s):
            raise BrokenPipeError(32, 'Broken pipe')

    monkeypatch.setattr(sys, 'stdout', Closed())
    assert main(['list']) == 0
    assert 'error' not in capsys.readouterr().err


def test_probe_defaults_agree_with_the_readme():
    """No penalty by default, as MAE's probe and the README's numbers."""
    args = build_parser().parse_args(['probe', '--model', 'ldae_vit_tiny_patch4_32'])
    assert args.weight_decay == 0.0 and args.solver == 'lbfgs' and args.mode == 'fast'
