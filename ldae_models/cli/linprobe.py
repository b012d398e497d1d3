"""``ldae-models linprobe``: MAE's linear probe of a frozen encoder, a resumable run (``jobs/linprobe.py``)."""
import argparse

from .common import add_config_args, add_micro_batch, config_from, say, with_micro_batch


def add_parser(sub: argparse._SubParsersAction) -> None:
    from ..jobs.linprobe import LinProbeConfig
    p = sub.add_parser('linprobe', help="MAE's linear probe (augmented, LARS, 90 epochs): a resumable run",
                       description="MAE's linear-probe protocol on a frozen encoder: augmented images every epoch, "
                                   'LARS, batch 16384 by accumulation, warmup and cosine; a run of the training '
                                   'engine (torchrun, resume, preemption), then the top-1 on the test split. Each '
                                   'flag is a field of LinProbeConfig (ldae_models/jobs/linprobe.py).')
    add_micro_batch(p)
    add_config_args(p, LinProbeConfig)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..jobs.linprobe import LinProbeConfig, linprobe
    cfg = with_micro_batch(config_from(LinProbeConfig, args), args.micro_batch)
    result = linprobe(cfg)
    say(f"{cfg.model} (MAE's linear probe): top-1 {result['top1']:.2f}% on {result['n_test']:,} test images; "
        f"{cfg.out}/result.json")
    return 0
