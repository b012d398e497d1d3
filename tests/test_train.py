"""Training on a synthetic ImageFolder on the CPU: the config, both data paths, exact resume, N processes = 1, the
schedule, precision, the NaN stop, the UNet objective; and the probe command on the result."""
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file

import ldae_models
from ldae_models import engine as E
from ldae_models import train as T
from ldae_models.cli import main
from conftest import TINY, free_port, killer_script, randomize_, rel_err, smooth_images

TINY_ARGS = json.dumps(dict(img_size=16, embed_dim=32, depth=2, num_heads=2, latent_dim=6))
REPO = Path(__file__).resolve().parents[1]


def base_args(folder, out, *extra):
    return ['--data-root', str(folder), '--out', str(out), '--model-args', TINY_ARGS, '--batch-size', '8',
            '--epochs', '2', '--warmup-epochs', '1', '--workers', '0', '--log-every', '1', '--ckpt-every', '2',
            '--ema', '0.9', '--pca-images', '40', '--quiet', *extra]


def config(folder, out, *extra):
    """The TrainConfig the command line builds from these arguments."""
    from ldae_models.cli import _config, build_parser
    return _config(T.TrainConfig, build_parser().parse_args(['train', *base_args(folder, out, *extra)]))


def run_script(args, env=None, wrapper=None):
    cmd = [sys.executable] + (['-c', wrapper] if wrapper else ['-m', 'ldae_models', 'train']) + args
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env={**os.environ, **(env or {})})


def logs(out):
    return [json.loads(line) for line in (Path(out) / 'log.jsonl').read_text().splitlines()]


def test_training_steps_and_loadable_result(folder, tmp_path):
    res = T.train(config(folder, tmp_path / 'run'))
    assert res['step'] == 10 == res['total_steps']  # 40 images / 8 per step x 2 epochs
    steps = [r for r in logs(tmp_path / 'run') if 'loss' in r]
    assert len(steps) == 10 and all(r['loss'] > 0 and 'lr' in r for r in steps)
    stages = [r['stage'] for r in logs(tmp_path / 'run') if r.get('event') == 'stage']
    assert stages == ['data', 'pca', 'train', 'export']
    enc = timm.create_model('ldae_vit_tiny_patch4_32', pretrained=True, merged=False, img_size=16, embed_dim=32,
                            depth=2, num_heads=2, latent_dim=6,
                            pretrained_cfg_overlay=dict(file=str(tmp_path / 'run/model.safetensors')))
    assert enc.tokenizer.fitted and enc.tokenizer.num_patches.item() == 40 * 16
    back = timm.create_model(f'local-dir:{tmp_path / "run/encoder"}', pretrained=True)
    assert back(torch.randn(1, 3, 16, 16)).shape == (1, 32)
    ckpt = torch.load(tmp_path / 'run' / E.CKPT_NAME, weights_only=True)  # plain containers and tensors only
    assert ckpt['step'] == 10 and 'ema' in ckpt and 'optimizer' in ckpt and ckpt['config']['model_args'] == json.loads(
        TINY_ARGS)
    img = next((folder / 'test' / 'class0').iterdir())
    assert main(['denoise', '--checkpoint', str(tmp_path / 'run/model.safetensors'), '--model-args', TINY_ARGS,
                 '--images', str(img), str(img), '--out', str(tmp_path / 'fig.png')]) == 0
    assert (tmp_path / 'fig.png').stat().st_size > 5000


def test_streaming_path_equals_the_in_memory_path(folder, tmp_path):
    """The DataLoader path (ImageNet-scale folders) and the device-resident path draw the same batches, t and noise."""
    T.train(config(folder, tmp_path / 'mem', '--max-steps', '3', '--in-memory', 'yes'))
    T.train(config(folder, tmp_path / 'stream', '--max-steps', '3', '--in-memory', 'no'))
    a, b = load_file(str(tmp_path / 'mem/model.safetensors')), load_file(str(tmp_path / 'stream/model.safetensors'))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_schedule_follows_the_runs_real_length(folder, tmp_path):
    """--max-steps lays warmup and cosine over the steps that run (not over --epochs): the peak is reached and the lr
    decays to about 0, and every log line shows it."""
    T.train(config(folder, tmp_path / 's', '--max-steps', '8', '--epochs', '400', '--warmup-epochs', '100',
                   '--lr', '1e-3'))
    lrs = [r['lr'] for r in logs(tmp_path / 's') if 'lr' in r]
    assert len(lrs) == 8 and max(lrs) == pytest.approx(1e-3) and lrs.index(max(lrs)) == 1  # 2 warmup steps of 8
    assert lrs[-1] < 0.1 * max(lrs)
    assert lrs == [E.lr_at(s, 8, 2, 1e-3) for s in range(8)]


