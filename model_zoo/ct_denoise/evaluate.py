"""Measure the denoiser on every real CT volume we have, one line per volume and dose.

    .venv/bin/python -m model_zoo.ct_denoise.evaluate [--data ../shared/data] [--cases NAME ...] [--step 8]

Volumes: the lung model's cases (lung_ct_seg.data.CASES), the VTK headsq head CT and the VTK
prostate slice (5 mm); the chest CTA crops are the training patient (marked, not evidence).
Each slice is turned into a simulated low-dose slice (the training noise model, fixed seed) at
two doses; the original (full-dose) slice is the reference. Volumes with matrices over
256 x 256 are sampled (every ``--step``-th slice; the simulation costs seconds per 512 x 512
slice); lidc_slice is one slice stacked, so one copy is used.

Per volume and dose: PSNR and SSIM on HU clipped to -1000..1000 (data range 2000 HU) and the
mean HU SD in homogeneous soft-tissue squares (found on the full-dose image with the model's
own region finder, one per slice where one exists), for the low-dose input, a Gaussian blur
(sigma 1 pixel; the naive baseline) and the model; and the node's own quality check: predict()
on the (sampled) low-dose volume and model.toml [qc] through model_zoo.quality, as the node
runs them. The "original" line is the model on the full-dose volume itself: how much it changes
an image with no added noise, and whether such a series passes the check. The reference is
itself a clinical CT with its own noise, so PSNR against it saturates.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from monai.metrics import PSNRMetric, SSIMMetric

from model_zoo.ct_body_region import data as body_region_data
from model_zoo.ct_data import DEFAULT_DATA, volume_from_array
from model_zoo.ct_denoise.model import CTDenoiser, find_uniform_region
from model_zoo.ct_denoise.noise import simulate_low_dose
from model_zoo.lung_ct_seg.data import CASES, load_case
from model_zoo.manifest import load_manifest
from model_zoo.quality import check_output

DOSES = {"low (I0 3e5)": 3e5, "very low (I0 1e5)": 1e5}
TRAINED_ON = {"cta_cardiac", "cta_chest_abdomen"}  # patient B: train.py's every slice
EXTRA = ("headsq", "prostate_slice")
SMALL_MATRIX = 256 * 256  # up to this many pixels per slice every slice is used


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
    if not regions:
        return float("nan")
    return float(np.mean([np.std(image[s, r:r + k, c:c + k]) for s, r, c, k in regions]))


def load_volume(name: str, data: Path, step: int):
    """(full-dose HU slices used, spacing, how they were sampled)."""
    if name == "headsq":
        pixels, spacing, _ = body_region_data.head(data)
    elif name == "prostate_slice":
        hu, pixel = next((hu, sp) for _, path, hu, sp in body_region_data.eval_slices(data)
                         if path.endswith("prostate.img"))
        pixels, spacing = hu[None], (5.0, *pixel)
    else:
        pixels, spacing, _ = load_case(name, data)
    if name == "lidc_slice":
        return pixels[:1], spacing, f"1 of {len(pixels)} identical"
    if pixels.shape[1] * pixels.shape[2] > SMALL_MATRIX and len(pixels) > step > 1:
        kept = np.ascontiguousarray(pixels[::step])
        return kept, spacing, f"every {step}th: {len(kept)} of {len(pixels)}"
    return pixels, spacing, f"all {len(pixels)}"


def node_check(model, pixels: np.ndarray, spacing):
    """predict() and the [qc] check as the node runs them: (denoised pixels, what the node saw:
    {"noise_input": HU, "noise_output": HU, "check": the reduction's CheckResult})."""
    volume = volume_from_array(pixels, spacing)
    output = model.predict(volume)
    (check,) = check_output(model.manifest, output, volume.voxel_volume_ml)
    return output.derived_pixels, {**{m.name: m.value for m in output.measurements}, "check": check}


def evaluate_volume(model, name: str, data: Path, step: int, seed: int) -> list[dict]:
    full, spacing, sampled = load_volume(name, data, step)
    regions = []
    for s in range(full.shape[0]):
        region = find_uniform_region(full[s:s + 1], spacing[1])
        if region is not None:
            regions.append((s, *region[1:]))
    common = {"case": name, "trained": name in TRAINED_ON, "sampled": sampled, "pixel_mm": spacing[1],
              "slice_mm": spacing[0], "squares": len(regions), "reference_sd": noise_sd(full, regions)}
    denoised, node = node_check(model, full, spacing)
    rows = [{**common, "dose": "original", "node": node,
             "model": (*image_metrics(denoised, full), noise_sd(denoised, regions))}]
    for label, photons in DOSES.items():
        rng = np.random.default_rng(seed)
        low = np.stack([simulate_low_dose(s, spacing[1], photons, rng) for s in full])
        denoised, node = node_check(model, low, spacing)
        rows.append({**common, "dose": label, "node": node,
                     **{key: (*image_metrics(image, full), noise_sd(image, regions))
                        for key, image in (("input", low), ("blur", gaussian(low)), ("model", denoised))}})
    return rows


def node_text(node: dict) -> str:
    check = node["check"]
    verdict = "pass" if check.passed else "**FAIL**"
    if check.value is None:
        return f"no uniform square found: {verdict}"
    return f"{node['noise_input']:.1f} -> {node['noise_output']:.1f} ({check.value:.0f} %) {verdict}"


def cells(row: dict, index: int, fmt: str) -> str:
    """One metric (0 PSNR, 1 SSIM, 2 noise SD) of input / blur / model, the model's in bold."""
    keys = ("model",) if row["dose"] == "original" else ("input", "blur", "model")
    return " / ".join(f"**{row[k][index]:{fmt}}**" if k == "model" else f"{row[k][index]:{fmt}}" for k in keys)


def markdown(rows: list[dict]) -> str:
    lines = [("| case | trained on | slices used | pixel / slice mm | dose | noise SD HU: full dose / input / blur / "
              "**model** | PSNR dB: input / blur / **model** | SSIM: input / blur / **model** | node's check: "
              "noise_input -> noise_output HU (reduction) |"), "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        trained = "**yes (patient B)**" if r["trained"] else "no"
        lines.append(f"| {r['case']} | {trained} | {r['sampled']} ({r['squares']} with a square) | "
                     f"{r['pixel_mm']:.2f} / {r['slice_mm']:.1f} | {r['dose']} | "
                     f"{r['reference_sd']:.1f} / {cells(r, 2, '.1f')} | {cells(r, 0, '.2f')} | {cells(r, 1, '.3f')} | "
                     f"{node_text(r['node'])} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--step", type=int, default=8, help="every n-th slice of volumes over 256 x 256")
    parser.add_argument("--cases", nargs="*", default=[case.name for case in CASES] + list(EXTRA))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    model = CTDenoiser(load_manifest(Path(__file__).parent / "model.toml"), "cpu")
    rows = []
    for name in args.cases:
        started = time.time()
        rows += evaluate_volume(model, name, args.data, args.step, args.seed)
        print(f"{name}: {rows[-1]['sampled']} slices, {time.time() - started:.0f}s", flush=True)
    print()
    print(markdown(rows))


if __name__ == "__main__":
    main()
