"""Measure the denoiser on real CT it never saw in training (patient A, example_ct.nii.gz).

    .venv/bin/python -m model_zoo.ct_denoise.evaluate [--data ../shared/data]

Every axial slice of the held-out volume is turned into a simulated low-dose slice (the same
noise model as training, fixed seed) at two doses; the original (full-dose) slice is the
reference. Reported, over all 112 slices: PSNR and SSIM on HU clipped to -1000..1000 (data
range 2000 HU), and the HU standard deviation in homogeneous soft-tissue squares (found on the
full-dose image with the model's own region finder, one per slice where one exists), for the
low-dose input, a Gaussian-smoothing baseline (sigma 1 pixel) and the model. Note the reference
is itself a clinical CT with its own noise, so PSNR against it saturates.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F
from monai.metrics import PSNRMetric, SSIMMetric

from model_zoo.ct_denoise.model import CTDenoiser, find_uniform_region
from model_zoo.ct_denoise.noise import simulate_low_dose
from model_zoo.ct_data import DEFAULT_DATA, TOTALSEG_ABDOMEN, load_nifti
from model_zoo.manifest import load_manifest
from pathlib import Path

DOSES = {"low dose (I0 = 3e5)": 3e5, "very low dose (I0 = 1e5)": 1e5}


def gaussian(pixels: np.ndarray, sigma: float = 1.0) -> np.ndarray:
    r = np.arange(-3, 4)
    k = torch.from_numpy(np.exp(-r ** 2 / (2 * sigma ** 2)) / np.exp(-r ** 2 / (2 * sigma ** 2)).sum()).float()
    x = torch.from_numpy(pixels)[:, None]
    x = F.conv2d(F.pad(x, (3, 3, 0, 0), mode="replicate"), k.view(1, 1, 1, 7))
    x = F.conv2d(F.pad(x, (0, 0, 3, 3), mode="replicate"), k.view(1, 1, 7, 1))
    return x[:, 0].numpy()


def image_metrics(test: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    a = torch.from_numpy(np.clip(test, -1000, 1000) / 1000.0)[:, None]
    b = torch.from_numpy(np.clip(reference, -1000, 1000) / 1000.0)[:, None]
    psnr = PSNRMetric(max_val=2.0)(a, b).mean().item()
    ssim = SSIMMetric(spatial_dims=2, data_range=2.0)(a, b).mean().item()
    return psnr, ssim


def noise_sd(image: np.ndarray, regions) -> float:
    return float(np.mean([np.std(image[s, r:r + k, c:c + k]) for s, r, c, k in regions]))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    started = time.time()
    full, spacing = load_nifti(args.data / TOTALSEG_ABDOMEN)
    model = CTDenoiser(load_manifest(Path(__file__).parent / "model.toml"), "cpu")
    regions = []
    for s in range(full.shape[0]):
        region = find_uniform_region(full[s:s + 1], spacing[1])
        if region is not None:
            regions.append((s, *region[1:]))
    print(f"held-out volume {TOTALSEG_ABDOMEN.name}: {full.shape} at {spacing} mm; {len(regions)} slices with a "
          f"uniform soft-tissue square ({regions[0][3]} px = {regions[0][3] * spacing[1]:.0f} mm)")
    print(f"full-dose reference: noise SD {noise_sd(full, regions):.1f} HU")
    rows = []
    for label, photons in DOSES.items():
        rng = np.random.default_rng(args.seed)
        low = np.stack([simulate_low_dose(s, spacing[1], photons, rng) for s in full])
        smooth = gaussian(low)
        denoised = model.denoise(low)
        for name, image in (("input", low), ("gaussian sigma=1px", smooth), ("model", denoised)):
            psnr, ssim = image_metrics(image, full)
            rows.append((label, name, psnr, ssim, noise_sd(image, regions)))
    print("\n| dose | image | PSNR dB | SSIM | noise SD HU |\n|---|---|---|---|---|")
    for label, name, psnr, ssim, sd in rows:
        print(f"| {label} | {name} | {psnr:.2f} | {ssim:.3f} | {sd:.1f} |")
    psnr, ssim = image_metrics(model.denoise(full), full)
    print(f"\nmodel on the full-dose image itself: PSNR {psnr:.2f} dB, SSIM {ssim:.3f} "
          f"(how much it changes an image that needs no denoising)")
    print(f"({time.time() - started:.0f}s)")


if __name__ == "__main__":
    main()
