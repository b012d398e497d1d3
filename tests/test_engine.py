"""The training engine, in-process (``train(TrainConfig(...))`` on a synthetic ImageFolder): the loop, both data paths,
exact resume after a death or a stop signal (in float32 and under bf16 autocast), the sampler and the seed streams,
checkpoints kept and refused, the output folder checked before any work, no host sync in a step; and, in real
subprocesses, one hard kill and the processes of torchrun (N processes = 1, a stop agreed by all)."""
import json
import os
import signal
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
from ldae_models.data import ImageData
from ldae_models.jobs import pretrain as T
from conftest import Killed, count_step_syncs, free_port, kill_after_saves, killer_script, same_files, tiny_config

REPO = Path(__file__).resolve().parents[1]
TINY_ARGS = json.dumps(dict(img_size=16, embed_dim=32, depth=2, num_heads=2, latent_dim=6))


def cli_args(folder, out, *extra):
    return ['--data-root', str(folder), '--out', str(out), '--model-args', TINY_ARGS, '--batch-size', '8',
            '--epochs', '2', '--warmup-epochs', '1', '--workers', '0', '--log-every', '1', '--ckpt-every', '2',
            '--ema', '0.9', '--pca-images', '40', '--quiet', *extra]


def logs(out):
    return [json.loads(line) for line in (Path(out) / 'log.jsonl').read_text().splitlines()]


def folder_bytes(path):
    return {p.relative_to(path): p.read_bytes() for p in sorted(Path(path).rglob('*')) if p.is_file()}


def test_training_steps_and_loadable_result(folder, tmp_path):
    res = T.train(tiny_config(folder, tmp_path / 'run'))
    assert res.step == 10 == res.total_steps and res.weights == tmp_path / 'run/model.safetensors'
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
    assert ckpt['step'] == 10 and 'ema' in ckpt and 'optimizer' in ckpt
    assert ckpt['config']['model_args'] == json.loads(TINY_ARGS)
    trained = load_file(str(tmp_path / 'run/model.safetensors'))  # the EMA weights, in memory and on disk
    assert all(torch.equal(v, trained[k]) for k, v in res.trained.state_dict().items())


def test_streaming_path_equals_the_in_memory_path(folder, tmp_path):
    """The DataLoader path (ImageNet-scale folders) and the device-resident path draw the same batches, t and noise."""
    T.train(tiny_config(folder, tmp_path / 'mem', max_steps=3, in_memory='yes'))
    T.train(tiny_config(folder, tmp_path / 'stream', max_steps=3, in_memory='no', workers=1))
    same_files(tmp_path / 'mem', tmp_path / 'stream', 'model.safetensors')


def test_schedule_follows_the_runs_real_length(folder, tmp_path, capsys):
    """--max-steps lays warmup and cosine over the steps that run (not over --epochs): the peak is reached and the lr
    decays to about 0, and every log line shows it."""
    T.train(tiny_config(folder, tmp_path / 's', max_steps=8, epochs=400, warmup_epochs=100, lr=1e-3))
    lrs = [r['lr'] for r in logs(tmp_path / 's') if 'lr' in r]
    assert len(lrs) == 8 and max(lrs) == pytest.approx(1e-3) and lrs.index(max(lrs)) == 1  # 2 warmup steps of 8
    assert lrs[-1] < 0.1 * max(lrs)
    assert lrs == [E.lr_at(s, 8, 2, 1e-3) for s in range(8)]
    T.train(tiny_config(folder, tmp_path / 'w', max_steps=2, epochs=1, warmup_epochs=5))
    assert any('covers the whole run' in r.get('message', '') for r in logs(tmp_path / 'w'))


def test_a_config_built_in_python_is_checked_like_its_flags():
    """A value outside a field's choices or bounds is refused where the config is made, naming its flag (a config
    built in Python gets the command line's message, not a KeyError deep in the run)."""
    from ldae_models.jobs.repfusion import DistillConfig
    with pytest.raises(ValueError, match="--policy must be one of fixed, random, reinforce; got 'uniform'"):
        DistillConfig(policy='uniform')
    with pytest.raises(ValueError, match='--aug must be one of center, flip, rrc, pad_crop'):
        T.TrainConfig(aug='crop')
    with pytest.raises(ValueError, match='--batch-size must be >= 1, got 0'):
        T.TrainConfig(batch_size=0)


