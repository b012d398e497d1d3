"""The GPU campaign: one foreground command, within a wall-time budget, on a bare GPU machine, to the zoo's first
GPU-trained l-DAE and the tables around it.

    PYTHONPATH=. python experiments/gpu_campaign.py --npz cifar10.npz --out campaign_out     # on the GPU
    PYTHONPATH=. python experiments/gpu_campaign.py --smoke --out smoke_out                   # toy size, a CPU

It needs no install and no package index: a copy of this tree (run from its root, ``PYTHONPATH=.``), Python, torch,
torchvision and timm. The first lines it prints are those versions, the CUDA version and the GPU; where one is below
what the package needs, it stops at once and names what to bring. ``--budget-min`` (default 8) is wall time from the
process start, imports included: every stage checks the clock, and what still runs when a stage's time is up is
stopped (training runs by SIGTERM: they checkpoint and exit 75) in time to write the files.

In order:

1. ``throughput``: the l-DAE training step beside timm's ViT step (MFU) for the tiny DAE and ViT-B/16 (ViT-L/16 from
   ``--budget-min 15``);
2. ``sweep``: the tiny DAE over latent scale, d, sigma_max and random resized crop, ``--parallel`` runs at once;
3. ``long``: the best sweep recipe for what the budget leaves, with the paper's ``trends`` beside it (latent vs pixel
   noise, multi vs single level, target image vs latent vs noise); its weights are exported as soon as it stops,
   however it stops (the end, the budget, a SIGTERM: from its checkpoint);
4. ``probes``: every run by the linear probe (L-BFGS on standardised features) and kNN on both splits, last encoder
   block, its own t, clean input, with the floors (a random timm ViT of the same shape, raw pixels); the long run on a
   (block, t) grid, clean and noisy, cell by cell while the budget lasts.

The output folder (``--out``) holds at most 8 files of at most 16 MiB, at most 2 folders deep, named in letters,
digits, ``.``, ``_`` and ``-``: ``results.json``, ``results.md`` (rewritten after every stage), ``runs.png``,
``grid.png``, and the long run's whole DAE in float16 as safetensors shards with their index (``long_dae_fp16/``,
the model arguments in the index's metadata). Runs and features go to ``--work`` (default: a temporary folder).

Data: ``--npz`` takes CIFAR-10 (or any data set) in the ``npz`` layout; ``ldae-models pack`` writes one from
torchvision's CIFAR-10 (``--max-bytes`` for a copy that fits beside the tree in what a GPU machine receives).
"""
import time

T0 = time.time()  # the budget counts from here: imports included

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable, Dict, List, Optional, Tuple  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODEL = 'ldae_vit_tiny_patch4_32'
SMOKE_ARGS = dict(embed_dim=64, depth=2, num_heads=2)  # a toy DAE for --smoke
SWEEP = {  # stage 2: each recipe is a set of `ldae-models train` flags on top of the base
    'base': [],
    'whiten': ['--latent-scale', 'whiten'],
    'd4': ['--latent-dim', '4'],
    'd8': ['--latent-dim', '8'],
    'sigma4': ['--sigma-max', '4'],
    'rrc': ['--aug', 'rrc'],
    'whiten_sigma4': ['--latent-scale', 'whiten', '--sigma-max', '4'],
}
TRENDS = {  # the paper's comparisons, each against 'base' (latent noise, multi-level, predict the image)
    'pixel_noise': ['--noise-space', 'pixel', '--residual-weight', '1'],
    'single_level': ['--schedule', 'single'],
    'target_latent': ['--target', 'latent'],
    'target_noise': ['--target', 'noise'],
}
GRID_TS = [0, 10, 20, 40, 80, 160]
OUT_NAME = re.compile(r'^[A-Za-z0-9._-]+$')
MAX_FILES, MAX_FILE_BYTES, MAX_DEPTH = 8, 16 << 20, 2


