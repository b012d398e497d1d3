"""``ldae-models timm SCRIPT [ARGS]``: run one of timm's command-line scripts (``train.py``, ``validate.py``,
``benchmark.py``, ``inference.py`` of the timm repository) with the zoo registered, so that ``--model`` takes its names:

    ldae-models timm train.py --data-dir DATA --model ldae_vit_tiny_patch4_32.cifar10 --pretrained --num-classes 10
    torchrun --nproc_per_node 8 -m ldae_models timm train.py ...
"""
import argparse
import runpy
import sys
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser('timm', help="run one of timm's scripts (train.py, validate.py, ...) with the zoo registered",
                       description="Run a script of the timm repository (train.py, validate.py, benchmark.py, "
                                   'inference.py) as it runs alone, with the zoo\'s models registered with timm first.')
    p.add_argument('script', help="the script's path (e.g. pytorch-image-models/train.py)")
    p.add_argument('args', nargs=argparse.REMAINDER, help="the script's own arguments")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import ldae_models  # noqa: F401  (registers the zoo with timm)
    script = Path(args.script)
    if not script.is_file():
        raise FileNotFoundError(f'no such script: {script} (timm\'s scripts are in the timm repository: '
                                f'https://github.com/huggingface/pytorch-image-models)')
    sys.argv = [str(script), *args.args]
    sys.path.insert(0, str(script.resolve().parent))
    try:
        runpy.run_path(str(script), run_name='__main__')
    except SystemExit as e:  # the script's own exit status
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return 0