def test_precision_is_bf16_where_the_device_has_it(monkeypatch):
    monkeypatch.setattr(E.runtime, 'cpu_has_native_bf16', lambda: False)
    with pytest.warns(UserWarning, match='no native bf16.*many times slower'):
        assert E.resolve_amp('bf16', torch.device('cpu')) == dict(device_type='cpu', dtype=torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        assert E.resolve_amp('auto', torch.device('cpu')) is None  # auto: silently float32
    monkeypatch.setattr(E.runtime, 'cpu_has_native_bf16', lambda: True)
    assert E.resolve_amp('bf16', torch.device('cpu')) == dict(device_type='cpu', dtype=torch.bfloat16)
    assert E.resolve_amp('off', torch.device('cpu')) is None
    # a GPU without bf16 (compute capability < 8.0, e.g. a V100): auto computes in float32, bf16 is refused
    monkeypatch.setattr(torch.cuda, 'is_bf16_supported', lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, 'get_device_name', lambda *a: 'Tesla V100')
    with pytest.warns(UserWarning, match='Tesla V100 has no bf16'):
        assert E.resolve_amp('auto', torch.device('cuda', 0)) is None
    with pytest.raises(ValueError, match='--amp bf16: Tesla V100 has no bf16'):
        E.resolve_amp('bf16', torch.device('cuda', 0))
    monkeypatch.setattr(torch.cuda, 'is_bf16_supported', lambda *a, **k: True)
    assert E.resolve_amp('auto', torch.device('cuda', 0)) == dict(device_type='cuda', dtype=torch.bfloat16)


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


# -- exact resume ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('aug, amp', [('center', 'off'), ('rrc', 'off'), ('center', 'bf16'), ('rrc', 'bf16')])
def test_a_run_that_dies_after_a_checkpoint_resumes_to_the_uninterrupted_state(folder, tmp_path, monkeypatch, aug,
                                                                               amp):
    """Bit for bit, in float32 and under bf16 autocast (forced: emulated, slowly, on a CPU without native bf16)."""
    T.train(tiny_config(folder, tmp_path / 'full', aug=aug, amp=amp))
    with monkeypatch.context() as m:
        kill_after_saves(m, 2)
        with pytest.raises(Killed):
            T.train(tiny_config(folder, tmp_path / 'cut', aug=aug, amp=amp))
    assert torch.load(tmp_path / 'cut' / E.CKPT_NAME, weights_only=True)['step'] == 4
    assert not (tmp_path / 'cut/model.safetensors').exists()
    res = T.train(tiny_config(folder, tmp_path / 'cut', aug=aug, amp=amp, resume=True))
    assert res.step == 10 and any(r.get('event') == 'resumed' and r['step'] == 4 for r in logs(tmp_path / 'cut'))
    a = torch.load(tmp_path / 'full' / E.CKPT_NAME, weights_only=True)
    b = torch.load(tmp_path / 'cut' / E.CKPT_NAME, weights_only=True)
    for part in ('model', 'ema'):
        assert a[part].keys() == b[part].keys() and all(torch.equal(a[part][k], b[part][k]) for k in a[part])
    sa, sb = a['optimizer']['state'], b['optimizer']['state']
    assert all(torch.equal(sa[i]['exp_avg'], sb[i]['exp_avg']) for i in sa)
    same_files(tmp_path / 'full', tmp_path / 'cut', 'model.safetensors')


def test_a_real_sigkill_then_resume_in_new_processes(folder, tmp_path):
    """The same, with a real SIGKILL of a real process and a fresh interpreter for the resume."""
    def go(out, *extra, env=None):
        cmd = [sys.executable, '-c', killer_script('train')] if env else [sys.executable, '-m', 'ldae_models', 'train']
        return subprocess.run(cmd + cli_args(folder, out, '--aug', 'rrc', *extra), capture_output=True, text=True,
                              cwd=REPO, env={**os.environ, **(env or {})})
    T.train(tiny_config(folder, tmp_path / 'full', aug='rrc'))
    assert go(tmp_path / 'cut', env={'KILL_AFTER_SAVES': '2'}).returncode == -9
    resumed = go(tmp_path / 'cut', '--resume')
    assert resumed.returncode == 0, resumed.stderr
    same_files(tmp_path / 'full', tmp_path / 'cut', 'model.safetensors')


def _signal_at_step(monkeypatch, step, sig=signal.SIGTERM):
    """Send ``sig`` to this process while step ``step`` (0-based) runs."""
    orig = E.loop.lr_at

    def lr_then_signal(s, *a, **k):
        if s == step:
            os.kill(os.getpid(), sig)
        return orig(s, *a, **k)
    monkeypatch.setattr(E.loop, 'lr_at', lr_then_signal)


@pytest.mark.parametrize('sig', [signal.SIGTERM, signal.SIGUSR1])
def test_a_stop_signal_checkpoints_at_the_step_reached_and_the_resumed_run_is_exact(folder, tmp_path, monkeypatch,
                                                                                    sig):
    T.train(tiny_config(folder, tmp_path / 'full', aug='rrc'))
    with monkeypatch.context() as m:
        _signal_at_step(m, 2, sig)
        with pytest.raises(E.Preempted, match=f'{signal.Signals(sig).name}: stopped at step 3.*continue with --resume'):
            T.train(tiny_config(folder, tmp_path / 'cut', aug='rrc'))
    assert signal.getsignal(sig) is not None and torch.load(tmp_path / 'cut' / E.CKPT_NAME,
                                                              weights_only=True)['step'] == 3  # the step reached
    assert any(r.get('event') == 'preempted' and r['step'] == 3 for r in logs(tmp_path / 'cut'))
    T.train(tiny_config(folder, tmp_path / 'cut', aug='rrc', resume=True))
    same_files(tmp_path / 'full', tmp_path / 'cut', 'model.safetensors')


def test_a_stop_signal_during_the_set_up_keeps_the_pca_fit(folder, tmp_path, monkeypatch):
    """A notice while the data is read or the PCA is fitted (before the first step) is honoured: the run checkpoints
    at step 0 with its fitted tokenizer, exits 75, and the resumed run is the uninterrupted one."""
    T.train(tiny_config(folder, tmp_path / 'full'))
    fits = [0]
    orig = T.fit_pca

    def fit_then_signal(*a, **k):
        fits[0] += 1
        os.kill(os.getpid(), signal.SIGTERM)
        return orig(*a, **k)
    monkeypatch.setattr(T, 'fit_pca', fit_then_signal)
    with pytest.raises(E.Preempted, match='stopped at step 0'):
        T.train(tiny_config(folder, tmp_path / 'cut'))
    state = torch.load(tmp_path / 'cut' / E.CKPT_NAME, weights_only=True)
    assert state['step'] == 0 and state['model']['encoder.tokenizer.num_patches'] == 40 * 16
    T.train(tiny_config(folder, tmp_path / 'cut', resume=True))
    assert fits == [1]  # the resumed run did not fit again
    same_files(tmp_path / 'full', tmp_path / 'cut', 'model.safetensors')


def test_the_last_k_checkpoints_and_one_every_n_epochs_are_kept(folder, tmp_path):
    out = tmp_path / 'k'  # 5 steps an epoch, 10 in all, a checkpoint every 2 steps and at each epoch's end
    T.train(tiny_config(folder, out, keep_last=3, keep_every_epochs=1, amp='off'))
    step = lambda f: torch.load(out / f, weights_only=True)['step']  # noqa: E731
    assert sorted(p.name for p in out.glob('ckpt*.pth')) == [
        'ckpt_epoch0001.pth', 'ckpt_epoch0002.pth', 'ckpt_last.pth', 'ckpt_step00000006.pth', 'ckpt_step00000008.pth']
    assert [step(f) for f in ('ckpt_epoch0001.pth', 'ckpt_epoch0002.pth', 'ckpt_last.pth', 'ckpt_step00000006.pth',
                              'ckpt_step00000008.pth')] == [5, 10, 10, 6, 8]


def test_a_resume_with_other_settings_is_refused_and_touches_nothing(folder, tmp_path):
    out = tmp_path / 'r'
    T.train(tiny_config(folder, out, max_steps=2))
    before = folder_bytes(out)
    with pytest.raises(ValueError, match=r"checkpoint of another run \(schedule length in steps \(--epochs / "
                                         r"--max-steps\): 2 in the checkpoint, 4 now\).*--allow-config-change"):
        T.train(tiny_config(folder, out, max_steps=4, resume=True))
    with pytest.raises(ValueError, match=r"seed: 0 in the checkpoint, 1 now"):
        T.train(tiny_config(folder, out, max_steps=2, resume=True, seed=1))
    with pytest.raises(ValueError, match=r"model_args: .* in the checkpoint"):
        T.train(tiny_config(folder, out, max_steps=2, resume=True, model_args=dict(img_size=16, depth=1)))
    assert folder_bytes(out) == before  # config.json, log.jsonl, the checkpoint: byte for byte as they were
    res = T.train(tiny_config(folder, out, max_steps=4, resume=True, allow_config_change=True))
    assert res.step == 4


# -- several processes -------------------------------------------------------------------------------------------------

def torchrun(args, nproc=2, env=None):
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', str(nproc), '--master_addr',
           '127.0.0.1', '--master_port', str(free_port()), *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, 'OMP_NUM_THREADS': '1', **(env or {})})


