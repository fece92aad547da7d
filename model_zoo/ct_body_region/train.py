"""Rebuild weights.pt: train the body-region classifier on CPU (one thread, a few minutes), fixed seed.

    .venv/bin/python -m model_zoo.ct_body_region.train [--data ../shared/data] [--steps 1200]

Slices and labels: see data.py (patients A and B from TotalSegmentator's test files, the VTK
head CT). Classes are sampled equally. Augmentation makes field of view, patient size and
scanner differences less of a cue: random zoom (pixel size 0.75-1.3x), random crop of the
field of view (everything outside a random box set to air, like the chest crops), left-right
flip, small shifts, HU offset/scale, Gaussian noise. The evaluation slices (data.EVAL_FILES)
are never read here.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from model_zoo.ct_body_region import data
from model_zoo.ct_body_region.model import CLASSES, SIZE, build_network, prepare_slices

HERE = Path(__file__).resolve().parent


def load_training_slices(root: Path):
    sources = [data.patient_a(root), *data.patient_b(root), data.head(root)]
    images, labels = [], []
    for pixels, spacing, region in sources:
        keep = region >= 0
        x, _ = prepare_slices(pixels[keep], spacing)
        images.append(x)
        labels.append(torch.from_numpy(region[keep]))
    images, labels = torch.cat(images), torch.cat(labels)
    print("training slices per class:", {c: int((labels == i).sum()) for i, c in enumerate(CLASSES)}, flush=True)
    return images, labels


def augment(x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    n = x.shape[0]
    zoom = torch.from_numpy(rng.uniform(0.75, 1.3, n)).float()
    shift = torch.from_numpy(rng.uniform(-0.1, 0.1, (n, 2))).float()
    flip = torch.from_numpy(np.where(rng.random(n) < 0.5, -1.0, 1.0)).float()
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 1, 1] = flip / zoom, 1 / zoom
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta, x.shape, align_corners=False)
    x = F.grid_sample(x + 1, grid, mode="bilinear", padding_mode="zeros", align_corners=False) - 1
    for i in range(n):
        if rng.random() < 0.5:  # crop the field of view
            h, w = (int(SIZE * rng.uniform(0.4, 1.0)) for _ in range(2))
            top, left = int(rng.integers(0, SIZE - h + 1)), int(rng.integers(0, SIZE - w + 1))
            outside = torch.ones(SIZE, SIZE, dtype=torch.bool)
            outside[top:top + h, left:left + w] = False
            x[i, 0][outside] = -1.0
    x = x * torch.from_numpy(rng.uniform(0.9, 1.1, (n, 1, 1, 1))).float()
    x = x + torch.from_numpy(rng.uniform(-0.05, 0.05, (n, 1, 1, 1))).float()
    return (x + 0.02 * torch.randn_like(x)).clamp(-1, 1)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=data.DEFAULT_DATA)
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seed", type=int, default=20240603)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=HERE / "weights.pt")
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    started = time.time()
    images, labels = load_training_slices(args.data)
    by_class = [torch.nonzero(labels == i)[:, 0] for i in range(len(CLASSES))]
    network = build_network()
    optimiser = torch.optim.AdamW(network.parameters(), lr=3e-3, weight_decay=1e-3)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=3e-3, total_steps=args.steps, pct_start=0.1)
    network.train()
    for step in range(1, args.steps + 1):
        classes = rng.integers(0, len(CLASSES), args.batch)
        index = torch.stack([by_class[c][int(rng.integers(len(by_class[c])))] for c in classes])
        x, y = augment(images[index].clone(), rng), labels[index]
        loss = F.cross_entropy(network(x), y, label_smoothing=0.05)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        schedule.step()
        if step % 100 == 0 or step == 1:
            print(f"step {step}/{args.steps} loss {loss.item():.3f} {time.time() - started:.0f}s", flush=True)
    torch.save(network.state_dict(), args.out)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB) in {time.time() - started:.0f}s")


if __name__ == "__main__":
    main()