# -- 0. the machine ----------------------------------------------------------------------------------------------------

def _version(text: str) -> Tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r'\d+', text.split('+')[0])[:3])


def requirements() -> Dict[str, str]:
    """The lowest versions the package needs, read from pyproject.toml (``name>=X``)."""
    text = (ROOT / 'pyproject.toml').read_text()
    deps = text.split('dependencies = [', 1)[1].split(']', 1)[0]
    return {m.group(1): m.group(2) for m in re.finditer(r'"([A-Za-z0-9_-]+)>=([0-9.]+)', deps)}


def check_machine(log: Callable[[str], None]) -> Dict[str, str]:
    """Print Python, torch, torchvision, timm, CUDA and the GPU; stop, naming what to bring, where a version is
    missing or below what the package needs."""
    found = {'python': platform.python_version()}
    for name in ('torch', 'torchvision', 'timm', 'safetensors', 'huggingface_hub', 'numpy', 'PIL'):
        try:
            module = __import__(name)
            found[name] = getattr(module, '__version__', '?')
        except ImportError:
            found[name] = 'missing'
    import torch
    found['cuda'] = str(torch.version.cuda)
    found['gpu'] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'
    log('machine: ' + ', '.join(f'{k} {v}' for k, v in found.items()))
    problems = []
    for name, low in requirements().items():
        key = {'huggingface-hub': 'huggingface_hub', 'pillow': 'PIL'}.get(name, name)
        have = found.get(key)
        if have is None:
            continue
        if have == 'missing' or _version(have) < _version(low):
            problems.append(f'{name} {have} (needs >= {low}: bring a wheel, e.g. `pip download --no-deps "{name}>={low}"` '
                            f'where there is an index, and `pip install --no-index --no-deps WHEEL` here)')
    if problems:
        raise SystemExit('gpu_campaign: this machine lacks what the package needs: ' + '; '.join(problems))
    return found


# -- the campaign ----------------------------------------------------------------------------------------------------

