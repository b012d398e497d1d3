"""The training data and randomness path: the previous per-sample path against the new ones, side by side, in one run.

Three ways to produce a training batch of the tiny l-DAE (images in [-1, 1], t, noise), batch 128:

- ``legacy``: the path of ldae-models 0.1, kept here as the baseline: a DataLoader over the PNG ImageFolder that
  decodes each image and forks the RNG per sample for its transform, then one ``torch.Generator`` per sample for its t
  and its noise (``draw_t_and_noise`` of 0.1, reproduced below);
- ``stream``: the streaming path (``in_memory='no'``, for ImageNet-scale folders): ``data.StepBatches`` over the
  listed split (workers read the files; the batch is decoded by ``data.decode_batch``), t and noise drawn once per
  step for the global batch (``engine.step_draws``);
- ``memory``: the new device-resident path: the data set decoded once into a uint8 tensor, batches cut from it,
  ``step_draws`` for t, noise and crops.

Measured: seconds per batch of the data and randomness alone (what starves a GPU), and img/s of whole training steps
(forward, backward, AdamW) fed by each path, rotating order, median over rounds.

    # an ImageFolder of 5,000 CIFAR-10 PNG files (500 per class)
    python benchmarks/bench_data_path.py --data-root cifar10_png --steps 6 --rounds 3
"""
import argparse
import json
import statistics
import time
from typing import Any, Callable, Dict, Iterator, List, Sequence, Tuple

import torch

from ldae_models.data import load_split, normalize, open_split
from ldae_models.engine import StepBatches, step_draws
from ldae_models.jobs.pretrain import DenoisingObjective, TrainConfig, build_model

_MASK = (1 << 63) - 1


def legacy_sample_seed(seed: int, epoch: int, index: int) -> int:
    """ldae-models 0.1's per-sample seed."""
    x = (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + index * 0x94D049BB133111EB) & _MASK
    x ^= x >> 31
    return (x * 0xD6E8FEB86659FD93) & _MASK


def legacy_draw_t_and_noise(seeds: Sequence[int], shape: Tuple[int, ...], num_timesteps: int = 1000
                            ) -> Tuple[torch.Tensor, torch.Tensor]:
    """ldae-models 0.1: each sample's t and noise from a generator of its own."""
    ts, eps = [], []
    for s in seeds:
        g = torch.Generator().manual_seed(int(s) ^ 0x5DEECE66D)
        ts.append(torch.randint(0, num_timesteps, (1,), generator=g).float())
        eps.append(torch.randn(shape, generator=g))
    return torch.cat(ts), torch.stack(eps)


class LegacyFolder(torch.utils.data.Dataset):
    """0.1's SeededImageFolder: an ImageFolder, the transform under a forked RNG per sample, the sample's seed
    returned."""

    def __init__(self, root: str, img_size: int, seed: int) -> None:
        from pathlib import Path
        from torchvision import transforms as T
        from torchvision.datasets import ImageFolder
        root_p = Path(root)
        self.folder = ImageFolder(str(root_p / 'train' if (root_p / 'train').is_dir() else root_p))
        self.transform = T.Compose([T.Resize(img_size, interpolation=T.InterpolationMode.BICUBIC),
                                    T.CenterCrop(img_size), T.PILToTensor()])
        self.seed = seed

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, key: Tuple[int, int]) -> Tuple[torch.Tensor, int, int]:
        epoch, index = key
        s = legacy_sample_seed(self.seed, epoch, index)
        img, label = self.folder[index]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(s)
            return self.transform(img.convert('RGB')), label, s


def sources(cfg: TrainConfig, objective: DenoisingObjective, steps: int, data: Any) -> Dict[str, Callable[[], Iterator[Any]]]:
    """Each path as a generator of (images, t, noise) for ``steps`` steps (``data``: the split decoded once)."""
    shape = objective.model.noise_shape(torch.zeros(1, 3, 32, 32))
    dev = torch.device('cpu')

    def legacy():
        folder = LegacyFolder(cfg.data_root, 32, cfg.seed)
        keys = [[(0, i) for i in range(s * cfg.batch_size, (s + 1) * cfg.batch_size)] for s in range(steps)]
        loader = torch.utils.data.DataLoader(folder, batch_sampler=keys, num_workers=cfg.workers)
        for images, _, seeds in loader:
            t, noise = legacy_draw_t_and_noise(seeds.tolist(), shape)
            yield normalize(images), t, noise

    def new(in_memory: bool):
        def gen():
            source = data if in_memory else open_split('folder', cfg.data_root, 'train')
            batches = StepBatches(len(source), cfg.batch_size, 1, 1, 0, cfg.seed)
            for step, micro_batches in batches.read(source, 0, steps, 32, dev, cfg.workers):
                for micro in micro_batches:
                    x = normalize(micro.images)
                    d = step_draws(cfg, step, objective, dev)
                    yield x, d['t'], d['noise']
        return gen

    return {'legacy': legacy, 'stream': new(False), 'memory': new(True)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--data-root', required=True, help='a PNG ImageFolder (materialize.py)')
    ap.add_argument('--batch-size', type=int, default=128)
    ap.add_argument('--steps', type=int, default=6, help='batches per timing')
    ap.add_argument('--rounds', type=int, default=3)
    ap.add_argument('--workers', type=int, default=1)
    ap.add_argument('--out')
    args = ap.parse_args()
    cfg = TrainConfig(data_root=args.data_root, batch_size=args.batch_size, workers=args.workers, out='unused')
    model = build_model(cfg)
    images = load_split('folder', args.data_root, 'train', 32, progress=False)
    model.fit_tokenizer([normalize(images.images[:2000])])
    objective = DenoisingObjective(model, cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    t0 = time.perf_counter()
    decoded = load_split('folder', args.data_root, 'train', 32, progress=False)
    decode_s = time.perf_counter() - t0
    paths = sources(cfg, objective, args.steps, decoded)
    data_s: Dict[str, List[float]] = {k: [] for k in paths}
    step_ips: Dict[str, List[float]] = {k: [] for k in paths}
    names = list(paths)
    for r in range(args.rounds):
        for k in names[r % 3:] + names[:r % 3]:
            t0 = time.perf_counter()
            batches = list(paths[k]())  # the data and randomness alone
            data_s[k].append((time.perf_counter() - t0) / args.steps)
            t0 = time.perf_counter()
            for x, t, noise in paths[k]():  # whole steps fed by the path
                objective(x, None, t, noise).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            step_ips[k].append(args.steps * args.batch_size / (time.perf_counter() - t0))
            del batches
    result = dict(memory_decode_once_s=round(decode_s, 2), images=len(decoded), batch_size=args.batch_size, steps=args.steps, rounds=args.rounds, threads=torch.get_num_threads(),
                  workers=args.workers,
                  data_s_per_batch={k: round(statistics.median(v), 4) for k, v in data_s.items()},
                  train_img_per_s={k: round(statistics.median(v), 2) for k, v in step_ips.items()})
    result['train_ratio_to_legacy'] = {k: round(v / result['train_img_per_s']['legacy'], 3)
                                       for k, v in result['train_img_per_s'].items()}
    result['data_speedup_over_legacy'] = {k: round(result['data_s_per_batch']['legacy'] / v, 2)
                                          for k, v in result['data_s_per_batch'].items()}
    print(json.dumps(result, indent=2))
    if args.out:
        with open(args.out, 'w') as f:
            json.dump(result, f, indent=2)


if __name__ == '__main__':
    main()
