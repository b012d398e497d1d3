"""RepFusion's three timestep policies side by side, with a student trained from scratch at the same budget.

Each run is ``ldae_models.jobs.repfusion.distill`` (what ``ldae-models distill`` runs): stage 1 distils the teacher at its
last encoder block for ``--epochs`` epochs, stage 2 trains the student on the labels for ``--task-epochs``; the
baseline trains the same student on the labels alone for ``--epochs + --task-epochs`` epochs (the same number of
epochs), and a second one for ``--task-epochs`` only (the same label epochs as the distilled students). Beside
them, on the same splits, linear probes of the floors (a random student of the same shape, the raw pixels) and of
the teacher at its own tap. A finished run is not run again (``WORK/RUN/row.json``, keyed by its config). Every student is then
measured on the whole test split.

    ldae-models pack --dataset cifar10 --data-root ~/data --download --out cifar10.npz   # torchvision's CIFAR-10
    python benchmarks/bench_repfusion.py --npz cifar10.npz --work runs/repfusion --train-images 10000 \\
        --epochs 3 --task-epochs 5 --out benchmarks/results/bench_repfusion_cpu.json
"""
import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch

from ldae_models.data import load_split
from ldae_models.jobs.repfusion import DistillConfig, distill


def top1(student_dir: Path, test) -> float:
    """The exported student (``OUT/student``, loaded by plain timm) on the whole test split."""
    import timm
    from ldae_models.probe import classifier_top1
    model = timm.create_model(f'local-dir:{student_dir}', pretrained=True)
    return round(classifier_top1(model, test, img_size=test.images.shape[-1]), 2)


def linear_floors(student: str, teacher: str, train, test) -> dict:
    """Linear probes (L-BFGS on standardised pooled features) on the same splits: a randomly initialised student,
    the raw pixels (the floors), and the teacher at its own tap (what the students are asked to match)."""
    import timm
    from ldae_models.features import dataset_features
    from ldae_models.probe import floors, probe_features
    model = timm.create_model(student, num_classes=10)
    model.pretrained_cfg = dict(model.pretrained_cfg, mean=(0.5,) * 3, std=(0.5,) * 3)  # as the students were fed
    out = floors(model, train, test, knn=False)
    t = timm.create_model(teacher, pretrained=True).eval()
    kw = dict(progress=False)
    ftr = dataset_features(t, train, **kw)
    fte = dataset_features(t, test, **kw)
    (key, cell), = probe_features(ftr, train.labels, fte, test.labels).items()
    out['teacher'] = dict(cell, layer=key[0], t=key[1])
    return {k: dict(v, top1=round(v['top1'], 2)) for k, v in out.items()}


def subset_npz(npz: str, n: int, out: Path, seed: int = 0) -> Path:
    """The first ``n`` images of a seeded permutation of the train split (all of test), as an .npz."""
    tr = load_split('npz', npz, 'train', progress=False).subset(n, seed)
    te = load_split('npz', npz, 'test', progress=False)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, x_train=tr.images.permute(0, 2, 3, 1).numpy(), y_train=tr.labels.numpy(),
             x_test=te.images.permute(0, 2, 3, 1).numpy(), y_test=te.labels.numpy())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--npz', required=True, help="CIFAR-10 in the npz layout ({split}_jpeg + {split}_offsets, y_{split}; see the README's Data)")
    ap.add_argument('--work', default='runs/repfusion')
    ap.add_argument('--teacher', default='ldae_vit_tiny_patch4_32.cifar10')
    ap.add_argument('--student', default='resnet18')
    ap.add_argument('--train-images', type=int, default=10_000)
    ap.add_argument('--epochs', type=int, default=3, help='stage 1 (distillation) epochs')
    ap.add_argument('--task-epochs', type=int, default=5, help='stage 2 (labels) epochs')
    ap.add_argument('--batch-size', type=int, default=128)
    ap.add_argument('--policies', nargs='+', default=['fixed', 'random', 'reinforce'])
    ap.add_argument('--seed', type=int, default=0)
    ap.add_argument('--out')
    args = ap.parse_args()
    work = Path(args.work)
    data = subset_npz(args.npz, args.train_images, work / 'train_subset.npz', args.seed)
    test = load_split('npz', args.npz, 'test', progress=False)
    base = DistillConfig(teacher=args.teacher, student=args.student, dataset='npz', data_root=str(data),
                         epochs=args.epochs, task_epochs=args.task_epochs, batch_size=args.batch_size,
                         warmup_epochs=1, seed=args.seed, log_every=20, ckpt_every=1000, quiet=True)
    runs = {p: dataclasses.replace(base, policy=p, out=str(work / p)) for p in args.policies}
    runs['scratch'] = dataclasses.replace(base, epochs=0, task_epochs=args.epochs + args.task_epochs,
                                         out=str(work / 'scratch'))
    # the same student on labels for only the task stage's epochs: what the distillation epochs add to it
    runs['scratch_task_epochs'] = dataclasses.replace(base, epochs=0, task_epochs=args.task_epochs,
                                                      out=str(work / 'scratch_task_epochs'))
    rows = []
    for name, cfg in runs.items():
        done = work / name / 'row.json'   # a finished run is not run again (the whole table takes ~40 min on 2 cores)
        if done.is_file() and json.loads(done.read_text())['config'] == dataclasses.asdict(cfg):
            rows.append(json.loads(done.read_text())['row'])
            print(json.dumps(rows[-1]), '(cached)', flush=True)
            continue
        t0 = time.time()
        result = distill(cfg)
        wall = round(time.time() - t0, 1)
        row = dict(run=name, policy=cfg.policy if cfg.epochs else '(none: labels only)', distill_epochs=cfg.epochs,
                   task_epochs=cfg.task_epochs, wall_s=wall, top1=top1(Path(result['student']), test))
        hist = work / name / 't_histogram.json'
        if hist.is_file():
            h = json.loads(hist.read_text())['rows']
            last = torch.tensor([r['t_hist'] for r in h[-5:]], dtype=torch.float32).sum(0)
            row['t_share_last_logs'] = [round(v, 3) for v in (last / last.sum()).tolist()]
        rows.append(row)
        done.write_text(json.dumps(dict(config=dataclasses.asdict(cfg), row=row)))
        print(json.dumps(row), flush=True)
    probes = linear_floors(args.student, args.teacher, load_split('npz', str(data), 'train', progress=False), test)
    out = dict(data='CIFAR-10 (JPEG copy)', n_train=args.train_images, n_test=len(test), teacher=args.teacher,
               teacher_layer='last encoder block (default)', student=args.student, batch_size=args.batch_size,
               threads=torch.get_num_threads(), rows=rows, linear_probes=probes)
    print('\n| run | policy | distill epochs | task epochs | test top-1 (%) | wall (s) |\n|---|---|---|---|---|---|')
    for r in rows:
        print(f"| {r['run']} | {r['policy']} | {r['distill_epochs']} | {r['task_epochs']} | {r['top1']} | {r['wall_s']} |")
    print('\nlinear probes on the same splits (L-BFGS, standardised pooled features):')
    for name, cell in probes.items():
        print(f"  {name}: {cell['top1']}%")
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=2))


if __name__ == '__main__':
    main()