class Campaign:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out = Path(args.out)
        self.work = Path(args.work or tempfile.mkdtemp(prefix='ldae-campaign-'))
        self.work.mkdir(parents=True, exist_ok=True)
        self.end = T0 + args.budget_min * 60
        self.stopped: Optional[str] = None  # a SIGTERM to the campaign itself
        self.running: Dict[str, subprocess.Popen] = {}
        self.results: Dict[str, Any] = dict(config=vars(args), stages={}, runs={})
        self.log_lines: List[str] = []
        self.npz = args.npz
        self._splits = None
        self.sweep = {n: SWEEP[n] for n in (args.sweep or SWEEP)}
        self.trends = {n: TRENDS[n] for n in (args.trends if args.trends is not None else TRENDS)}

    # -- bookkeeping ---------------------------------------------------------------------------------------------------
    def log(self, msg: str) -> None:
        line = f'[{time.strftime("%H:%M:%S")} +{(time.time() - T0) / 60:4.1f} min] {msg}'
        print(line, flush=True)

    def left(self) -> float:
        """Seconds of the budget left."""
        return self.end - time.time()

    def save(self) -> None:
        """results.json and results.md, written whole (a temporary file, then a rename) after every stage."""
        self.results['elapsed_min'] = round((time.time() - T0) / 60, 2)
        self.out.mkdir(parents=True, exist_ok=True)
        for name, text in (('results.json', json.dumps(self.results, indent=2, default=str) + '\n'),
                           ('results.md', self.report())):
            tmp = self.out / f'.{name}.tmp'
            tmp.write_text(text)
            os.replace(tmp, self.out / name)

    def guarded(self, what: str, fn: Callable[[], Any]) -> Any:
        """Run one piece; an error is logged and recorded, and the campaign goes on."""
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 -- one failed probe must not cost the GPU time left
            self.log(f'  {what} failed: {type(e).__name__}: {e}')
            return dict(error=f'{type(e).__name__}: {e}')

    def device(self) -> str:
        import torch
        return 'cuda' if torch.cuda.is_available() and not self.args.smoke else 'cpu'

    # -- data ----------------------------------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        """--smoke without --npz: a small synthetic set in the npz layout (a colour per class)."""
        if self.npz:
            if not Path(self.npz).is_file():
                raise SystemExit(f'gpu_campaign: --npz {self.npz}: no such file (write one with ldae-models pack)')
            return
        if not self.args.smoke:
            raise SystemExit('gpu_campaign: --npz is required (CIFAR-10 in the npz layout: ldae-models pack)')
        import numpy as np
        rng = np.random.default_rng(0)
        arrays = {}
        for split, n in (('train', self.args.smoke_train), ('test', self.args.smoke_test)):
            y = rng.integers(0, 10, n)
            x = rng.integers(0, 120, (n, 32, 32, 3)).astype(np.uint8)
            x[np.arange(n), :, :, y % 3] += (60 + 13 * y).astype(np.uint8)[:, None, None]
            arrays[f'x_{split}'], arrays[f'y_{split}'] = x, y
        self.npz = str(self.work / 'smoke.npz')
        np.savez(self.npz, **arrays)

    def splits(self):
        """Both splits, decoded once and kept on the device, for every probe."""
        if self._splits is None:
            from ldae_models.data import load_split
            self._splits = tuple(load_split('npz', self.npz, s, 32, progress=False).to(self.device())
                                 for s in ('train', 'test'))
        return self._splits

    # -- 1. throughput ------------------------------------------------------------------------------------------------
    def throughput(self) -> None:
        if self.args.no_throughput:
            return
        self.log('stage throughput: the l-DAE step beside timm ViT, MFU')
        spec = __import__('importlib.util').util.spec_from_file_location(
            'bench_train_throughput', ROOT / 'benchmarks' / 'bench_train_throughput.py')
        bench = __import__('importlib.util').util.module_from_spec(spec)
        spec.loader.exec_module(bench)
        if self.args.smoke:
            models, sizes, rounds = [MODEL], [8], 1
        else:
            keep = [i for i, m in enumerate(bench.DEFAULT_MODELS) if self.args.budget_min >= 15 or 'large' not in m]
            models, sizes = [bench.DEFAULT_MODELS[i] for i in keep], [bench.DEFAULT_BATCH[i] for i in keep]
            rounds = 3 if self.args.budget_min >= 15 else 1

        def run() -> Dict[str, Any]:
            res = bench.run(models, sizes, rounds=rounds)
            return dict(res, table=bench.table(res))
        self.results['stages']['throughput'] = self.guarded('throughput', run)
        self.save()

    # -- training runs -----------------------------------------------------------------------------------------------
    def train_argv(self, name: str, extra: List[str], epochs: int, long: bool = False) -> List[str]:
        a = self.args
        argv = ['train', '--model', MODEL, '--dataset', 'npz', '--data-root', self.npz, '--out',
                str(self.work / 'runs' / name), '--epochs', str(epochs), '--batch-size', str(a.batch_size),
                '--lr', str(a.lr), '--warmup-epochs', str(max(epochs / 8, 0.1)), '--seed', str(a.seed),
                '--log-every', str(a.log_every), '--ckpt-every', '200' if long else '1000000',
                '--pca-images', str(a.pca_images), '--quiet', '--workers', '0']
        if a.smoke:
            argv += ['--model-args', json.dumps(SMOKE_ARGS), '--device', 'cpu']
        if long and a.ema:
            argv += ['--ema', str(a.ema)]
        return argv + extra

    def train_runs(self, jobs: Dict[str, List[str]], deadline: float) -> Dict[str, Dict[str, Any]]:
        """``ldae-models train`` processes, ``--parallel`` at a time, each stopped by SIGTERM at ``deadline`` (it
        checkpoints and exits 75); returns each one's exit status, wall time and last log line."""
        pending, done = list(jobs.items()), {}
        env = {**os.environ, 'PYTHONUNBUFFERED': '1',
               'PYTHONPATH': os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get('PYTHONPATH')] if p])}
        starts: Dict[str, float] = {}
        logs: Dict[str, Any] = {}
        stopping = set()
        while pending or self.running:
            while pending and len(self.running) < self.args.parallel and time.time() < deadline and not self.stopped:
                name, argv = pending.pop(0)
                (self.work / 'runs' / name).mkdir(parents=True, exist_ok=True)
                logs[name] = open(self.work / 'runs' / name / 'stdout.log', 'w')
                self.running[name] = subprocess.Popen([sys.executable, '-m', 'ldae_models', *argv], stdout=logs[name],
                                                      stderr=subprocess.STDOUT, env=env, cwd=ROOT)
                starts[name] = time.time()
            if (time.time() >= deadline or self.stopped) and pending:
                for name, _ in pending:
                    done[name] = dict(returncode=None, skipped='no time left')
                pending.clear()
            if time.time() >= deadline or self.stopped:
                for name, proc in self.running.items():
                    if proc.poll() is None and name not in stopping:  # once: a second SIGTERM would kill it
                        self.log(f'  run {name}: stopped at its deadline (SIGTERM)')
                        proc.send_signal(signal.SIGTERM)
                        stopping.add(name)
            time.sleep(0.5)
            for name, proc in list(self.running.items()):
                if proc.poll() is None:
                    continue
                logs[name].close()
                done[name] = dict(returncode=proc.returncode, wall_s=round(time.time() - starts[name], 1),
                                  last=self.last_record(name))
                del self.running[name]
                self.log(f'  run {name}: exit {proc.returncode}, {done[name]["wall_s"]} s, last {done[name]["last"]}')
        return done

    def last_record(self, name: str) -> Dict[str, Any]:
        path = self.work / 'runs' / name / 'log.jsonl'
        records = [json.loads(x) for x in path.read_text().splitlines()] if path.is_file() else []
        steps = [r for r in records if 'loss' in r]
        return steps[-1] if steps else {}

    def weights(self, name: str) -> Optional[Path]:
        """A run's whole-DAE weights: its final file, or (stopped early) the model of its checkpoint."""
        run = self.work / 'runs' / name
        if (run / 'model.safetensors').is_file():
            return run / 'model.safetensors'
        return run / 'ckpt_last.pth' if (run / 'ckpt_last.pth').is_file() else None

    def dae(self, name: str):
        from ldae_models.models import full_model
        path = self.weights(name)
        kwargs = dict(SMOKE_ARGS) if self.args.smoke else {}
        flags = self.results['runs'][name]['flags']
        for flag, field, kind in (('--latent-dim', 'latent_dim', int), ('--latent-scale', 'latent_scale', str),
                                  ('--noise-space', 'noise_space', str), ('--schedule', 'schedule', str),
                                  ('--target', 'target', str), ('--residual-weight', 'residual_weight', float)):
            if flag in flags:
                kwargs[field] = kind(flags[flags.index(flag) + 1])
        if '--sigma-max' in flags:
            kwargs['schedule_args'] = {'sigma_max': float(flags[flags.index('--sigma-max') + 1])}
        return full_model(MODEL, checkpoint=str(path), **kwargs).eval().to(self.device()), kwargs

    # -- 2-3. probes ---------------------------------------------------------------------------------------------------
    def probe(self, name: str) -> Dict[str, Any]:
        """Linear probe and kNN of a run's last encoder block at its own t, clean input."""
        from ldae_models.probe import grid_probe

        def fn() -> Dict[str, Any]:
            dae, _ = self.dae(name)
            enc = dae.encoder
            train, test = self.splits()
            (layer, t), cell = next(iter(grid_probe(enc, train, test, layers=[enc.num_taps - 1], ts=[enc.t],
                                                    noisy_input=False, device=self.device(), seed=self.args.seed,
                                                    knn=True).items()))
            return dict(top1=cell['top1'], knn_top1=cell['knn_top1'], layer=layer, t=t, n_train=len(train),
                        n_test=len(test))
        return self.guarded(f'probe of {name}', fn)

    def probe_runs(self, names: List[str], deadline: float) -> None:
        for name in names:
            run = self.results['runs'][name]
            if self.weights(name) is None or 'probe' in run:
                continue
            if time.time() + self.probe_s() > deadline:
                run['probe'] = dict(skipped='no time left')
                continue
            t0 = time.time()
            run['probe'] = self.probe(name)
            self.results.setdefault('probe_s', []).append(round(time.time() - t0, 1))
            self.log(f'  probe {name}: {run["probe"]}')
            self.save()

    def probe_s(self) -> float:
        """The time a probe takes (the slowest seen; a first guess before any)."""
        return max(self.results.get('probe_s') or [30.0 if not self.args.smoke else 5.0])

    def floors(self, deadline: float) -> None:
        from ldae_models.probe import floors
        if time.time() + 2 * self.probe_s() > deadline or self.weights('base') is None:
            self.results['floors'] = dict(skipped='no time left')
            return
        self.log('floors: a random timm ViT of the same shape, raw pixels')

        def fn() -> Dict[str, Any]:
            enc = self.dae('base')[0].encoder
            train, test = self.splits()
            return floors(enc, train, test, layer=enc.num_taps - 1, device=self.device(), seed=self.args.seed)
        self.results['floors'] = self.guarded('floors', fn)
        self.save()

    def grid(self, name: str, deadline: float) -> None:
        """The long run's whole DAE on a (block, t) grid, clean and noisy, a t at a time while the budget lasts."""
        from ldae_models.features import dataset_features
        from ldae_models.probe import probe_features
        if self.weights(name) is None:
            return
        dae, _ = self.dae(name)
        depth = dae.encoder.num_taps
        layers = sorted(set(list(range(1, depth, max(1, depth // 6))) + [depth - 1] +
                            [depth + k for k in (0, 1, 3) if depth + k < dae.num_taps]))
        ts = [0, 40] if self.args.smoke else GRID_TS
        train, test = self.splits()
        for noisy in (False, True):
            key = 'grid_noisy' if noisy else 'grid_clean'
            cells = self.results.setdefault(key, [])
            for t in ts:
                if time.time() + self.probe_s() * max(1.0, len(layers) / 3) > deadline:
                    self.log(f'  {key}: stopped at t = {t} (the budget)')
                    break
                kw = dict(layers=layers, ts=[t], noisy_input=noisy, device=self.device(), progress=False)
                ftr = dataset_features(dae, train, seed=self.args.seed, **kw)
                fte = dataset_features(dae, test, seed=self.args.seed + 1, **kw)
                rows = probe_features(ftr, train.labels, fte, test.labels, device=self.device(), seed=self.args.seed)
                cells += [dict(layer=k[0], t=k[1], top1=v['top1']) for k, v in rows.items()]
                self.save()

    # -- the long run's weights --------------------------------------------------------------------------------------
    def export_long(self) -> None:
        """The long run's whole DAE in float16 shards (the PCA and the positions stay float32), written as soon as it
        stops, from its final file or its checkpoint."""
        import torch
        from ldae_models.hub import read_checkpoint, save_sharded, unwrap_state_dict
        from ldae_models.hub.publish import cast_floats
        path = self.weights('long')
        if path is None:
            self.log('  the long run left no weights')
            return
        state = unwrap_state_dict(read_checkpoint(str(path)))  # a checkpoint: its EMA weights when it has them
        dest = self.out / 'long_dae_fp16'
        if dest.exists():
            shutil.rmtree(dest)
        _, kwargs = self.dae('long')
        run = self.results['runs']['long']
        ckpt = torch.load(path, weights_only=True) if path.suffix == '.pth' else None
        step = int(ckpt['step']) if ckpt else run.get('train', {}).get('last', {}).get('step')
        index = save_sharded(cast_floats(state, torch.float16), dest, max_shard_bytes=15 << 20,
                             metadata=dict(architecture=MODEL, model_args=json.dumps(kwargs), step=str(step),
                                           source=path.name))
        run['weights'] = dict(index=str(index.relative_to(self.out)), step=step, from_file=path.name)
        self.log(f'  the long run\'s weights (step {step}, from {path.name}): {index}')
        self.save()

    # -- the plan ---------------------------------------------------------------------------------------------------
    def run(self) -> None:
        a = self.args
        self.log(f'campaign: budget {a.budget_min} min from the process start, smoke={a.smoke}, work {self.work}')
        self.prepare_data()
        self.throughput()

        # 2. the sweep, then its probes and the floors
        budget = self.end - time.time()
        sweep_end = time.time() + 0.35 * budget
        self.log(f'stage sweep: {len(self.sweep)} recipes x {a.short_epochs} epochs, {a.parallel} at once, '
                 f'until +{(sweep_end - T0) / 60:.1f} min')
        done = self.train_runs({n: self.train_argv(n, f, a.short_epochs) for n, f in self.sweep.items()}, sweep_end)
        for n, f in self.sweep.items():
            self.results['runs'][n] = dict(stage='sweep', flags=f, epochs=a.short_epochs, train=done[n])
        self.save()
        probes_end = time.time() + 0.15 * budget
        self.probe_runs(list(self.sweep), probes_end)
        self.floors(probes_end)
        ok = {n: r['probe']['top1'] for n, r in self.results['runs'].items() if 'top1' in r.get('probe', {})}
        best = max(ok, key=ok.get) if ok else 'base'
        self.results['best_recipe'] = best

        # 3. the long run, the trends beside it; its weights exported as soon as it stops
        reserve = max(a.reserve_min * 60, 6 * self.probe_s())
        long_end = self.end - reserve
        epoch_s = max([d.get('wall_s', 0) / max(a.short_epochs, 1) for d in done.values() if d.get('wall_s')] + [1.0])
        epochs = a.long_epochs or max(1, int((long_end - time.time()) / epoch_s))
        self.log(f'stage long: {best!r} for up to {epochs} epochs, until +{(long_end - T0) / 60:.1f} min; the trends '
                 f'beside it')
        jobs = {'long': self.train_argv('long', self.sweep[best], epochs, long=True)}
        jobs.update({n: self.train_argv(n, f, a.short_epochs) for n, f in self.trends.items()})
        self.results['runs']['long'] = dict(stage='long', recipe=best, flags=self.sweep[best], epochs=epochs)
        for n, f in self.trends.items():
            self.results['runs'][n] = dict(stage='trends', flags=f, epochs=a.short_epochs)
        done = self.train_runs(jobs, long_end)
        for n in jobs:
            self.results['runs'][n]['train'] = done.get(n, {})
        self.guarded('export of the long run', self.export_long)
        self.save()

        # 4. the probes of the long run and the trends, then the grid, while the budget lasts
        final = self.end - a.final_s
        self.probe_runs(['long', *self.trends], final)
        self.guarded('grid', lambda: self.grid('long', final))
        self.guarded('plots', self.plots)
        self.save()
        self.log(f'campaign done in {(time.time() - T0) / 60:.2f} min: {self.out}')

    def stop(self, signum: int, frame: Any) -> None:
        """A SIGTERM to the campaign: its runs are stopped (they checkpoint), then the long run's weights are
        exported and the results written; the process exits with 75."""
        self.stopped = signal.Signals(signum).name
        self.log(f'{self.stopped}: stopping the runs, writing what there is')
        raise KeyboardInterrupt

    # -- report ------------------------------------------------------------------------------------------------------
    def report(self) -> str:
        r = self.results
        fl = r.get('floors', {})
        probe = next((x['probe'] for x in r['runs'].values() if 'n_train' in x.get('probe', {})), {})
        lines = [f"# GPU campaign ({'smoke, toy size' if self.args.smoke else 'full'}), {r.get('elapsed_min')} min",
                 '', f"Data: {Path(str(self.npz)).name}; probes on {probe.get('n_train', '?')} train / "
                 f"{probe.get('n_test', '?')} test images, last encoder block, the run's t, clean input; linear probe "
                 'by L-BFGS on standardised features (the optimum of its convex problem), kNN k = 20.', '']
        tp = r['stages'].get('throughput', {})
        if 'table' in tp:
            lines += ['## Throughput', '', tp['table'], '']
        lines += ['## Runs', '', '| run | stage | flags | epochs | last step | train loss | img/s | linear top-1 | '
                  'kNN top-1 |', '|---|---|---|---|---|---|---|---|---|']
        for n, x in r['runs'].items():
            p, last = x.get('probe', {}), x.get('train', {}).get('last', {}) or {}
            lines.append(f"| {n} | {x['stage']} | {' '.join(x['flags']) or '(base)'} | {x['epochs']} | "
                         f"{last.get('step', '')} | {last.get('loss', '')} | {last.get('img_per_s', '')} | "
                         f"{p.get('top1', p.get('error', p.get('skipped', '')))} | {p.get('knn_top1', '')} |")
        for k, v in fl.items() if isinstance(fl, dict) else []:
            if isinstance(v, dict):
                lines.append(f"| floor: {k} | | | | | | | {v.get('top1')} | {v.get('knn_top1', '')} |")
        grid = r.get('grid_clean')
        if isinstance(grid, list) and grid:
            ts = sorted({g['t'] for g in grid})
            lines += ['', '## The long run on a (block, t) grid, clean input', '',
                      '| block \\ t | ' + ' | '.join(f'{t:g}' for t in ts) + ' |', '|---' * (len(ts) + 1) + '|']
            for layer in sorted({g['layer'] for g in grid}):
                cells = {g['t']: g['top1'] for g in grid if g['layer'] == layer}
                lines.append(f'| {layer} | ' + ' | '.join(f"{cells[t]:.2f}" if t in cells else '' for t in ts) + ' |')
        return '\n'.join(lines) + '\n'

    def plots(self) -> None:
        from ldae_models.plots import bar_chart, plot_grid, pyplot
        if pyplot(required=False) is None:
            return
        r = self.results
        rows = [(n, x['probe']['top1']) for n, x in r['runs'].items() if 'top1' in x.get('probe', {})]
        fl = [(f'floor: {k}', v['top1']) for k, v in r.get('floors', {}).items() if isinstance(v, dict) and 'top1' in v]
        bar_chart(rows, fl, self.out / 'runs.png', 'runs (sweep, long, trends) and floors')
        grid = r.get('grid_clean')
        if isinstance(grid, list) and grid:
            plot_grid({(g['layer'], g['t']): g['top1'] for g in grid}, str(self.out / 'grid.png'),
                      title='long run: probe top-1 (%), clean input', layer_label='block (0-based, decoder after encoder)')


def check_output(out: Path) -> List[str]:
    """The output folder's rules (what a GPU machine can bring back); returns what breaks them (empty: none)."""
    problems = []
    files = [p for p in out.rglob('*') if p.is_file()]
    if len(files) > MAX_FILES:
        problems.append(f'{len(files)} files (at most {MAX_FILES})')
    for p in files:
        rel = p.relative_to(out)
        if p.stat().st_size > MAX_FILE_BYTES:
            problems.append(f'{rel}: {p.stat().st_size / 2 ** 20:.1f} MiB (at most 16)')
        if len(rel.parts) > MAX_DEPTH:
            problems.append(f'{rel}: {len(rel.parts) - 1} folders deep (at most {MAX_DEPTH - 1})')
        if not all(OUT_NAME.match(part) for part in rel.parts):
            problems.append(f'{rel}: a name outside letters, digits, ".", "_", "-"')
    return problems


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--npz', help='the data set in the npz layout (ldae-models pack writes one)')
    ap.add_argument('--out', required=True, help='the files to bring back (8 at most)')
    ap.add_argument('--work', help='runs and features (default: a temporary folder)')
    ap.add_argument('--smoke', action='store_true', help='toy size on a CPU: the whole plan in a few minutes')
    ap.add_argument('--budget-min', type=float, default=8.0, help='wall time from the process start (default: 8)')
    ap.add_argument('--reserve-min', type=float, default=1.5, help='minutes kept after the long run for the probes')
    ap.add_argument('--final-s', type=float, default=20.0, help='seconds kept at the end for the plots and files')
    ap.add_argument('--short-epochs', type=int, default=8, help='epochs of a sweep or trend run')
    ap.add_argument('--long-epochs', type=int, default=0, help='epochs of the long run (0: what the budget leaves)')
    ap.add_argument('--batch-size', type=int, default=512)
    ap.add_argument('--lr', type=float, default=1e-3)
    ap.add_argument('--ema', type=float, default=0.9995, help='EMA decay of the long run (0: off)')
    ap.add_argument('--parallel', type=int, default=4, help='training runs at once on the device')
    ap.add_argument('--pca-images', type=int, default=50_000)
    ap.add_argument('--log-every', type=int, default=100)
    ap.add_argument('--seed', type=int, default=0)
    ap.add_argument('--smoke-train', type=int, default=512)
    ap.add_argument('--smoke-test', type=int, default=256)
    ap.add_argument('--no-throughput', action='store_true', help='skip stage 1')
    ap.add_argument('--sweep', nargs='+', choices=list(SWEEP), help='the sweep recipes to run (default: all)')
    ap.add_argument('--trends', nargs='*', choices=list(TRENDS), help='the trend runs (default: all; none: no trends)')
    args = ap.parse_args(argv)
    if args.smoke:  # the long run and one other at a time: on a CPU more only compete for the cores
        args.short_epochs, args.batch_size, args.log_every, args.parallel = 1, 64, 4, 2
        args.pca_images, args.reserve_min = 512, min(args.reserve_min, 0.5)
    campaign = Campaign(args)
    campaign.log('campaign: starting')
    try:
        check_machine(campaign.log)
        sys.path.insert(0, str(ROOT))  # this tree's ldae_models, whatever else is installed
        import ldae_models
        campaign.log(f'ldae_models {ldae_models.__version__} from {Path(ldae_models.__file__).parent}')
        signal.signal(signal.SIGTERM, campaign.stop)
        campaign.run()
        code = 0
    except (KeyboardInterrupt, Exception) as e:  # a SIGTERM, or an error: keep the weights and the results
        if not isinstance(e, KeyboardInterrupt):
            import traceback
            campaign.log(f'error: {type(e).__name__}: {e}\n{traceback.format_exc()}')
            campaign.results['error'] = f'{type(e).__name__}: {e}'
        for proc in campaign.running.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in campaign.running.values():
            proc.wait()
        if 'long' in campaign.results['runs'] and 'weights' not in campaign.results['runs']['long']:
            campaign.guarded('export of the long run', campaign.export_long)
        code = 75 if isinstance(e, KeyboardInterrupt) else 1
    campaign.save()
    problems = check_output(campaign.out)
    if problems:
        campaign.log('the output breaks its rules: ' + '; '.join(problems))
        code = code or 1
    files = sorted(str(p.relative_to(campaign.out)) for p in campaign.out.rglob('*') if p.is_file())
    campaign.log(f'{len(files)} files in {campaign.out}: {", ".join(files)}')
    return code


if __name__ == '__main__':
    sys.exit(main())