@pytest.mark.parametrize('amp', ['off', pytest.param('bf16', marks=pytest.mark.slow)])  # bf16: a bound, not exactness
def test_two_processes_equal_one_with_the_same_global_batch(folder, tmp_path, amp):
    T.train(tiny_config(folder, tmp_path / 'one', aug='rrc', amp=amp))
    two = torchrun(['-m', 'ldae_models', 'train', *cli_args(folder, tmp_path / 'two', '--aug', 'rrc', '--amp', amp)])
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = load_file(str(tmp_path / 'one/model.safetensors')), load_file(str(tmp_path / 'two/model.safetensors'))
    assert a.keys() == b.keys()
    for k in a:  # the l-DAE's tokenizer and loss stay float32: bf16 agrees as closely here (8 steps)
        assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6), (k, (a[k] - b[k]).abs().max().item())


_ONE_RANK_STOPS = """
import os, signal, sys
import ldae_models.engine.loop as L
from ldae_models.cli import main
orig = L.lr_at
def lr_then_signal(step, *a, **k):
    if step == 2 and os.environ['RANK'] == '1':  # only process 1 gets the notice
        os.kill(os.getpid(), signal.SIGTERM)
    return orig(step, *a, **k)
L.lr_at = lr_then_signal
sys.exit(main(['train'] + sys.argv[1:]))
"""


