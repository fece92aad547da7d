"""Rebuild weights.pt: train the lung UNet on a CPU, fixed seed.

    .venv/bin/python -m model_zoo.lung_ct_seg.train [--data ../shared/data] [--steps 2000]
        [--exclude PATIENT ...] [--out PATH]

Training data, all on the model's 2.5 mm grid and in its orientation (slices to the head, rows
to the back, columns to the patient's left):

* the real chest CT cases of data.CASES that may be used for training, minus the patients
  given with ``--exclude`` (cross-validation folds for the model card leave one patient out);
* synthetic chest/abdomen phantoms with exact labels (``make_phantom``), a quarter of every
  batch: bowel and stomach gas under the diaphragm, a trachea that is not lung, bodies wider
  than the field of view.

Every real sample goes through what the issue of cropped, contrast and thick-slice scans asks
for (``augment``): a random field-of-view crop (often cutting the lungs at one or both sides,
or a cardiac field of view, or only the apices or the bases), the replicated-edge padding the
model uses at inference (so an image edge looks the same in training and in use), slice
thickness from 0.6 to 5 mm, contrast (blood and soft tissue brighter or darker), lung density
shifts (emphysema / dependent density), HU scale and offset, noise, left-right flips.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss
from scipy import ndimage as ndi

from model_zoo.lung_ct_seg.data import CASES, DEFAULT_DATA, load_case
from model_zoo.lung_ct_seg.model import (PAD, TARGET_SPACING_MM, build_network, downsample, normalise_hu,
                                         pad_edges)

PATCH = (48, 96, 96)  # coarse voxels: 120 x 240 x 240 mm
PHANTOM_SHARE = 0.25
HERE = Path(__file__).resolve().parent


def coarse_case(name: str, data: Path):
    """(HU, label) of a case on the coarse grid; label = more than half of the voxel is lung."""
    pixels, spacing, reference = load_case(name, data)
    hu = downsample(pixels, spacing)[0, 0].numpy()
    label = downsample(reference.astype(np.float32), spacing)[0, 0].numpy() > 0.5
    return hu, label


def random_fov(shape, label: np.ndarray, rng: np.random.Generator) -> tuple[slice, slice, slice]:
    """A random field of view inside a volume: half the time the whole volume; else an in-plane
    crop (its width and depth 45-100 %, placed anywhere that keeps some lung), sometimes
    also only a part of the slices (the apices or the bases)."""
    if rng.random() < 0.4:
        return (slice(None),) * 3
    lung_z, lung_r, lung_c = (np.nonzero(label.any(axis=a))[0] for a in ((1, 2), (0, 2), (0, 1)))
    box = []
    for axis, (n, lung) in enumerate(zip(shape, (lung_z, lung_r, lung_c))):
        if axis == 0 and rng.random() < 0.6:
            box.append(slice(None))
            continue
        size = max(16, int(n * rng.uniform(0.45, 1.0)))
        if size >= n:
            box.append(slice(None))
            continue
        centre = int(rng.choice(lung)) if lung.size else n // 2  # keep some lung inside
        start = int(np.clip(centre - rng.integers(0, size), 0, n - size))
        box.append(slice(start, start + size))
    return tuple(box)


def random_patch(hu: np.ndarray, label: np.ndarray, rng: np.random.Generator):
    """A PATCH-sized window of the volume padded as the model pads it (replicated edges).

    A third of the windows are placed anywhere, a third around a lung voxel and a third
    around a hard negative: air that is not lung within 20 mm of tissue (air outside the body
    next to the skin, under the table or between the shoulders, bowel and stomach gas, the
    trachea), which the network otherwise confuses with lung."""
    padded, _ = pad_edges(torch.from_numpy(np.ascontiguousarray(hu))[None, None], minimum=PATCH, margin=PAD)
    padded_label, _ = pad_edges(torch.from_numpy(np.ascontiguousarray(label, dtype=np.float32))[None, None],
                                minimum=PATCH, margin=PAD)
    padded, padded_label = padded[0, 0].numpy(), padded_label[0, 0].numpy() > 0.5
    focus = rng.random()
    if focus < 1 / 3:
        candidates = padded_label
    elif focus < 2 / 3:
        near_tissue = ndi.binary_dilation(padded > -400, iterations=int(20 / TARGET_SPACING_MM))
        candidates = (padded < -400) & ~padded_label & near_tissue
    else:
        candidates = None
    points = np.flatnonzero(candidates) if candidates is not None else np.zeros(0, np.int64)
    start = []
    centre = np.unravel_index(int(rng.choice(points)), padded.shape) if points.size else None
    for axis, (p, n) in enumerate(zip(PATCH, padded.shape)):
        if centre is None:
            start.append(int(rng.integers(0, n - p + 1)))
        else:
            start.append(int(np.clip(centre[axis] - rng.integers(0, p), 0, n - p)))
    box = tuple(slice(s, s + p) for s, p in zip(start, PATCH))
    return padded[box], padded_label[box]


def thick_slices(hu: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Simulate a slice thickness of 0.6-5 mm on the 2.5 mm grid: slices thicker than the grid
    are averaged over their thickness and repeated, as the model's downsampling sees them."""
    thickness = rng.uniform(0.6, 5.0)
    if thickness <= TARGET_SPACING_MM * 1.1:
        return hu
    tensor = torch.from_numpy(np.ascontiguousarray(hu))[None, None]
    thick = F.interpolate(tensor, size=(max(1, round(hu.shape[0] * TARGET_SPACING_MM / thickness)), *hu.shape[1:]),
                          mode="area")
    return F.interpolate(thick, size=hu.shape, mode="nearest")[0, 0].numpy()


