"""Everything one GPU session should produce, in one command: throughput, a recipe sweep, the long run, the paper's
trends, every run probed against the floors, and the long run's weights.

    # on the GPU, in the background (so that a closed terminal or a short command limit does not stop it)
    nohup python benchmarks/gpu_campaign.py --npz CIFAR10.npz --work runs/campaign > runs/campaign.log 2>&1 &
    tail -n 3 runs/campaign/progress.log                          # its progress
    python benchmarks/gpu_campaign.py --collect runs/campaign --out results/   # the files to keep (8 at most)

    python benchmarks/gpu_campaign.py --smoke --npz CIFAR10.npz --work runs/smoke --out runs/smoke_out  # CPU

The default budget is 8 minutes on one GPU (``--budget-min``), start-up included: the whole plan fits one command of
at most 10 minutes. Results are written as they come: every finished run, probe and floor rewrites
``WORK/results.json`` and ``WORK/results.md`` at once, and training runs still going when the budget ends are stopped
with SIGTERM (they checkpoint and exit 75; ``--resume`` continues them), so a command cut at its limit leaves every
finished row. At the default budget the throughput stage measures the tiny DAE and ViT-B/16 only (ViT-L/16 with
``--budget-min`` 15 or more). Nothing here has run on a GPU yet: the stage times are estimates.

In order (each stage appends to ``WORK/progress.log``):

1. ``throughput``: ``bench_train_throughput`` (the l-DAE step beside timm's ViT step, MFU) for the tiny and small
   DAE at 32 px and ViT-B/16 and ViT-L/16 at 256 px;
2. ``sweep``: the tiny DAE at a short budget over the choices that matter most at 32 px (latent scale, d, a larger
   sigma_max, random resized crop), ``--parallel`` runs at once on the one GPU;
3. ``long``: the best sweep recipe (by linear-probe top-1) for as many epochs as the budget leaves;
4. ``trends``: the paper's comparisons at the short budget (latent vs pixel noise, multi vs single level, target image
   vs latent vs noise), run beside the long run;
5. ``probes``: every run by the fast linear probe and kNN on the full CIFAR-10 (JPEG copy), last encoder block, t = 10
   (its own t for the single level), clean input; the floors (a random timm ViT of the same shape, raw pixels) in the
   same run; the long run also on a (block, t) grid over encoder and first decoder blocks, clean and noisy.

``--collect`` gathers ``results.json``, ``results.md``, two plots and the long run's whole DAE in float16 as
safetensors shards of at most 15 MiB with their index (which ``file=`` and ``ldae-models convert`` read).
``--smoke`` runs all of it at toy size (a small model, 1,024 training images) on a CPU in a few minutes.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

HERE = Path(__file__).resolve().parent
MODEL = 'ldae_vit_tiny_patch4_32'
# The sweep (stage 2): each recipe is a set of ldae-models train flags on top of the base.
SWEEP = {
    'base': [],
    'whiten': ['--latent-scale', 'whiten'],
    'd4': ['--latent-dim', '4'],
    'd8': ['--latent-dim', '8'],
    'sigma4': ['--sigma-max', '4'],
    'rrc': ['--aug', 'rrc'],
    'whiten_sigma4': ['--latent-scale', 'whiten', '--sigma-max', '4'],
}
# The paper's comparisons (stage 4), each against 'base' (latent noise, multi-level, predict the image).
TRENDS = {
    'pixel_noise': ['--noise-space', 'pixel', '--residual-weight', '1'],
    'single_level': ['--schedule', 'single'],
    'target_latent': ['--target', 'latent'],
    'target_noise': ['--target', 'noise'],
}
GRID_TS = [0, 10, 20, 40, 80, 160]
SMOKE_GRID_TS = [0, 40]


class Campaign:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.work = Path(args.work)
        self.work.mkdir(parents=True, exist_ok=True)
        self.t0 = time.time()
        self.results: Dict[str, Any] = dict(config={k: v for k, v in vars(args).items()}, stages={}, runs={})
        self.npz = args.npz

    # -- bookkeeping -----------------------------------------------------------------------------------------------
    def log(self, msg: str) -> None:
        line = f'[{time.strftime("%H:%M:%S")} +{(time.time() - self.t0) / 60:5.1f} min] {msg}'
        print(line, flush=True)
        with open(self.work / 'progress.log', 'a') as f:
            f.write(line + '\n')

    def save(self, report: bool = True) -> None:
        """results.json, and results.md beside it: a campaign cut at any moment leaves every finished row."""
        self.results['elapsed_min'] = round((time.time() - self.t0) / 60, 2)
        tmp = self.work / 'results.json.tmp'
        tmp.write_text(json.dumps(self.results, indent=2, default=str))
        os.replace(tmp, self.work / 'results.json')
        if report:
            self.write_report(plots=False)

    def left_s(self) -> float:
        return self.args.budget_min * 60 - (time.time() - self.t0)

    def python(self, *argv: str) -> List[str]:
        return [sys.executable, '-m', 'ldae_models', *argv]

    # -- stage 0: data ----------------------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        """The smoke test trains on a small .npz cut from the real one (or synthetic images without it)."""
        if not self.args.smoke:
            return
        import numpy as np
        small = self.work / 'smoke.npz'
        if self.npz and Path(self.npz).is_file():
            from ldae_models.data import load_split
            tr, te = load_split('npz', self.npz, 'train', progress=False), load_split('npz', self.npz, 'test', progress=False)
            tr, te = tr.subset(self.args.smoke_train), te.subset(self.args.smoke_test)
            arrays = dict(x_train=tr.images.permute(0, 2, 3, 1).numpy(), y_train=tr.labels.numpy(),
                          x_test=te.images.permute(0, 2, 3, 1).numpy(), y_test=te.labels.numpy())
        else:  # synthetic: a colour per class
            rng = np.random.default_rng(0)
            arrays = {}
            for split, n in (('train', self.args.smoke_train), ('test', self.args.smoke_test)):
                y = rng.integers(0, 10, n)
                x = rng.integers(0, 120, (n, 32, 32, 3)).astype(np.uint8)
                x[np.arange(n), :, :, y % 3] += (60 + 13 * y).astype(np.uint8)[:, None, None]
                arrays[f'x_{split}'], arrays[f'y_{split}'] = x, y
        np.savez(small, **arrays)
        self.npz = str(small)

    # -- stage 1 ----------------------------------------------------------------------------------------------------
    def throughput(self) -> None:
        self.log('stage throughput: l-DAE training step beside timm ViT, MFU')
        sys.path.insert(0, str(HERE))
        import bench_train_throughput as B
        if self.args.smoke:
            models, sizes, rounds = ['ldae_vit_tiny_patch4_32'], [8], 1
        else:  # ViT-L/16 only where the budget has room for it
            keep = [i for i, m in enumerate(B.DEFAULT_MODELS) if self.args.budget_min >= 15 or 'large' not in m]
            models, sizes = [B.DEFAULT_MODELS[i] for i in keep], [B.DEFAULT_BATCH[i] for i in keep]
            rounds = 3 if self.args.budget_min >= 15 else 1
        try:
            res = B.run(models, sizes, rounds=rounds)
            res['table'] = B.table(res)
        except Exception as e:  # noqa: BLE001 -- an OOM or a missing kernel must not cost the lease
            res = dict(error=f'{type(e).__name__}: {e}')
        self.results['stages']['throughput'] = res
        self.save()
        self.log('throughput done' + ('' if 'error' not in res else f' with an error: {res["error"]}'))

    # -- training ---------------------------------------------------------------------------------------------------
    def train_flags(self, name: str, extra: List[str], epochs: int, long: bool = False) -> List[str]:
        a = self.args
        flags = ['train', '--model', MODEL, '--dataset', 'npz', '--data-root', self.npz, '--out',
                 str(self.work / 'runs' / name), '--epochs', str(epochs), '--batch-size', str(a.batch_size),
                 '--lr', str(a.lr), '--warmup-epochs', str(max(epochs / 8, 0.1)), '--seed', str(a.seed),
                 '--log-every', str(a.log_every), '--ckpt-every', '1000000', '--pca-images', str(a.pca_images),
                 '--quiet', '--workers', '0']
        if a.smoke:
            flags += ['--model-args', json.dumps(dict(embed_dim=64, depth=2, num_heads=2)), '--device', 'cpu']
        if long:  # checkpoints every 200 steps: a run stopped at the budget resumes from there
            flags[flags.index('--ckpt-every') + 1] = '200'
            if a.ema:
                flags += ['--ema', str(a.ema)]
        return flags + extra

    def run_parallel(self, jobs: Dict[str, List[str]], parallel: int) -> Dict[str, Dict[str, Any]]:
        """Run ``ldae-models`` jobs, ``parallel`` at a time; returns per job its wall time, exit status and last log."""
        pending, running, done = list(jobs.items()), {}, {}
        env = {**os.environ, 'PYTHONUNBUFFERED': '1'}
        while pending or running:
            while pending and len(running) < parallel:
                name, argv = pending.pop(0)
                (self.work / 'runs' / name).mkdir(parents=True, exist_ok=True)
                logf = open(self.work / 'runs' / name / 'stdout.log', 'w')
                running[name] = (subprocess.Popen(self.python(*argv), stdout=logf, stderr=subprocess.STDOUT, env=env),
                                 time.time(), logf)
            time.sleep(2)
            if self.left_s() < self.args.reserve_min * 60 * 0.5:  # the budget ends: stop (they checkpoint, exit 75)
                for name, (proc, _, _) in running.items():
                    if proc.poll() is None:
                        self.log(f'  run {name}: stopped at the budget (SIGTERM)')
                        proc.terminate()
                pending.clear()
            for name, (proc, start, logf) in list(running.items()):
                if proc.poll() is None:
                    continue
                logf.close()
                done[name] = dict(returncode=proc.returncode, wall_s=round(time.time() - start, 1),
                                  last=self.last_log(name))
                del running[name]
                self.log(f'  run {name}: exit {proc.returncode}, {done[name]["wall_s"]} s, last {done[name]["last"]}')
        return done

    def last_log(self, name: str) -> Dict[str, Any]:
        path = self.work / 'runs' / name / 'log.jsonl'
        records = [json.loads(x) for x in path.read_text().splitlines()] if path.is_file() else []
        steps = [r for r in records if 'loss' in r]
        return steps[-1] if steps else {}

    # -- probes (the library, in this process: the splits are decoded once for every probe) --------------------
    def device(self) -> str:
        import torch
        return 'cuda' if torch.cuda.is_available() and not self.args.smoke else 'cpu'

    def splits(self):
        """Both splits of the campaign's data, decoded once and kept on the device."""
        if getattr(self, '_splits', None) is None:
            from ldae_models.data import load_split
            self._splits = tuple(load_split('npz', self.npz, split, 32, progress=False).to(self.device())
                                 for split in ('train', 'test'))
        return self._splits

    def encoder(self, name: str):
        """A run's conditional encoder, from the ``save_pretrained`` folder the trainer wrote."""
        from ldae_models.models import load_model
        return load_model(f'local-dir:{self.work / "runs" / name / "encoder"}', pretrained=True).eval().to(self.device())

    def guarded(self, what: str, fn: Any) -> Dict[str, Any]:
        """Run one probe; an error is logged and recorded, and the campaign goes on."""
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 -- one failed probe must not cost the lease
            self.log(f'  {what} failed: {type(e).__name__}: {e}')
            return dict(error=f'{type(e).__name__}: {e}')

    def probe(self, name: str) -> Dict[str, Any]:
        """Linear probe and kNN of a run's last encoder block at its own t, clean input."""
        from ldae_models.probe import grid_probe

        def fn() -> Dict[str, Any]:
            enc = self.encoder(name)
            train, test = self.splits()
            (layer, t), cell = next(iter(grid_probe(enc, train, test, layers=[enc.num_taps - 1], ts=[enc.t],
                                                    noisy_input=False, device=self.device(), seed=self.args.seed,
                                                    knn=True).items()))
            return dict(top1=cell['top1'], knn_top1=cell['knn_top1'], layer=layer, t=t, n_train=len(train),
                        n_test=len(test))
        return self.guarded(f'probe of {name}', fn)

    def probe_runs(self, names: List[str]) -> None:
        for name in names:
            run = self.results['runs'][name]
            if run.get('train', {}).get('returncode') != 0:
                continue
            run['probe'] = self.probe(name)
            self.log(f'  probe {name}: {run["probe"]}')
            self.save()

    def floors(self) -> None:
        """A random timm ViT of the base run's shape (same block) and the raw pixels, with the same probe."""
        from ldae_models.probe import floors
        self.log('floors: a random timm ViT of the same shape, raw pixels')

        def fn() -> Dict[str, Any]:
            enc = self.encoder('base')
            train, test = self.splits()
            return floors(enc, train, test, layer=enc.num_taps - 1, device=self.device(), seed=self.args.seed)
        self.results['floors'] = self.guarded('floors', fn)
        self.log(f'  floors: {self.results["floors"]}')
        self.save()

    def grid(self, name: str) -> None:
        """The whole DAE of a run on a (block, t) grid: encoder blocks and the first decoder blocks, clean and noisy."""
        from ldae_models.models import full_model
        from ldae_models.probe import grid_probe, grid_to_json
        runs = self.work / 'runs' / name
        model_args = json.loads((runs / 'encoder' / 'config.json').read_text())['model_args']
        enc_depth = model_args['depth']
        layers = list(range(1, enc_depth, max(1, enc_depth // 6))) + [enc_depth - 1]
        layers += [enc_depth + k for k in (0, 1, 3) if enc_depth + k < 2 * enc_depth]  # the first decoder blocks
        ts = SMOKE_GRID_TS if self.args.smoke else GRID_TS
        dae_args = {k: v for k, v in model_args.items() if k != 'merged'}
        for noisy in (False, True):
            key = 'grid_noisy' if noisy else 'grid_clean'

            def fn() -> Any:
                dae = full_model(MODEL, checkpoint=str(runs / 'model.safetensors'), **dae_args).eval().to(self.device())
                train, test = self.splits()
                return grid_to_json(grid_probe(dae, train, test, layers=sorted(set(layers)), ts=ts, noisy_input=noisy,
                                               device=self.device(), seed=self.args.seed))
            self.results[key] = self.guarded(key, fn)
            self.log(f'  {key}: {"done" if isinstance(self.results[key], list) else self.results[key]}')
            self.save()

    # -- the plan ---------------------------------------------------------------------------------------------------
    def run(self) -> None:
        a = self.args
        self.log(f'campaign start: budget {a.budget_min} min, smoke={a.smoke}')
        self.prepare_data()
        if not a.no_throughput:
            self.throughput()

        self.log(f'stage sweep: {len(SWEEP)} recipes x {a.short_epochs} epochs, {a.parallel} at once')
        done = self.run_parallel({n: self.train_flags(n, f, a.short_epochs) for n, f in SWEEP.items()}, a.parallel)
        for n, f in SWEEP.items():
            self.results['runs'][n] = dict(stage='sweep', flags=f, epochs=a.short_epochs, train=done[n])
        self.save()
        self.probe_runs(list(SWEEP))
        self.floors()
        ok = {n: r['probe']['top1'] for n, r in self.results['runs'].items() if 'top1' in r.get('probe', {})}
        best = max(ok, key=ok.get) if ok else 'base'
        self.results['best_recipe'] = best

        # the long run's epochs: what the budget leaves after the trends run beside it, the probes and a reserve
        sweep_wall = max([d['wall_s'] for d in done.values()] + [1.0])
        short_epoch_s = sweep_wall / a.short_epochs  # per epoch, with `parallel` runs sharing the device
        reserve = a.reserve_min * 60
        long_epochs = a.long_epochs or max(1, int((self.left_s() - reserve) / max(short_epoch_s * 0.6, 1e-3)))
        if a.smoke:
            long_epochs = 2
        self.log(f'stage long: recipe {best!r} for {long_epochs} epochs; trends beside it')
        jobs = {'long': self.train_flags('long', SWEEP[best], long_epochs, long=True)}
        jobs.update({n: self.train_flags(n, f, a.short_epochs) for n, f in TRENDS.items()})
        done = self.run_parallel(jobs, a.parallel)
        self.results['runs']['long'] = dict(stage='long', recipe=best, flags=SWEEP[best], epochs=long_epochs,
                                            train=done['long'])
        for n, f in TRENDS.items():
            self.results['runs'][n] = dict(stage='trends', flags=f, epochs=a.short_epochs, train=done[n])
        self.save()
        self.probe_runs(['long', *TRENDS])
        if done['long']['returncode'] == 0:
            self.grid('long')
        self.write_report()
        self.log('campaign done')

    # -- report -----------------------------------------------------------------------------------------------------
    def write_report(self, plots: bool = True) -> None:
        r = self.results
        fl = r.get('floors', {})
        lines = [f"# GPU campaign ({'smoke, toy size' if self.args.smoke else 'full'}), {r['elapsed_min']} min", '',
                 f"Data: CIFAR-10 (JPEG copy){' subset' if self.args.smoke else ''}; probes on "
                 f"{next((x['probe'].get('n_train') for x in r['runs'].values() if 'n_train' in x.get('probe', {})), '?')}"
                 f" train / {next((x['probe'].get('n_test') for x in r['runs'].values() if 'n_test' in x.get('probe', {})), '?')}"
                 " test images, last encoder block, the model's t, clean input.", '']
        tp = r['stages'].get('throughput', {})
        if 'table' in tp:
            lines += ['## Throughput', '', tp['table'], '']
        lines += ['## Runs', '', '| run | stage | flags | epochs | train loss | img/s | linear top-1 | kNN top-1 |',
                  '|---|---|---|---|---|---|---|---|']
        for n, x in r['runs'].items():
            p, last = x.get('probe', {}), x.get('train', {}).get('last', {})
            lines.append(f"| {n} | {x['stage']} | {' '.join(x['flags']) or '(base)'} | {x['epochs']} | "
                         f"{last.get('loss', '')} | {last.get('img_per_s', '')} | {p.get('top1', p.get('error', ''))} | "
                         f"{p.get('knn_top1', '')} |")
        for k, v in fl.items() if isinstance(fl, dict) else []:
            if isinstance(v, dict):
                lines.append(f"| floor: {k} | | | | | | {v.get('top1')} | {v.get('knn_top1', '')} |")
        (self.work / 'results.md').write_text('\n'.join(lines) + '\n')
        if plots:
            self.plots()
            self.save(report=False)

    def plots(self) -> None:
        from ldae_models.plots import bar_chart, plot_grid, pyplot
        if pyplot(required=False) is None:
            return
        r = self.results
        rows = [(n, x['probe']['top1']) for n, x in r['runs'].items() if 'top1' in x.get('probe', {})]
        fl = [(f'floor: {k}', v['top1']) for k, v in r.get('floors', {}).items() if isinstance(v, dict) and 'top1' in v]
        bar_chart(rows, fl, self.work / 'runs.png', 'runs (sweep, long, trends) and floors')
        grid = r.get('grid_clean')
        if isinstance(grid, list) and grid:
            plot_grid({(g['layer'], g['t']): g['top1'] for g in grid}, str(self.work / 'grid_clean.png'),
                      title='long run: probe top-1 (%), clean input', layer_label='block (0-based, decoder after encoder)')


def collect(work: Path, out: Path, shard_mib: int = 15) -> List[str]:
    """The files to bring back: results, report, plots, the long run's whole DAE in float16 shards (8 files at most)."""
    import torch
    from ldae_models.hub import read_checkpoint, save_sharded
    from ldae_models.hub.publish import cast_floats
    out.mkdir(parents=True, exist_ok=True)
    names = []
    for f in ('results.json', 'results.md', 'runs.png', 'grid_clean.png'):
        if (work / f).is_file():
            shutil.copy(work / f, out / f)
            names.append(f)
    weights = work / 'runs' / 'long' / 'model.safetensors'
    if weights.is_file():
        half = cast_floats(read_checkpoint(weights), torch.float16)  # the PCA and the positions stay float32
        index = save_sharded(half, out / 'long_dae_fp16', max_shard_bytes=shard_mib << 20,
                             metadata={'architecture': MODEL})
        names += [str(p.relative_to(out)) for p in sorted(index.parent.iterdir())]
        cfg = json.loads((work / 'runs' / 'long' / 'encoder' / 'config.json').read_text())
        (out / 'long_dae_fp16' / 'model_args.json').write_text(json.dumps(cfg['model_args'], indent=2))
        names.append('long_dae_fp16/model_args.json')
    return names


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--npz', help="CIFAR-10 in the npz layout ({split}_jpeg + {split}_offsets, y_{split}; see the README's Data)")
    ap.add_argument('--work', default='/tmp/ldae_campaign', help='where runs and results are written')
    ap.add_argument('--out', help='with --collect (or after --smoke): where the files to bring back go')
    ap.add_argument('--collect', metavar='WORK', help='only gather the files of a finished campaign into --out')
    ap.add_argument('--smoke', action='store_true', help='toy size on a CPU: the whole plan in a few minutes')
    ap.add_argument('--budget-min', type=float, default=8.0, help='minutes for the whole campaign (default: one 10-minute '
                                                                  'command with the start-up)')
    ap.add_argument('--reserve-min', type=float, default=1.5, help='minutes kept for the probes after training')
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
    args = ap.parse_args()
    if args.collect:
        if not args.out:
            ap.error('--collect needs --out')
        print('\n'.join(collect(Path(args.collect), Path(args.out))))
        return
    if args.smoke:  # one run at a time: on a 2-core CPU parallel runs only compete for the cores
        args.short_epochs, args.batch_size, args.log_every, args.parallel = 1, 64, 4, 1
        args.budget_min, args.reserve_min, args.pca_images = min(args.budget_min, 8.0), 1.0, 512
    elif not args.npz:
        ap.error('--npz is required (CIFAR-10 in the npz layout)')
    Campaign(args).run()
    if args.out:
        print('\n'.join(collect(Path(args.work), Path(args.out))))


if __name__ == '__main__':
    main()