def test_a_notice_to_one_process_stops_all_at_one_step_and_resumes_exactly(folder, tmp_path):
    """Under torchrun the processes agree on the stop by time (``--stop-check-s``), at a step all of them compute: a
    SIGTERM to process 1 alone stops both at the same step boundary with one checkpoint, exit 75, and the resumed run
    gives the one-process weights."""
    T.train(tiny_config(folder, tmp_path / 'one', max_steps=8))
    run = cli_args(folder, tmp_path / 'two', '--max-steps', '8', '--stop-check-s', '0.01')
    script = tmp_path / 'one_rank_stops.py'
    script.write_text(_ONE_RANK_STOPS)
    cut = torchrun([str(script), *run])
    assert cut.returncode != 0 and 'stopped at step' in cut.stderr, cut.stderr[-3000:]
    stopped = [r for r in logs(tmp_path / 'two') if r.get('event') == 'preempted']
    assert len(stopped) == 1 and 3 <= stopped[0]['step'] < 8  # one agreed step, the notice came in step 2
    assert torch.load(tmp_path / 'two' / E.CKPT_NAME, weights_only=True)['step'] == stopped[0]['step']
    resumed = torchrun(['-m', 'ldae_models', 'train', *run, '--resume'])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = load_file(str(tmp_path / 'one/model.safetensors')), load_file(str(tmp_path / 'two/model.safetensors'))
    assert all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in a)