def augment(hu: np.ndarray, label: np.ndarray, rng: np.random.Generator):
    """Field of view, slice thickness, contrast, density, scale, noise and flips (module doc)."""
    box = random_fov(hu.shape, label, rng)
    hu, label = hu[box], label[box]
    hu = thick_slices(hu, rng)
    if rng.random() < 0.5:  # contrast agent or not: blood and soft tissue brighter or darker
        gain = rng.uniform(0.3, 3.0)
        hu = np.where(hu > 0, hu * gain, hu)
    if rng.random() < 0.4:  # denser (dependent, low inspiration) or darker (emphysema) lung
        hu = np.where(label, hu + rng.uniform(-80, 120), hu)
    hu, label = random_patch(hu, label, rng)
    if rng.random() < 0.5:
        hu, label = hu[:, :, ::-1], label[:, :, ::-1]
    hu = hu * rng.uniform(0.95, 1.05) + rng.uniform(-30, 30)
    if rng.random() < 0.5:  # noise of low-dose or thin slices
        hu = hu + rng.normal(0, rng.uniform(5, 40), hu.shape).astype(np.float32)
    return np.ascontiguousarray(hu, dtype=np.float32), np.ascontiguousarray(label)


def make_phantom(rng: np.random.Generator):
    """A synthetic CT on the 2.5 mm grid: (HU, lung label), both (slices, rows, cols)."""
    s = TARGET_SPACING_MM
    d, h, w = int(rng.integers(40, 90)), int(rng.integers(110, 180)), int(rng.integers(110, 180))
    z, y, x = np.meshgrid(np.arange(d) * s, (np.arange(h) - h / 2) * s, (np.arange(w) - w / 2) * s,
                          indexing="ij")
    a, b = rng.uniform(80, 140), rng.uniform(120, 190)  # body semi-axes AP, LR (may exceed the field of view)
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


def training_cases(data: Path, exclude: set[str]):
    """Coarse (HU, label) per trainable case, grouped by patient."""
    by_patient: dict[str, list] = {}
    for case in CASES:
        if not case.trainable or case.patient in exclude or case.name == "lidc_slice":
            continue  # lidc_slice: one slice stacked, unlike any real volume
        hu, label = coarse_case(case.name, data)
        by_patient.setdefault(case.patient, []).append((hu, label))
        print(f"training case {case.name} ({case.patient}): {hu.shape} lung {label.mean():.1%}", flush=True)
    return by_patient


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="shared data folder")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seed", type=int, default=20261130)
    parser.add_argument("--exclude", nargs="*", default=[], help="patients to leave out (a fold)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (1: CI and shared 2-core machines)")
    parser.add_argument("--out", type=Path, default=HERE / "weights.pt")
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    started = time.time()
    patients = training_cases(args.data, set(args.exclude))
    names = sorted(patients)
    network = build_network()
    optimiser = torch.optim.AdamW(network.parameters(), lr=3e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=3e-3, total_steps=args.steps, pct_start=0.1)
    loss_fn = DiceCELoss(sigmoid=True, smooth_nr=1e-3, smooth_dr=1e-3)
    network.train()
    for step in range(1, args.steps + 1):
        images, labels = [], []
        for _ in range(args.batch):
            if rng.random() < PHANTOM_SHARE or not names:
                hu, label = make_phantom(rng)
                hu, label = random_patch(hu, label, rng)
            else:  # every patient equally often, whatever its number of crops
                cases = patients[names[int(rng.integers(len(names)))]]
                hu, label = augment(*cases[int(rng.integers(len(cases)))], rng)
            images.append(normalise_hu(torch.from_numpy(hu))[None])
            labels.append(torch.from_numpy(label.astype(np.float32))[None])
        loss = loss_fn(network(torch.stack(images)), torch.stack(labels))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        schedule.step()
        if step % 50 == 0 or step == 1:
            print(f"step {step}/{args.steps} loss {loss.item():.4f} {time.time() - started:.0f}s", flush=True)
    torch.save(network.state_dict(), args.out)
    # which patients these weights saw: evaluate.py picks, per case, weights that did not
    record = {"patients": names, "excluded": sorted(args.exclude), "steps": args.steps, "batch": args.batch,
              "seed": args.seed, "threads": args.threads, "seconds": round(time.time() - started),
              "torch": torch.__version__}
    args.out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB) in {time.time() - started:.0f}s")


if __name__ == "__main__":
    main()
