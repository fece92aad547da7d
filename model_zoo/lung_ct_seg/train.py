"""Rebuild weights.pt: train the lung UNet on CPU (about 19 minutes on 1 thread), fixed seed.

    .venv/bin/python -m model_zoo.lung_ct_seg.train [--data ../shared/data] [--steps 1000]

Training data (all on the model's 2.5 mm grid):
* synthetic chest/abdomen phantoms with exact labels (make_phantom), half of every batch, with
  hard negatives below the diaphragm (bowel/stomach gas pockets of -1000..-600 HU, abdominal
  fat) and bodies that may be cut by the field of view;
* one real chest CTA (two overlapping crops from the TotalSegmentator test files) with labels
  from the classical method in data.classical_lung_labels.
The evaluation case (data.EVAL_CT, another patient) is never read here.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss

from model_zoo.lung_ct_seg.data import DEFAULT_DATA, TRAIN_CASES, classical_lung_labels, load_nifti
from model_zoo.lung_ct_seg.model import TARGET_SPACING_MM, build_network, downsample, normalise_hu

PATCH = (48, 96, 96)
HERE = Path(__file__).resolve().parent


def make_phantom(rng: np.random.Generator):
    """A synthetic CT on the 2.5 mm grid: (HU, lung label), both (slices, rows, cols)."""
    s = TARGET_SPACING_MM
    d, h, w = int(rng.integers(40, 90)), int(rng.integers(110, 180)), int(rng.integers(110, 180))
    z, y, x = np.meshgrid(np.arange(d) * s, (np.arange(h) - h / 2) * s, (np.arange(w) - w / 2) * s,
                          indexing="ij")
    a, b = rng.uniform(80, 140), rng.uniform(120, 190)  # may exceed the field of view  # body semi-axes AP, LR
    cy = rng.uniform(-20, 20)
    r_body = ((y - cy) / a) ** 2 + (x / b) ** 2
    hu = rng.normal(-1000, 15, (d, h, w))  # outside air
    body = r_body <= 1
    hu[body] = rng.normal(rng.uniform(20, 60), rng.uniform(10, 30), body.sum())
    fat = body & (r_body > rng.uniform(0.65, 0.9))
    hu[fat] = rng.normal(-100, 20, fat.sum())
    table = (y - cy > a + 10) & (y - cy < a + 18)
    hu[table] = 300
    spine = ((y - cy - 0.65 * a) ** 2 + x ** 2) < rng.uniform(12, 20) ** 2
    hu[spine] = rng.uniform(300, 900)

    # lungs: two half-ellipsoids tapering to an apex at the top and sitting on a domed diaphragm
    label = np.zeros((d, h, w), bool)
    diaphragm = np.full((1, h, w), -np.inf)
    z_top = rng.uniform(0.2 * d * s, d * s + 150)  # the apex may be above the field of view
    height = rng.uniform(150, 260)
    z_base = z_top - height
    gap = rng.uniform(10, 35)
    for side in (-1, 1):
        cx = side * rng.uniform(0.4, 0.55) * b
        ly, lx = rng.uniform(0.55, 0.75) * a, rng.uniform(0.3, 0.42) * b
        taper = np.clip((z_top - z) / rng.uniform(40, 80), 0, 1) ** 0.5
        dome = z_base + rng.uniform(20, 50) * (1 - ((x - cx) / lx) ** 2 - ((y - cy) / ly) ** 2)
        diaphragm = np.maximum(diaphragm, np.maximum(dome[:1], z_base - 10))
        inside = (((y - cy + 0.1 * a) / (ly * taper + 1e-3)) ** 2 + ((x - cx) / (lx * taper + 1e-3)) ** 2 <= 1)
        label |= inside & (z < z_top) & (z > dome) & (np.abs(x) > gap) & body & ~fat
    lung_hu = rng.uniform(-900, -780)
    hu[label] = rng.normal(lung_hu, rng.uniform(15, 40), label.sum())
    for _ in range(int(rng.integers(0, 40))):  # vessels and nodules (still lung) / emphysema blobs
        c = [rng.uniform(0, d * s), rng.uniform(-h * s / 2, h * s / 2), rng.uniform(-w * s / 2, w * s / 2)]
        blob = ((z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2) < rng.uniform(3, 8) ** 2
        hu[blob & label] = rng.choice([40.0, -980.0])
    # trachea (not lung) above the carina
    trachea = (np.hypot(y - cy + 0.2 * a, x) < rng.uniform(7, 11)) & (z > z_top - rng.uniform(60, 100)) & body
    hu[trachea & ~label] = -1000
    # hard negatives below the diaphragm: fat (-100 HU) and bowel/stomach gas pockets, irregular
    # chains of balls of -1000..-600 HU (partly mottled with stool), some pressed right under
    # the domes (transverse colon, splenic flexure, stomach bubble). Never lung.
    under = z < diaphragm - rng.uniform(3, 10)
    for _ in range(int(rng.integers(0, 8))):  # mesenteric / retroperitoneal fat
        c = np.array([rng.uniform(0, max(z_base + 40, 1.0)), rng.uniform(-a, a) + cy, rng.uniform(-b, b)])
        blob = ((z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2) < rng.uniform(10, 35) ** 2
        blob &= body & under & ~label
        hu[blob] = rng.normal(rng.uniform(-120, -70), 15, blob.sum())
    for _ in range(int(rng.integers(3, 18))):
        top = z_base + 45 if rng.random() < 0.6 else z_base - 40  # near the domes or deep abdomen
        c = np.array([rng.uniform(top - 120, top), rng.uniform(-a, a) + cy, rng.uniform(-b, b)])
        step = rng.normal(0, 1, 3)
        gas = np.zeros((d, h, w), bool)
        for _ in range(int(rng.integers(1, 8))):
            gas |= ((z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2) < rng.uniform(6, 28) ** 2
            c = c + 20 * step / np.linalg.norm(step)
            step = step + rng.normal(0, 0.7, 3)
        gas &= body & under & ~fat & ~label
        base = rng.uniform(-1000, -600)
        hu[gas] = np.where(rng.random(gas.sum()) < rng.uniform(0.6, 1.0), rng.normal(base, 30, gas.sum()),
                           rng.uniform(-200, 100, gas.sum()))
    hu = F.avg_pool3d(torch.from_numpy(hu.astype(np.float32))[None, None], 3, 1, 1,
                      count_include_pad=False)[0, 0].numpy()  # partial-volume blur
    return hu.astype(np.float32), label


def load_real_cases(data: Path):
    cases = []
    for relative in TRAIN_CASES:
        pixels, spacing = load_nifti(data / relative)
        label = classical_lung_labels(pixels, float(np.prod(spacing)) / 1000)
        hu = downsample(pixels, spacing)[0, 0].numpy()
        coarse_label = downsample(label.astype(np.float32), spacing)[0, 0].numpy() > 0.5
        cases.append((hu, coarse_label))
        print(f"real case {relative.parent.parent.name}: {hu.shape} lung {coarse_label.mean():.1%}")
    return cases


def random_patch(hu, label, rng, edge_mode):
    """A PATCH-sized crop (padded where the volume is smaller), randomly flipped left-right."""
    pad = [(0, max(0, p - n)) for p, n in zip(PATCH, hu.shape)]
    if any(after for _, after in pad):
        hu = np.pad(hu, pad, mode=edge_mode, **({"constant_values": -1000} if edge_mode == "constant" else {}))
        label = np.pad(label, pad, mode="edge" if edge_mode == "edge" else "constant")
    start = [int(rng.integers(0, n - p + 1)) for p, n in zip(PATCH, hu.shape)]
    box = tuple(slice(s0, s0 + p) for s0, p in zip(start, PATCH))
    hu, label = hu[box], label[box]
    if rng.random() < 0.5:
        hu, label = hu[:, :, ::-1], label[:, :, ::-1]
    hu = hu * rng.uniform(0.95, 1.05) + rng.uniform(-30, 30)
    if rng.random() < 0.5:  # extra noise (low dose / thin slices)
        hu = hu + rng.normal(0, rng.uniform(5, 40), hu.shape).astype(np.float32)
    return np.ascontiguousarray(hu), np.ascontiguousarray(label)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="shared data folder")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seed", type=int, default=20240601)
    parser.add_argument("--out", type=Path, default=HERE / "weights.pt")
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    torch.set_num_threads(1)  # CI and shared dev machines: 2 cores, one per job
    rng = np.random.default_rng(args.seed)
    started = time.time()
    real = load_real_cases(args.data)
    network = build_network()
    optimiser = torch.optim.AdamW(network.parameters(), lr=3e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=3e-3, total_steps=args.steps, pct_start=0.1)
    loss_fn = DiceCELoss(sigmoid=True, smooth_nr=1e-3, smooth_dr=1e-3)
    network.train()
    for step in range(1, args.steps + 1):
        images, labels = [], []
        for i in range(args.batch):
            if i % 2 == 0:
                hu, label = make_phantom(rng)
                hu, label = random_patch(hu, label, rng, "constant")
            else:
                hu, label = real[int(rng.integers(len(real)))]
                hu, label = random_patch(hu, label, rng, "edge")
            images.append(normalise_hu(torch.from_numpy(hu))[None])
            labels.append(torch.from_numpy(label.astype(np.float32))[None])
        loss = loss_fn(network(torch.stack(images)), torch.stack(labels))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        schedule.step()
        if step % 25 == 0 or step == 1:
            print(f"step {step}/{args.steps} loss {loss.item():.4f} {time.time() - started:.0f}s", flush=True)
    torch.save(network.state_dict(), args.out)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB) in {time.time() - started:.0f}s")


if __name__ == "__main__":
    main()
