"""Rebuild weights.pt: train the low-dose CT denoiser on CPU (one thread, a few minutes), fixed seed.

    .venv/bin/python -m model_zoo.ct_denoise.train [--data ../shared/data] [--steps 1500]

Training data: every axial slice of one real chest CTA (patient B: the two TotalSegmentator
crops, 1.5 mm voxels, and the same slices area-downsampled to 3 mm pixels), each turned into a simulated low-dose slice by noise.simulate_low_dose
with a random dose (I0 log-uniform in PHOTONS); the original slice is the target. The
evaluation case (example_ct.nii.gz, patient A) is never read here.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch

from model_zoo.ct_denoise.model import SCALE, Residual, build_network, to_input
from model_zoo.ct_denoise.noise import simulate_low_dose
from model_zoo.ct_data import DEFAULT_DATA, TOTALSEG_CTA_CROPS, load_nifti

HERE = Path(__file__).resolve().parent
PATCH = 48
PHOTONS = (1e4, 3e5)  # added noise SD ~15-70 HU on these slices


def make_pairs(data: Path, rng: np.random.Generator):
    """Each slice at its own 1.5 mm pixels and, area-downsampled 2x, at 3 mm (clinical pixel
    sizes span ~0.5-1 mm for 512 matrices and more for large fields of view or thick reformats)."""
    noisy, clean = [], []
    for relative in TOTALSEG_CTA_CROPS:
        pixels, spacing = load_nifti(data / relative)
        coarse = torch.nn.functional.avg_pool2d(torch.from_numpy(pixels)[:, None], 2)[:, 0].numpy()
        for stack, pixel_mm in ((pixels, spacing[1]), (coarse, 2 * spacing[1])):
            for hu in stack:
                photons = math.exp(rng.uniform(math.log(PHOTONS[0]), math.log(PHOTONS[1])))
                noisy.append(simulate_low_dose(hu, pixel_mm, photons, rng))
                clean.append(hu)
        print(f"{relative.parent.parent.name}: {pixels.shape[0]} slices simulated at 2 pixel sizes", flush=True)
    return noisy, clean  # lists: the two crops have different matrix sizes


def batch(noisy, clean, rng, size):
    xs, ys = [], []
    for _ in range(size):
        i = int(rng.integers(len(noisy)))
        r = int(rng.integers(0, noisy[i].shape[0] - PATCH + 1))
        c = int(rng.integers(0, noisy[i].shape[1] - PATCH + 1))
        x, y = noisy[i][r:r + PATCH, c:c + PATCH], clean[i][r:r + PATCH, c:c + PATCH]
        k = int(rng.integers(4))
        x, y = np.rot90(x, k), np.rot90(y, k)
        if rng.random() < 0.5:
            x, y = x[:, ::-1], y[:, ::-1]
        xs.append(np.ascontiguousarray(x))
        ys.append(np.ascontiguousarray(y))
    return (to_input(torch.from_numpy(np.stack(xs))[:, None]),
            to_input(torch.from_numpy(np.stack(ys))[:, None]))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seed", type=int, default=20240602)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=HERE / "weights.pt")
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    started = time.time()
    noisy, clean = make_pairs(args.data, rng)
    print(f"{len(noisy)} training pairs in {time.time() - started:.0f}s", flush=True)
    network = build_network()
    model = Residual(network)
    optimiser = torch.optim.AdamW(network.parameters(), lr=2e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=2e-3, total_steps=args.steps, pct_start=0.1)
    model.train()
    for step in range(1, args.steps + 1):
        x, y = batch(noisy, clean, rng, args.batch)
        loss = torch.nn.functional.mse_loss(model(x), y)
        identity = torch.nn.functional.mse_loss(x, y).item()  # what doing nothing would score
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        schedule.step()
        if step % 100 == 0 or step == 1:
            rmse_hu, noise_hu = math.sqrt(loss.item()) * SCALE, math.sqrt(identity) * SCALE
            print(f"step {step}/{args.steps} rmse {rmse_hu:.1f} HU (input {noise_hu:.1f} HU) "
                  f"{time.time() - started:.0f}s", flush=True)
    torch.save(network.state_dict(), args.out)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB) in {time.time() - started:.0f}s")


if __name__ == "__main__":
    main()
