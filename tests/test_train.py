"""The training script and the probe command on synthetic ImageFolder data, on the CPU."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file

import ldae_models  # noqa: F401  (registers the models)
from ldae_models import train as T

TINY_ARGS = json.dumps(dict(img_size=16, embed_dim=32, depth=2, num_heads=2, latent_dim=6))
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
    """Two colour classes of 16x16 images: train (20 each) and test (8 each)."""
    root = tmp_path_factory.mktemp('imgs')
    g = torch.Generator().manual_seed(0)
    for split, n in (('train', 20), ('test', 8)):
        for c in range(2):
            d = root / split / f'class{c}'
            d.mkdir(parents=True)
            for i in range(n):
                x = torch.rand(16, 16, 3, generator=g) * 90
                x[..., 0 if c == 0 else 2] += 150
                Image.fromarray(x.clamp(0, 255).byte().numpy()).save(d / f'{i}.png')
    return root


def base_args(folder, out, *extra):
    return ['--data-dir', str(folder), '--out', str(out), '--model-args', TINY_ARGS, '--batch-size', '8',
            '--epochs', '2', '--warmup-epochs', '1', '--workers', '0', '--log-every', '1', '--ckpt-every', '2',
            '--ema', '0.9', '--pca-images', '40', '--quiet', *extra]


def run_script(args, env=None, module='ldae_models.train', wrapper=None):
    cmd = [sys.executable] + (['-c', wrapper] if wrapper else ['-m', module]) + args
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env={**os.environ, **(env or {})})


def test_training_steps_and_loadable_result(folder, tmp_path):
    res = T.train(T.build_parser().parse_args(base_args(folder, tmp_path / 'run')))
    assert res['step'] == 10 == res['total_steps']  # 40 images / 8 per step x 2 epochs
    logs = [json.loads(l) for l in (tmp_path / 'run/log.jsonl').read_text().splitlines()]
    assert len(logs) == 10 and all(l['loss'] > 0 for l in logs)
    enc = timm.create_model('ldae_vit_tiny_patch4_32', pretrained=True, merged=False, img_size=16, embed_dim=32,
                            depth=2, num_heads=2, latent_dim=6,
                            pretrained_cfg_overlay=dict(file=str(tmp_path / 'run/model.safetensors')))
    assert enc.tokenizer.fitted and enc.tokenizer.num_patches.item() == 40 * 16
    back = timm.create_model(f'local-dir:{tmp_path / "run/encoder"}', pretrained=True)
    assert back(torch.randn(1, 3, 16, 16)).shape == (1, 32)
    ckpt = torch.load(tmp_path / 'run' / T.CKPT_NAME, weights_only=True)  # plain containers and tensors only
    assert ckpt['step'] == 10 and 'ema' in ckpt and 'optimizer' in ckpt
    # the denoising figure of the trained DAE (clean / noisy / denoised)
    from ldae_models.cli import main
    img = next((folder / 'test' / 'class0').iterdir())
    assert main(['denoise', '--checkpoint', str(tmp_path / 'run/model.safetensors'), '--model-args', TINY_ARGS,
                 '--images', str(img), str(img), '--out', str(tmp_path / 'fig.png')]) == 0
    from PIL import Image as _I
    assert _I.open(tmp_path / 'fig.png').size == (3 * 128 + 4 * 2, 2 * 128 + 3 * 2)


def test_bf16_autocast_on_cpu(folder, tmp_path):
    """--amp bf16 runs the step under CPU autocast (faster on CPUs with AVX512-BF16/AMX); the loss stays close."""
    args = base_args(folder, tmp_path / 'a', '--max-steps', '2', '--ema', '0')
    fp32 = T.train(T.build_parser().parse_args(args))['last']['loss']
    bf16 = T.train(T.build_parser().parse_args(base_args(folder, tmp_path / 'b', '--max-steps', '2', '--ema', '0',
                                                         '--amp', 'bf16')))['last']['loss']
    assert bf16 != fp32 and abs(bf16 - fp32) < 0.05 * fp32, (bf16, fp32)  # bf16 matmuls: close, not equal


_KILLER = '''
import os, signal, sys
import ldae_models.train as T
orig, n = T.save_checkpoint, [0]
def save_then_die(path, state):
    orig(path, state)
    n[0] += 1
    if n[0] == int(os.environ["KILL_AFTER_SAVES"]):
        os.kill(os.getpid(), signal.SIGKILL)  # a hard kill, right after a checkpoint
T.save_checkpoint = save_then_die
sys.exit(T.main(sys.argv[1:]))
'''


def test_killed_run_resumes_to_the_uninterrupted_state(folder, tmp_path):
    full = run_script(base_args(folder, tmp_path / 'full'))
    assert full.returncode == 0, full.stderr
    killed = run_script(base_args(folder, tmp_path / 'cut'), env={'KILL_AFTER_SAVES': '2'}, wrapper=_KILLER)
    assert killed.returncode == -9
    assert torch.load(tmp_path / 'cut' / T.CKPT_NAME, weights_only=True)['step'] == 4
    assert not (tmp_path / 'cut/model.safetensors').exists()
    resumed = run_script(base_args(folder, tmp_path / 'cut', '--resume'))
    assert resumed.returncode == 0, resumed.stderr
    assert '"event": "resumed", "step": 4' in resumed.stdout
    a = torch.load(tmp_path / 'full' / T.CKPT_NAME, weights_only=True)
    b = torch.load(tmp_path / 'cut' / T.CKPT_NAME, weights_only=True)
    for part in ('model', 'ema'):
        assert a[part].keys() == b[part].keys() and all(torch.equal(a[part][k], b[part][k]) for k in a[part])
    sa, sb = a['optimizer']['state'], b['optimizer']['state']
    assert all(torch.equal(sa[i]['exp_avg'], sb[i]['exp_avg']) for i in sa)
    fa, fb = load_file(str(tmp_path / 'full/model.safetensors')), load_file(str(tmp_path / 'cut/model.safetensors'))
    assert all(torch.equal(fa[k], fb[k]) for k in fa)


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def test_two_processes_equal_one_with_the_same_global_batch(folder, tmp_path):
    one = run_script(base_args(folder, tmp_path / 'one'))
    assert one.returncode == 0, one.stderr
    cmd = ['-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_addr', '127.0.0.1', '--master_port',
           str(_free_port()), '-m', 'ldae_models.train'] + base_args(folder, tmp_path / 'two')
    two = subprocess.run([sys.executable] + cmd, capture_output=True, text=True, cwd=REPO,
                         env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = load_file(str(tmp_path / 'one/model.safetensors')), load_file(str(tmp_path / 'two/model.safetensors'))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6), k


def test_gradient_accumulation_matches_one_big_batch(folder, tmp_path):
    T.train(T.build_parser().parse_args(base_args(folder, tmp_path / 'a', '--max-steps', '3')))
    T.train(T.build_parser().parse_args(base_args(folder, tmp_path / 'b', '--max-steps', '3', '--accum-steps', '2')))
    a, b = load_file(str(tmp_path / 'a/model.safetensors')), load_file(str(tmp_path / 'b/model.safetensors'))
    assert all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in a)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(folder, tmp_path, monkeypatch):
    out = tmp_path / 'nan'
    original = T.compute_loss
    calls = [0]

    def poisoned(net, images, seeds):
        calls[0] += 1
        loss = original(net, images, seeds)
        return loss * float('nan') if calls[0] == 6 else loss  # the 6th step goes bad

    monkeypatch.setattr(T, 'compute_loss', poisoned)
    with pytest.raises(FloatingPointError, match=r'non-finite loss \(nan\) at step 5.*last good checkpoint is kept'):
        T.train(T.build_parser().parse_args(base_args(folder, out)))
    good = torch.load(out / T.CKPT_NAME, weights_only=True)
    assert good['step'] == 4 and all(torch.isfinite(v).all() for v in good['model'].values())
    assert not (out / 'model.safetensors').exists()


def test_ddpm_objective_for_a_unet(folder, tmp_path):
    args = ['--model', 'ddae_ddpm_cifar10_32', '--data-dir', str(folder), '--out', str(tmp_path / 'unet'),
            '--model-args', json.dumps(dict(img_size=16, base_channels=16, channel_mult=[1, 2], num_res_blocks=1,
                                            norm_groups=4, attn_resolutions=[8])),
            '--batch-size', '8', '--max-steps', '3', '--warmup-epochs', '0', '--workers', '0', '--quiet', '--lr', '1e-3']
    res = T.train(T.build_parser().parse_args(args))
    assert res['step'] == 3 and res['last']['loss'] > 0
    sd = load_file(res['weights'])
    assert 'up.0.blocks.0.res.conv1.weight' in sd


def test_bad_arguments(folder, tmp_path):
    with pytest.raises(SystemExit, match='larger than the dataset'):
        T.train(T.build_parser().parse_args(base_args(folder, tmp_path / 'x') + ['--batch-size', '64']))
    with pytest.raises(SystemExit, match='divisible'):
        T.train(T.build_parser().parse_args(base_args(folder, tmp_path / 'y') + ['--accum-steps', '3']))
    with pytest.raises(SystemExit, match='not found'):
        T.train(T.build_parser().parse_args(base_args(tmp_path / 'nope', tmp_path / 'z')))


def test_probe_fast_and_grid_on_a_separable_set(folder, tmp_path):
    from ldae_models.cli import main
    out = tmp_path / 'probe.json'
    assert main(['probe', '--model', 'ldae_vit_tiny_patch4_32', '--model-args', TINY_ARGS, '--data-dir', str(folder),
                 '--workers', '0', '--epochs', '20', '--out', str(out)]) == 0
    r = json.loads(out.read_text())
    assert r['top1'] >= 90 and r['n_train'] == 40 and r['n_test'] == 16
    assert main(['probe', '--model', 'ldae_vit_tiny_patch4_32', '--model-args', TINY_ARGS, '--data-dir', str(folder),
                 '--workers', '0', '--mode', 'grid', '--ts', '0', '40', '--out', str(out)]) == 0
    r = json.loads(out.read_text())
    assert len(r['grid']) == 4 and all(0 <= g['top1'] <= 100 for g in r['grid'])
