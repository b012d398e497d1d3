"""Model creation time: ``timm.create_model(name)`` of the zoo's merged encoders (no weights) beside timm's own ViT of
the same size, each in a fresh process (the first creation is what a user waits for), median over repeats.

    python benchmarks/bench_create.py --repeats 3

A merged model without weights is built as the fold of a fresh adaLN-Zero encoder would be, without folding random
numbers in float64 (what made ``ldae_vit_l`` take 26 s); what is left is drawing the random weights.
"""
import argparse
import json
import statistics
import subprocess
import sys

PAIRS = [('ldae_vit_b', 'vit_base_patch16_224'), ('ldae_vit_l', 'vit_large_patch16_224'),
         ('ldae_vit_tiny_patch4_32', 'vit_tiny_patch16_224')]
_SNIPPET = ('import time, timm, ldae_models; t0 = time.perf_counter(); timm.create_model({name!r}{kw}); '
            'print(time.perf_counter() - t0)')


def seconds(name: str, kw: str = '') -> float:
    out = subprocess.run([sys.executable, '-c', _SNIPPET.format(name=name, kw=kw)], capture_output=True, text=True,
                         check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--repeats', type=int, default=3)
    ap.add_argument('--out')
    args = ap.parse_args()
    rows = []
    for ours, peer in PAIRS:
        runs = {k: [] for k in ('merged', 'conditional', 'timm')}
        for _ in range(args.repeats):  # interleaved, so that load on the machine hits all three alike
            runs['merged'].append(seconds(ours))
            runs['conditional'].append(seconds(ours, ', merged=False'))
            runs['timm'].append(seconds(peer))
        row = dict(model=ours, timm_peer=peer, **{k: round(statistics.median(v), 2) for k, v in runs.items()})
        rows.append(row)
        print(json.dumps(row), flush=True)
    print('\n| model | merged (s) | conditional (s) | timm ViT of that size (s) |\n|---|---|---|---|')
    for r in rows:
        print(f"| {r['model']} | {r['merged']} | {r['conditional']} | {r['timm']} ({r['timm_peer']}) |")
    if args.out:
        with open(args.out, 'w') as f:
            json.dump(rows, f, indent=2)


if __name__ == '__main__':
    main()
