"""Host syncs per training step: pre-training (l-DAE), distillation (RepFusion) and MAE's linear probe.

Each job runs a few steps on a small synthetic ImageFolder; every op that makes a GPU wait for the host (a read of a
tensor's value: ``.item()``, ``bool()``, data-dependent shapes) or copies pageable host data to it (a tensor made from
Python data) is counted per step by ``engine.HostSyncCounter`` (a ``TorchDispatchMode``; the ops are the same on a
CPU). Log, check and checkpoint steps are left out (they read the loss on purpose); so are the optimizer's step
counters, host tensors on a GPU too.

    python benchmarks/bench_host_syncs.py --out benchmarks/results/bench_host_syncs.json
    python benchmarks/bench_host_syncs.py --src OLD_CHECKOUT      # the jobs of another checkout (before/after)

With ``--src`` the jobs are those of the checkout given (its ``ldae_models`` is imported), counted by this tree's
counter (loaded from its file).
"""
import argparse
import importlib.util
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, List

HERE = Path(__file__).resolve().parents[1]
TINY = dict(img_size=16, embed_dim=32, depth=2, num_heads=2, latent_dim=6)


def counter_class():
    """This tree's ``HostSyncCounter`` (runtime.py imports only torch), whichever ldae_models is imported."""
    spec = importlib.util.spec_from_file_location('_runtime', HERE / 'ldae_models' / 'engine' / 'runtime.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.HostSyncCounter


def make_folder(root: Path) -> Path:
    import torch
    from PIL import Image
    g = torch.Generator().manual_seed(0)
    for split, n in (('train', 32), ('test', 8)):
        for c in range(2):
            d = root / split / f'c{c}'
            d.mkdir(parents=True)
            for i in range(n):
                x = torch.rand(16, 16, 3, generator=g) * 90
                x[..., c * 2] += 150
                Image.fromarray(x.clamp(0, 255).byte().numpy()).save(d / f'{i}.png')
    return root


def count(job: Callable[[], Any], loops: List[Any], opts: List[Any], steps: int) -> Dict[str, Any]:
    """Run ``job`` with the counter on; ``loops``: the modules whose ``lr_at`` marks a step."""
    counter = counter_class()(ignore=lambda t: any(t is s.get('step') for o in opts for s in o.state.values()))
    for module in loops:
        orig = module.lr_at

        def lr(step, *a, _orig=orig, **k):
            counter.label = step
            return _orig(step, *a, **k)
        module.lr_at = lr
    with counter:
        job()
    inner = {s: counter.counts.get(s, []) for s in range(1, steps - 1)}  # not the first nor the log/ckpt step
    per_step = [len(v) for v in inner.values()]
    ops = sorted({op for v in inner.values() for op in v})
    return dict(steps_counted=len(per_step), syncs_per_step=statistics.median(per_step) if per_step else None,
                max_per_step=max(per_step) if per_step else None, ops=ops)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--src', help='a checkout whose jobs to count (default: this one)')
    ap.add_argument('--steps', type=int, default=6)
    ap.add_argument('--out')
    args = ap.parse_args()
    sys.path.insert(0, str(Path(args.src).resolve() if args.src else HERE))
    import torch
    import ldae_models.engine.loop as L
    opts: List[Any] = []
    build = L.build_optimizer
    L.build_optimizer = lambda *a, **k: opts.append(build(*a, **k)) or opts[-1]
    quiet = dict(log_every=10 ** 6, ckpt_every=10 ** 6, nan_check_every=10 ** 6, workers=0, quiet=True)
    tmp = Path(tempfile.mkdtemp())
    folder = make_folder(tmp / 'data')
    steps = args.steps
    result: Dict[str, Any] = dict(src=args.src or 'this checkout', torch=torch.__version__)

    try:  # this tree's layout
        from ldae_models.jobs.pretrain import TrainConfig, train
        from ldae_models.jobs.repfusion import DistillConfig, distill
        from ldae_models.jobs.linprobe import LinProbeConfig, linprobe
        new = True
    except ImportError:  # the layout before the jobs package
        from ldae_models.train import TrainConfig, train
        from ldae_models.distill import DistillConfig, distill
        new = False
    common = dict(data_root=str(folder), batch_size=8, max_steps=steps, warmup_epochs=0.5, **quiet)
    result['train'] = count(lambda: train(TrainConfig(out=str(tmp / 'train'), model_args=TINY, pca_images=32,
                                                      ema=0.99, **common)), [L], opts, steps)
    teacher = f'local-dir:{tmp / "train" / "encoder"}'
    dist = dict(common, max_steps=0, epochs=2, task_epochs=0)  # 2 epochs of 4 steps
    result['distill'] = count(lambda: distill(DistillConfig(out=str(tmp / 'distill'), teacher=teacher,
                                                            student='resnet18', policy='reinforce', t_bins=20,
                                                            **dist)), [L], opts, 8)
    if new:
        result['mae_probe'] = count(lambda: linprobe(LinProbeConfig(
            out=str(tmp / 'lp'), model=teacher, data_root=str(folder), epochs=steps, warmup_epochs=1, batch_size=16,
            accum_steps=2, **quiet)), [L], opts, steps * 4)
    else:
        import ldae_models.probe as P
        from ldae_models.data import load_split
        from ldae_models.models import load_model
        enc = load_model(teacher, pretrained=True).eval()
        data = load_split('folder', folder, 'train', 16, progress=False)
        result['mae_probe'] = count(lambda: P.mae_linear_probe(enc, data, data, epochs=steps, warmup_epochs=1,
                                                               batch_size=16, micro_batch=8, workers=0),
                                    [P], opts, steps * 4)
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + '\n')


if __name__ == '__main__':
    main()
