"""The command line: ``ldae-models COMMAND`` (also ``python -m ldae_models``). Each command lives in one module with
its parser and its run; this file dispatches.

    ldae-models demo                          # the shipped CIFAR-10 model: features + denoising figure
    ldae-models train --dataset cifar10 --data-root ~/data --out runs/tiny --epochs 400       # cli/train.py
    ldae-models distill ...                   # RepFusion                                      # cli/distill.py
    ldae-models extract | probe | linprobe    # features, the fast probe, MAE's probe          # cli/extract.py ...
    ldae-models check-data | pack             # unreadable images; a data set as one .npz     # cli/data.py
    ldae-models list | info NAME | convert SRC DST | export NAME DST                          # cli/zoo.py
    ldae-models timm train.py ARGS           # one of timm's scripts, the zoo registered      # cli/timm_scripts.py

A mistake (a missing file, an unknown model, a bad argument) is answered with one line naming it and exit status 2;
``--debug`` (or ``LDAE_MODELS_DEBUG=1``) shows the traceback instead. A run stopped by SIGTERM / SIGUSR1 after its
checkpoint exits with status 75.
"""
import argparse
import os
import sys
import typing
from typing import List, Optional

from . import data, demo, distill, extract, linprobe, probe, timm_scripts, train, zoo
from .common import DEFAULT_MODEL

__all__ = ['main', 'build_parser', 'DEFAULT_MODEL']

_USER_ERRORS = (ValueError, OSError, FloatingPointError, ImportError)  # ImportError: those that say what to install
_COMMANDS = (demo, train, distill, extract, probe, linprobe, data, zoo, timm_scripts)  # in the order of `ldae-models --help`


class _Parser(argparse.ArgumentParser):
    """argparse, whose refusal of a flag is one line (and where to look), not the whole usage."""

    def error(self, message: str) -> 'typing.NoReturn':
        self.exit(2, f'{self.prog}: error: {message}\n({self.prog} --help lists the flags)\n')


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog='ldae-models', description='Denoising-based self-supervised encoders for timm.')
    ap.add_argument('--debug', action='store_true', help='show the traceback of an error')
    sub = ap.add_subparsers(dest='command', required=True, parser_class=_Parser)
    for command in _COMMANDS:
        command.add_parser(sub)
    return ap


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = '--debug' in argv  # accepted anywhere on the line
    args = build_parser().parse_args([a for a in argv if a != '--debug'])
    debug = debug or os.environ.get('LDAE_MODELS_DEBUG', '') not in ('', '0')
    from ..engine import PREEMPTED_EXIT_CODE, Preempted
    try:
        return args.run(args)
    except Preempted as e:  # SIGTERM / SIGUSR1: the checkpoint is written; a requeue resumes with --resume
        print(f'ldae-models {args.command}: {e}', file=sys.stderr)
        return PREEMPTED_EXIT_CODE
    except BrokenPipeError:  # the reader went away (`ldae-models list | head`): stop quietly, as Unix tools do
        sys.stdout = open(os.devnull, 'w')
        return 0
    except _USER_ERRORS as e:
        if debug or (isinstance(e, ImportError) and 'pip install' not in str(e)):
            raise
        print(f'ldae-models {args.command}: error: {e}\n(--debug shows the traceback)', file=sys.stderr)
        return 2


if __name__ == '__main__':
    sys.exit(main())