def test_gradient_accumulation_matches_one_big_batch(folder, tmp_path):
    T.train(tiny_config(folder, tmp_path / 'a', max_steps=3))
    T.train(tiny_config(folder, tmp_path / 'b', max_steps=3, accum_steps=2))
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
        T.train(tiny_config(folder, out, log_every=100, nan_check_every=100))  # read at the checkpoint
    good = torch.load(out / E.CKPT_NAME, weights_only=True)
    assert good['step'] == 4 and all(torch.isfinite(v).all() for v in good['model'].values())
    assert not (out / 'model.safetensors').exists()


def test_bad_arguments_are_refused_before_anything_is_written(folder, tmp_path):
    with pytest.raises(ValueError, match='larger than the data set'):
        T.train(tiny_config(folder, tmp_path / 'x', batch_size=64))
    assert not (tmp_path / 'x').exists()  # a failed run leaves nothing behind
    (tmp_path / 'mine').mkdir()
    (tmp_path / 'mine' / 'notes.txt').write_text('kept')
    with pytest.raises(ValueError, match='larger than the data set'):
        T.train(tiny_config(folder, tmp_path / 'mine', batch_size=64))
    assert [f.name for f in (tmp_path / 'mine').iterdir()] == ['notes.txt']  # a folder of the user's: as it was
    with pytest.raises(ValueError, match='--max-steps must be >= 0, got -1'):
        tiny_config(folder, tmp_path / 'y', max_steps=-1)
    with pytest.raises(ValueError, match='divisible'):
        T.train(tiny_config(folder, tmp_path / 'y', accum_steps=3))
    with pytest.raises(FileNotFoundError, match=r'--data-root .*nope does not exist \(--dataset folder reads an '
                                                r'ImageFolder'):
        T.train(tiny_config(tmp_path / 'nope', tmp_path / 'z'))
    (tmp_path / 'afile.txt').write_text('x')
    with pytest.raises(ValueError, match=r'--out .*afile.txt is a file, not a folder: choose a folder'):
        T.train(tiny_config(folder, tmp_path / 'afile.txt'))
    with pytest.raises(ValueError, match=r'--out .*afile.txt/run is inside .*afile.txt, which is a file'):
        T.train(tiny_config(folder, tmp_path / 'afile.txt' / 'run'))
    assert not any(p.name != 'afile.txt' and p.name != 'mine' for p in tmp_path.iterdir())


# -- the step itself: no host sync ---------------------------------------------------------------------------------

def test_a_training_step_never_waits_for_the_host(folder, tmp_path, monkeypatch):
    """Zero value reads and zero tensors from Python data in every step that is not a log, check or checkpoint step
    (the PCA tokenizer's fitted flag lives on the host; normalisation constants are copied once)."""
    counts = count_step_syncs(monkeypatch, lambda: T.train(tiny_config(
        folder, tmp_path / 'r', max_steps=6, log_every=100, ckpt_every=100, nan_check_every=100, ema=0.99)))
    steps = {s: counts.get(s, []) for s in range(1, 5)}  # step 5 is the last: a log, check and checkpoint step
    assert steps == {s: [] for s in range(1, 5)}, steps


# -- the sampler and the seed streams ---------------------------------------------------------------------------------