def test_bf16_is_emulated_with_a_warning_on_a_cpu_without_bf16(folder, tmp_path, monkeypatch):
    monkeypatch.setattr(E.runtime, 'cpu_has_native_bf16', lambda: False)
    with pytest.warns(UserWarning, match='no native bf16.*many times slower'):
        assert E.resolve_amp('bf16', torch.device('cpu')) == dict(device_type='cpu', dtype=torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        assert E.resolve_amp('auto', torch.device('cpu')) is None  # auto: silently float32
    monkeypatch.setattr(E.runtime, 'cpu_has_native_bf16', lambda: True)
    assert E.resolve_amp('bf16', torch.device('cpu')) == dict(device_type='cpu', dtype=torch.bfloat16)
    assert E.resolve_amp('off', torch.device('cpu')) is None


def test_bf16_convolution_on_a_map_smaller_than_its_stride_gets_its_whole_gradient():
    """oneDNN's bf16 weight gradient of a strided convolution on a 1x1 map leaves the padding-only taps unwritten
    (allocator garbage, 1e29 seen; a ResNet-18 student's last stage at 16-32 px): the loop's guard runs such a
    convolution in float32, and leaves the others in bf16."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(64, 64, 3, stride=2, padding=1, bias=False)
    x = torch.randn(8, 64, 1, 1).bfloat16().float()  # values bf16 holds exactly
    conv(x).square().sum().backward()
    ref, conv.weight.grad = conv.weight.grad.clone(), None
    assert ref[:, :, 0].abs().max() == 0  # the taps that see only padding
    guard = E.Float32DegenerateConvs(conv)
    for i in range(3):
        junk = torch.full((64 * 64 * 9 * 4,), float('nan'))  # leave garbage where the allocator looks next
        del junk
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter('always')
            with torch.autocast('cpu', dtype=torch.bfloat16):
                y = conv(x.bfloat16())
                big = conv(torch.randn(2, 64, 4, 4))  # a normal map stays in bf16
        assert y.dtype == torch.float32 and big.dtype == torch.bfloat16
        assert [str(w.message) for w in caught if 'float32' in str(w.message)] == (
            [] if i else ['Conv2d: a stride-(2, 2) convolution on a (1, 1) input runs in float32 under CPU bf16 '
                          'autocast (oneDNN leaves part of its bf16 weight gradient unwritten on inputs smaller '
                          'than the stride)'])
        y.square().sum().backward()
        assert torch.allclose(conv.weight.grad, ref, rtol=1e-6, atol=0)
        conv.weight.grad = None
    guard.remove()
    assert torch.is_autocast_enabled('cpu') is False


def test_tokenizer_and_loss_stay_float32_under_autocast():
    """Under bf16 autocast the PCA tokenizer and the loss compute in float32: the noisy input at t = 5 (noise smaller
    than bf16's rounding of a pixel) and the loss are exactly those of float32."""
    torch.manual_seed(0)
    dae = ldae_models.LatentDAE(**TINY)
    dae.fit_tokenizer([smooth_images(8, seed=s) for s in range(3)])
    randomize_(dae, seed=3)
    x, t = smooth_images(4, seed=9), torch.full((4,), 5.0)
    noise = torch.randn(4, 16, 6)
    ref_noisy = dae.noise_input(x, t, noise=noise)[0]
    pred = dae._denoise(ref_noisy, t)
    ref_loss = dae.compute_loss(pred, x, noise, t)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        noisy = dae.noise_input(x, t, noise=noise)[0]
        loss = dae.compute_loss(pred.bfloat16(), x, noise, t)
    assert noisy.dtype == torch.float32 and torch.equal(noisy, ref_noisy)
    assert loss.dtype == torch.float32 and rel_err(loss, ref_loss) < 1e-2  # only pred's bf16 rounding remains
    assert (ref_noisy - x).abs().max() < 2.0


_KILLER = killer_script('train')


@pytest.mark.parametrize('aug, amp', [('center', 'off'), ('rrc', 'off'), ('center', 'bf16')])
def test_killed_run_resumes_to_the_uninterrupted_state(folder, tmp_path, aug, amp):
    """Bit for bit, in float32 and under bf16 autocast (forced: emulated, slowly, on a CPU without native bf16)."""
    full = run_script(base_args(folder, tmp_path / 'full', '--aug', aug, '--amp', amp))
    assert full.returncode == 0, full.stderr
    killed = run_script(base_args(folder, tmp_path / 'cut', '--aug', aug, '--amp', amp),
                        env={'KILL_AFTER_SAVES': '2'}, wrapper=_KILLER)
    assert killed.returncode == -9
    assert torch.load(tmp_path / 'cut' / E.CKPT_NAME, weights_only=True)['step'] == 4
    assert not (tmp_path / 'cut/model.safetensors').exists()
    resumed = run_script(base_args(folder, tmp_path / 'cut', '--aug', aug, '--amp', amp, '--resume'))
    assert resumed.returncode == 0, resumed.stderr
    assert '"event": "resumed", "step": 4' in resumed.stdout
    a = torch.load(tmp_path / 'full' / E.CKPT_NAME, weights_only=True)
    b = torch.load(tmp_path / 'cut' / E.CKPT_NAME, weights_only=True)
    for part in ('model', 'ema'):
        assert a[part].keys() == b[part].keys() and all(torch.equal(a[part][k], b[part][k]) for k in a[part])
    sa, sb = a['optimizer']['state'], b['optimizer']['state']
    assert all(torch.equal(sa[i]['exp_avg'], sb[i]['exp_avg']) for i in sa)
    fa, fb = load_file(str(tmp_path / 'full/model.safetensors')), load_file(str(tmp_path / 'cut/model.safetensors'))
    assert all(torch.equal(fa[k], fb[k]) for k in fa)


# SIGTERM to itself in the middle of step $TERM_AT_STEP (0-based), between two checkpoints (every 2 steps)
_TERMINATOR = """
import os, signal, sys
import ldae_models.engine.loop as L
from ldae_models.cli import main
orig = L.lr_at
def lr_then_signal(step, *a, **k):
    if step == int(os.environ['TERM_AT_STEP']):
        os.kill(os.getpid(), signal.SIGTERM)
    return orig(step, *a, **k)
L.lr_at = lr_then_signal
sys.exit(main(['train'] + sys.argv[1:]))
"""


def test_sigterm_checkpoints_at_the_step_reached_and_the_resumed_run_is_exact(folder, tmp_path):
    full = run_script(base_args(folder, tmp_path / 'full', '--aug', 'rrc', '--amp', 'off'))
    assert full.returncode == 0, full.stderr
    cut = run_script(base_args(folder, tmp_path / 'cut', '--aug', 'rrc', '--amp', 'off'), env={'TERM_AT_STEP': '2'},
                     wrapper=_TERMINATOR)
    assert cut.returncode == E.PREEMPTED_EXIT_CODE == 75, cut.stderr
    assert 'SIGTERM: stopped at step 3' in cut.stderr and 'continue with --resume' in cut.stderr
    assert torch.load(tmp_path / 'cut' / E.CKPT_NAME, weights_only=True)['step'] == 3  # the step reached, not 2
    assert any(r.get('event') == 'preempted' and r['step'] == 3 for r in logs(tmp_path / 'cut'))
    resumed = run_script(base_args(folder, tmp_path / 'cut', '--aug', 'rrc', '--amp', 'off', '--resume'))
    assert resumed.returncode == 0, resumed.stderr
    fa, fb = load_file(str(tmp_path / 'full/model.safetensors')), load_file(str(tmp_path / 'cut/model.safetensors'))
    assert all(torch.equal(fa[k], fb[k]) for k in fa)


def test_the_last_k_checkpoints_and_one_every_n_epochs_are_kept(folder, tmp_path):
    out = tmp_path / 'k'  # 5 steps an epoch, 10 in all, a checkpoint every 2 steps and at each epoch's end
    T.train(config(folder, out, '--keep-last', '3', '--keep-every-epochs', '1', '--amp', 'off'))
    step = lambda f: torch.load(out / f, weights_only=True)['step']  # noqa: E731
    assert sorted(p.name for p in out.glob('ckpt*.pth')) == [
        'ckpt_epoch0001.pth', 'ckpt_epoch0002.pth', 'ckpt_last.pth', 'ckpt_step00000006.pth', 'ckpt_step00000008.pth']
    assert [step(f) for f in ('ckpt_epoch0001.pth', 'ckpt_epoch0002.pth', 'ckpt_last.pth', 'ckpt_step00000006.pth',
                              'ckpt_step00000008.pth')] == [5, 10, 10, 6, 8]


def test_a_resume_with_other_settings_is_refused(folder, tmp_path):
    T.train(config(folder, tmp_path / 'r', '--max-steps', '2'))
    with pytest.raises(ValueError, match=r"checkpoint of another run \(schedule length in steps \(--epochs / "
                                         r"--max-steps\): 2 in the checkpoint, 4 now\).*--allow-config-change"):
        T.train(config(folder, tmp_path / 'r', '--max-steps', '4', '--resume'))
    with pytest.raises(ValueError, match=r"seed: 0 in the checkpoint, 1 now"):
        T.train(config(folder, tmp_path / 'r', '--max-steps', '2', '--resume', '--seed', '1'))
    res = T.train(config(folder, tmp_path / 'r', '--max-steps', '4', '--resume', '--allow-config-change'))
    assert res['step'] == 4


@pytest.mark.parametrize('amp', ['off', pytest.param('bf16', marks=pytest.mark.slow)])  # bf16: a bound, not exactness
def test_two_processes_equal_one_with_the_same_global_batch(folder, tmp_path, amp):
    one = run_script(base_args(folder, tmp_path / 'one', '--aug', 'rrc', '--amp', amp))
    assert one.returncode == 0, one.stderr
    cmd = ['-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_addr', '127.0.0.1', '--master_port',
           str(free_port()), '-m', 'ldae_models', 'train'] + base_args(folder, tmp_path / 'two', '--aug', 'rrc',
                                                                      '--amp', amp)
    two = subprocess.run([sys.executable] + cmd, capture_output=True, text=True, cwd=REPO,
                         env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = load_file(str(tmp_path / 'one/model.safetensors')), load_file(str(tmp_path / 'two/model.safetensors'))
    assert a.keys() == b.keys()
    for k in a:  # the l-DAE's tokenizer and loss stay float32: bf16 agrees as closely here (8 steps)
        assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6), (k, (a[k] - b[k]).abs().max().item())


def test_gradient_accumulation_matches_one_big_batch(folder, tmp_path):
    T.train(config(folder, tmp_path / 'a', '--max-steps', '3'))
    T.train(config(folder, tmp_path / 'b', '--max-steps', '3', '--accum-steps', '2'))
    a, b = load_file(str(tmp_path / 'a/model.safetensors')), load_file(str(tmp_path / 'b/model.safetensors'))
    assert all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in a)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(folder, tmp_path, monkeypatch):
    out = tmp_path / 'nan'
    original = ldae_models.LatentDAE.training_loss
    calls = [0]

    def poisoned(self, images, t, noise):
        calls[0] += 1
        loss = original(self, images, t, noise)
        return loss * float('nan') if calls[0] == 6 else loss  # the 6th step goes bad

    monkeypatch.setattr(ldae_models.LatentDAE, 'training_loss', poisoned)
    with pytest.raises(FloatingPointError, match=r'non-finite loss \(nan\) at step 5.*last good checkpoint is kept'):
        T.train(config(folder, out, '--log-every', '100', '--nan-check-every', '100'))  # read at the checkpoint
    good = torch.load(out / E.CKPT_NAME, weights_only=True)
    assert good['step'] == 4 and all(torch.isfinite(v).all() for v in good['model'].values())
    assert not (out / 'model.safetensors').exists()


def test_ddpm_objective_for_a_unet(folder, tmp_path):
    cfg = config(folder, tmp_path / 'unet', '--model', 'ddae_ddpm_cifar10_32', '--max-steps', '3', '--warmup-epochs',
                 '0', '--lr', '1e-3', '--ema', '0')
    cfg.model_args = dict(img_size=16, base_channels=16, channel_mult=[1, 2], num_res_blocks=1, norm_groups=4,
                          attn_resolutions=[8], out_k=1)
    res = T.train(cfg)
    assert res['step'] == 3 and res['last']['loss'] > 0
    assert 'up.0.blocks.0.res.conv1.weight' in load_file(res['weights'])


def test_single_level_encoder_carries_its_t(folder, tmp_path):
    """The single-level ablation trains at t = 408; its exported encoder defaults to that t, not 10."""
    T.train(config(folder, tmp_path / 'single', '--schedule', 'single', '--max-steps', '2'))
    enc = timm.create_model(f'local-dir:{tmp_path / "single/encoder"}', pretrained=True)
    assert enc.t == 408 and enc.schedule.name == 'single'
    cfg = json.loads((tmp_path / 'single/encoder/config.json').read_text())
    assert cfg['model_args']['t'] == 408 and cfg['model_args']['schedule'] == 'single'


def test_bad_arguments(folder, tmp_path):
    with pytest.raises(ValueError, match='larger than the data set'):
        T.train(config(folder, tmp_path / 'x', '--batch-size', '64'))
    assert not (tmp_path / 'x').exists()  # a failed run leaves nothing behind
    (tmp_path / 'mine').mkdir()
    (tmp_path / 'mine' / 'notes.txt').write_text('kept')
    with pytest.raises(ValueError, match='larger than the data set'):
        T.train(config(folder, tmp_path / 'mine', '--batch-size', '64'))
    assert [f.name for f in (tmp_path / 'mine').iterdir()] == ['notes.txt']  # a folder of the user's: as it was
    with pytest.raises(ValueError, match='--max-steps must be >= 0, got -1'):
        config(folder, tmp_path / 'y', '--max-steps', '-1')
    with pytest.raises(ValueError, match='divisible'):
        T.train(config(folder, tmp_path / 'y', '--accum-steps', '3'))
    with pytest.raises(FileNotFoundError):
        T.train(config(tmp_path / 'nope', tmp_path / 'z'))


def test_probe_fast_and_grid_on_a_separable_set(folder, tmp_path):
    out = tmp_path / 'probe.json'
    assert main(['probe', '--model', 'ldae_vit_tiny_patch4_32', '--model-args', TINY_ARGS, '--data-root', str(folder),
                 '--floors', '--out', str(out)]) == 0
    r = json.loads(out.read_text())
    assert r['top1'] >= 90 and r['n_train'] == 40 and r['n_test'] == 16 and r['grid'][0]['knn_top1'] >= 90
    assert r['floors']['raw_pixels']['dim'] == 768 and r['floors']['random_same_shape']['top1'] >= 90
    assert main(['probe', '--model', 'ldae_vit_tiny_patch4_32', '--model-args', TINY_ARGS, '--data-root', str(folder),
                 '--mode', 'grid', '--ts', '0', '40', '--out', str(out), '--features', str(tmp_path / 'feats')]) == 0
    r = json.loads(out.read_text())
    assert len(r['grid']) == 4 and all(0 <= g['top1'] <= 100 for g in r['grid'])
    assert (tmp_path / 'feats/train/index.json').is_file()
    # the second run reads the cached features
    assert main(['probe', '--model', 'ldae_vit_tiny_patch4_32', '--model-args', TINY_ARGS, '--data-root', str(folder),
                 '--mode', 'grid', '--ts', '0', '40', '--out', str(out), '--features', str(tmp_path / 'feats')]) == 0
    assert json.loads(out.read_text())['extract_s'] == 0.0


def test_extract_writes_shards_that_the_probe_reads(folder, tmp_path):
    from ldae_models.features import load_feature_shards
    out = tmp_path / 'feats'
    assert main(['extract', '--model', 'ldae_vit_tiny_patch4_32', '--model-args', TINY_ARGS, '--data-root', str(folder),
                 '--layers', '0', '1', '--ts', '0', '10', '--shard-size', '16', '--out', str(out)]) == 0
    feats, labels, index = load_feature_shards(out / 'train')
    assert set(feats) == {(0, 0.0), (0, 10.0), (1, 0.0), (1, 10.0)} and len(labels) == 40
    assert len(index['shards']) == 3 and all(v.shape == (40, 32) for v in feats.values())  # 16 + 16 + 8 rows
    r = tmp_path / 'r.json'
    assert main(['probe', '--model', 'ldae_vit_tiny_patch4_32', '--model-args', TINY_ARGS, '--data-root', str(folder),
                 '--layers', '1', '--ts', '10', '--features', str(out), '--out', str(r)]) == 0
    assert json.loads(r.read_text())['extract_s'] == 0.0  # read, not extracted
    assert main(['probe', '--model', 'ldae_vit_tiny_patch4_32', '--model-args', TINY_ARGS, '--data-root', str(folder),
                 '--layers', '1', '--ts', '10', '--features', str(out), '--noisy-input']) == 2  # another setting


def test_extract_without_the_split_writes_nothing(folder, tmp_path, capsys):
    only_train = tmp_path / 'only_train'
    import shutil
    shutil.copytree(folder / 'train', only_train / 'train')
    assert main(['extract', '--model', 'ldae_vit_tiny_patch4_32', '--model-args', TINY_ARGS, '--data-root',
                 str(only_train), '--out', str(tmp_path / 'f')]) == 2
    assert 'has no test split' in capsys.readouterr().err and not (tmp_path / 'f').exists()


def test_a_feature_folder_is_never_destroyed_by_a_read(folder, tmp_path, capsys):
    """extract then probe --features (the README's pair): layer -1 is the last block, the cells the folder holds are
    read, a missing cell is extracted alone and added beside the others; no file is rewritten."""
    from ldae_models.features import load_feature_shards
    out, r = tmp_path / 'feats', tmp_path / 'r.json'
    common = ['--model', 'ldae_vit_tiny_patch4_32', '--model-args', TINY_ARGS, '--data-root', str(folder)]
    assert main(['extract', *common, '--layers', '0', '1', '--ts', '0', '10', '--out', str(out)]) == 0
    before = {f: f.read_bytes() for f in out.rglob('*.safetensors')}
    assert main(['probe', *common, '--ts', '10', '--features', str(out), '--out', str(r), '--no-knn']) == 0
    res = json.loads(r.read_text())
    assert res['extract_s'] == 0.0 and res['best_layer'] == 1  # -1 read as block 1, the last
    assert 'block 1 t 10: linear' in capsys.readouterr().out
    assert main(['probe', *common, '--layers', '-1', '--ts', '10', '40', '--features', str(out), '--out', str(r),
                 '--no-knn']) == 0
    err = capsys.readouterr().err
    assert 'lacks 1 of the 2 cells (block 1 t 40): extracting only those' in err
    assert json.loads(r.read_text())['extract_s'] > 0
    assert all(f.read_bytes() == b for f, b in before.items())  # the old shards untouched
    feats, labels, index = load_feature_shards(out / 'train')
    assert set(feats) == {(0, 0.0), (0, 10.0), (1, 0.0), (1, 10.0), (1, 40.0)} and len(labels) == 40
    # extract into the folder again: nothing to do, nothing written
    assert main(['extract', *common, '--layers', '1', '--ts', '40', '--out', str(out)]) == 0
    assert len(list(out.rglob('*.safetensors'))) == 4


def test_the_optimizer_is_timms_with_weight_decay_groups(folder, tmp_path):
    """Weight decay spares norms, biases and what no_weight_decay() names (a student's position embedding inside
    RepFusion's parts too), read back from the optimizer; --opt sgd trains."""
    from ldae_models.distill import DistillConfig
    parts = torch.nn.ModuleDict(dict(student=timm.create_model('vit_tiny_patch16_224', img_size=16, patch_size=4,
                                                                depth=1, num_classes=2), projector=torch.nn.Linear(8, 8)))
    opt = E.build_optimizer(parts, DistillConfig(weight_decay=0.05), 1e-3, torch.device('cpu'))
    names = {id(p): n for n, p in parts.named_parameters()}
    decay = {g['weight_decay']: {names[id(p)] for p in g['params']} for g in opt.param_groups}
    assert set(decay) == {0.0, 0.05} and type(opt).__name__ == 'AdamW'
    assert {'student.pos_embed', 'student.cls_token', 'student.norm.weight', 'student.blocks.0.attn.qkv.bias',
            'projector.bias'} <= decay[0.0]
    assert all(n.endswith('weight') and 'norm' not in n for n in decay[0.05])
    out = tmp_path / 'sgd'
    res = T.train(config(folder, out, '--opt', 'sgd', '--lr', '1e-2', '--max-steps', '2', '--ema', '0'))
    state = torch.load(out / E.CKPT_NAME, weights_only=True)
    assert res['step'] == 2 and 'momentum_buffer' in next(iter(state['optimizer']['state'].values()))
    with pytest.raises(ValueError, match="--opt 'nope'"):
        T.train(config(folder, tmp_path / 'nope', '--opt', 'nope', '--max-steps', '1'))
