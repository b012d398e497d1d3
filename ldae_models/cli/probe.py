"""``ldae-models probe``: the linear probe (and kNN) of an encoder's frozen features at one or a grid of (layer, t),
with the floors of the same run (``probe.py``); features by way of a folder that ``extract`` wrote."""
import argparse
from typing import Any, Dict

from .common import add_data_args, add_model_args, at_least, load_cli_model, say
from .extract import add_feature_args, features_of, split_of, subset_defaults


def add_parser(sub: argparse._SubParsersAction) -> None:
    from ..probe import SOLVERS
    p = sub.add_parser('probe', help='linear-probe an encoder', description='Linear probe (and kNN) of an encoder on '
                       'a data set. fast (default): features once, the convex problem solved by L-BFGS; grid: every '
                       "(layer, t). --floors adds a random network of the same shape and the raw pixels, measured in "
                       "the same run. MAE's augmented protocol: ldae-models linprobe.")
    add_model_args(p, default=None)
    add_data_args(p)
    add_feature_args(p)
    p.add_argument('--mode', choices=('fast', 'grid'), default='fast')
    p.add_argument('--features', help='feature folder (ldae-models extract): read when it holds these features, '
                                      'written otherwise; its subset and seed are taken unless given')
    p.add_argument('--t', type=float, help="the encoder's t (default: the one it was trained for)")
    p.add_argument('--solver', choices=SOLVERS, default='lbfgs', help='(default: %(default)s)')
    p.add_argument('--weight-decay', type=at_least(0, float), default=0.0,
                   help="L2 penalty of the probe (default: none, as MAE's probe; a small penalty such as 1e-4 makes "
                        'the optimum unique where the train features are separable)')
    p.add_argument('--check-lbfgs', action='store_true', help='with --solver adam: also solve by L-BFGS and print both')
    p.add_argument('--knn', action=argparse.BooleanOptionalAction, default=True, help='kNN (k=20, cosine) too')
    p.add_argument('--floors', action='store_true', help='also probe a random network of the same shape and raw pixels')
    p.add_argument('--epochs', type=at_least(1), default=90, help='--solver adam: epochs (default: %(default)s)')
    p.add_argument('--lr', type=at_least(0, float), default=1e-3, help='--solver adam: lr (default: %(default)s)')
    p.add_argument('--out', help='write the result as JSON here')
    p.add_argument('--plot', help='grid: write the heat map here (PNG)')
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..data import check_data_root
    from ..engine import resolve_device
    from ..features import feature_cells
    from ..plots import plot_grid
    from ..probe import grid_to_json, probe_features, write_json
    check_data_root(args.dataset, args.data_root, ('train', 'test'), args.download)
    taken = subset_defaults(args, args.features)
    if taken:
        say(f'{args.features} holds features of {", ".join(taken)}: taken from it (give the flags to choose others)')
    device = resolve_device(args.device)
    model = load_cli_model(args, merged=False, **({} if args.t is None else {'t': args.t})).to(device)
    layers = args.layers or ([-1] if args.mode == 'fast' else list(range(model.num_taps)))
    cells = feature_cells(model, layers, args.ts)  # checked against the model before any data is read
    result: Dict[str, Any] = dict(model=args.model, checkpoint=args.checkpoint, mode=args.mode, dataset=args.dataset,
                                  noisy_input=args.noisy_input, device=str(device))
    ftr, ytr, s_tr = features_of(args, model, cells, device, 'train', args.features)
    fte, yte, s_te = features_of(args, model, cells, device, 'test', args.features)
    result.update(n_train=len(ytr), n_test=len(yte), extract_s=round(s_tr + s_te, 3))
    solver = dict(solver=args.solver, weight_decay=args.weight_decay, epochs=args.epochs, lr=args.lr, device=device,
                  seed=args.seed)
    say(f'probing {len(ftr)} (block, t) cells ({args.solver})')
    rows = probe_features(ftr, ytr, fte, yte, knn=args.knn, check_lbfgs=args.check_lbfgs, **solver)
    result['grid'] = grid_to_json(rows)
    best = max(rows, key=lambda k: rows[k]['top1'])
    result.update(top1=rows[best]['top1'], best_layer=best[0], best_t=best[1])
    for (layer, t), r in rows.items():
        print(f'{args.model}: block {layer} t {t:g}: linear top-1 {r["top1"]:.2f}%' +
              (f', kNN {r["knn_top1"]:.2f}%' if 'knn_top1' in r else '') +
              (f' (L-BFGS {r["lbfgs_top1"]:.2f}%)' if 'lbfgs_top1' in r else ''))
    if args.floors:
        from ..probe import floors
        fl = floors(model, split_of(args, 'train'), split_of(args, 'test'), layer=cells[-1][0], knn=args.knn,
                    batch_size=args.batch_size_features, progress=True, log=say, workers=args.workers,
                    bad='drop' if args.skip_bad_images else 'raise', **solver)
        for name, r in fl.items():
            print(f'floor {name}: linear top-1 {r["top1"]:.2f}%' + (f', kNN {r["knn_top1"]:.2f}%' if 'knn_top1' in r
                                                                     else ''))
        result['floors'] = fl
    if args.mode == 'grid' and args.plot:
        plot_grid({k: v['top1'] for k, v in rows.items()}, args.plot, title=f'{args.model}: linear probe top-1 (%)')
        print(f'wrote {args.plot}')
    if args.out:
        write_json(args.out, result)
        print(f'wrote {args.out}')
    return 0