def test_epoch_order_is_sharded_micro_batched_and_resumes():
    def plan(rank, start=0, world=2):
        return [(s, rows.start, pos.tolist()) for s, micro in E.StepBatches(40, 8, 2, world, rank, 7).plan(start, 10)
                for rows, pos in micro]
    r0, r1 = plan(0), plan(1)
    for epoch in range(2):  # 5 steps of 8 per epoch
        a = [i for s, _, idx in r0 if s // 5 == epoch for i in idx]
        b = [i for s, _, idx in r1 if s // 5 == epoch for i in idx]
        assert not set(a) & set(b) and sorted(a + b) == list(range(40))  # disjoint, together a permutation
    assert plan(0, start=3) == [k for k in r0 if k[0] >= 3]  # a resumed run reads what it would have read
    assert [k[1] for k in r1[:2]] == [4, 6]  # process 1's half of the global batch, in 2 micro-batches
    one = [i for s, _, idx in plan(0, world=1) if s == 0 for i in idx]  # one process: the same global batch, in order
    assert one == [i for s, _, idx in r0 if s == 0 for i in idx] + [i for s, _, idx in r1 if s == 0 for i in idx]
    data = ImageData(torch.arange(40, dtype=torch.uint8).view(40, 1, 1, 1).expand(40, 3, 1, 1), torch.arange(40), [])
    micro = [list(m) for _, m in E.StepBatches(40, 8, 2, 1, 0, 7).read(data, 0, 2, 1, torch.device('cpu'))]
    assert [m.last for m in micro[0]] == [False, True] and micro[0][1].rows == slice(4, 8)
    assert micro[0][0].labels.tolist() == [k[2] for k in plan(0, world=1)][0]
    with pytest.raises(ValueError, match='--batch-size 8 must be divisible by processes x accumulation steps'):
        E.StepBatches(40, 8, 3, 1, 0, 0)
    with pytest.raises(ValueError, match='--micro-batch 3 does not divide'):
        E.accumulation_steps(8, 1, 3)


def test_the_seed_streams_are_named_distinct_and_stable():
    seeds = {s: E.seed_of(0, s, 5) for s in E.Stream}
    assert len(set(seeds.values())) == len(E.Stream)
    assert E.seed_of(3, E.Stream.STEP_DRAWS, 9) == E.seed_of(3, E.Stream.STEP_DRAWS, 9) != E.seed_of(3, 2, 10)
    assert torch.equal(E.epoch_order(100, 1, 2), E.epoch_order(100, 1, 2))
    assert E.seed_of(0, E.Stream.EPOCH_ORDER, 0) == 2021538380681966146  # the streams of 0.2's runs, unchanged


def test_the_optimizer_is_timms_with_weight_decay_groups(folder, tmp_path):
    """Weight decay spares norms, biases and what no_weight_decay() names (a student's position embedding inside
    RepFusion's parts too), read back from the optimizer; --opt sgd trains; LARS adapts the matrices only (MAE's)."""
    from ldae_models.jobs.repfusion import DistillConfig
    parts = torch.nn.ModuleDict(dict(student=timm.create_model('vit_tiny_patch16_224', img_size=16, patch_size=4,
                                                                depth=1, num_classes=2), projector=torch.nn.Linear(8, 8)))
    opt = E.build_optimizer(parts, DistillConfig(weight_decay=0.05), 1e-3, torch.device('cpu'))
    names = {id(p): n for n, p in parts.named_parameters()}
    decay = {g['weight_decay']: {names[id(p)] for p in g['params']} for g in opt.param_groups}
    assert set(decay) == {0.0, 0.05} and type(opt).__name__ == 'AdamW' and opt.defaults['betas'] == E.ADAMW_BETAS
    assert {'student.pos_embed', 'student.cls_token', 'student.norm.weight', 'student.blocks.0.attn.qkv.bias',
            'projector.bias'} <= decay[0.0]
    assert all(n.endswith('weight') and 'norm' not in n for n in decay[0.05])
    lars = E.build_optimizer(parts['projector'], DistillConfig(opt='lars', weight_decay=0.0), 0.5, torch.device('cpu'))
    adapt = {tuple(p.shape): g['always_adapt'] for g in lars.param_groups for p in g['params']}
    assert adapt == {(8, 8): True, (8,): False} and type(lars).__name__ == 'Lars'
    out = tmp_path / 'sgd'
    res = T.train(tiny_config(folder, out, opt='sgd', lr=1e-2, max_steps=2, ema=0))
    state = torch.load(out / E.CKPT_NAME, weights_only=True)
    assert res.step == 2 and 'momentum_buffer' in next(iter(state['optimizer']['state'].values()))
    with pytest.raises(ValueError, match="--opt 'nope'"):
        T.train(tiny_config(folder, tmp_path / 'nope', opt='nope', max_steps=1))
