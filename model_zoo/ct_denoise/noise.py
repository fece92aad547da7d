"""Low-dose CT simulation from a full-dose CT slice (used by train.py, evaluate.py and tests).

Noise model (documented in MODEL_CARD.md): parallel-beam projection of each axial slice in the
sinogram domain with Poisson photon statistics plus Gaussian electronic noise.

1. HU -> linear attenuation: mu = mu_water * (1 + HU / 1000), mu_water = 0.0192 / mm (~70 keV).
2. Line integrals p(theta, t) = sum of mu along parallel rays (pixel size in mm), ``ANGLES``
   views over 180 degrees, one detector bin per pixel (torch grid_sample rotation).
3. Counts N ~ Poisson(I0 * exp(-p)) + Normal(0, sigma_e^2), with I0 the unattenuated photons
   per ray (the dose knob; lower I0 = lower dose), clamped to >= 1; p_noisy = -log(N / I0).
4. The noise image is the filtered back-projection (Ram-Lak ramp filter) of p_noisy - p,
   converted back to HU, and is ADDED to the original slice. FBP is linear, so this equals
   FBP(noisy) - FBP(clean) + original: the original's resolution is kept and only the extra
   quantum noise of the lower dose is added (the usual "noise insertion" approach).

Not modelled: fan/cone-beam geometry, bowtie filter, tube current modulation, beam hardening,
the scanner's own reconstruction kernel (the ramp filter gives a sharp-kernel noise texture).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

MU_WATER = 0.0192  # 1/mm
ANGLES = 180
ELECTRONIC_SIGMA = 5.0  # counts


def _rotation_grids(size: int, angles: torch.Tensor) -> torch.Tensor:
    cos, sin = torch.cos(angles), torch.sin(angles)
    theta = torch.zeros(len(angles), 2, 3)
    theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = cos, -sin, sin, cos
    return F.affine_grid(theta, (len(angles), 1, size, size), align_corners=False)


def radon(image: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Parallel-beam projections of a square (n, n) image: (angles, n) sums along columns."""
    n = image.shape[-1]
    rotated = F.grid_sample(image.expand(len(angles), 1, n, n), _rotation_grids(n, angles),
                            mode="bilinear", padding_mode="zeros", align_corners=False)
    return rotated.sum(dim=2)[:, 0]  # sum over rows -> (angles, n detector bins)


def ramp_filter(sinogram: torch.Tensor) -> torch.Tensor:
    """Ram-Lak filtering along the detector axis: the band-limited spatial kernel (Kak & Slaney
    eq. 61: h[0] = 1/4, h[odd k] = -1/(pi k)^2), applied by FFT with zero padding."""
    n = sinogram.shape[-1]
    size = 1 << (2 * n - 1).bit_length()
    k = torch.arange(size)
    k = torch.where(k <= size // 2, k, k - size).double()
    kernel = torch.where(k == 0, torch.tensor(0.25, dtype=torch.float64),
                         torch.where(k.remainder(2) == 1, -1.0 / (math.pi * k) ** 2, torch.zeros_like(k)))
    response = torch.fft.rfft(kernel).real.float()
    filtered = torch.fft.irfft(torch.fft.rfft(sinogram, n=size) * response, n=size)
    return filtered[..., :n]


def backproject(sinogram: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Unfiltered back-projection of (angles, n) onto an (n, n) image, the adjoint of radon."""
    n = sinogram.shape[-1]
    smeared = sinogram[:, None, None, :].expand(len(angles), 1, n, n)
    grid = _rotation_grids(n, -angles)
    image = F.grid_sample(smeared, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return image.sum(dim=0)[0] * (math.pi / len(angles))


def fbp(sinogram: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    return backproject(ramp_filter(sinogram), angles)


def simulate_low_dose(hu: np.ndarray, pixel_mm: float, photons: float, rng: np.random.Generator,
                      angles: int = ANGLES) -> np.ndarray:
    """One axial slice (rows, cols) in HU -> the same slice as if acquired with ``photons``
    unattenuated photons per ray (float32 HU)."""
    rows, cols = hu.shape
    n = int(math.ceil(math.hypot(rows, cols))) + 2  # the whole slice fits at every angle
    padded = np.full((n, n), -1000.0, np.float32)
    top, left = (n - rows) // 2, (n - cols) // 2
    padded[top:top + rows, left:left + cols] = hu
    mu = MU_WATER * (1.0 + np.clip(padded, -1000.0, None) / 1000.0)
    theta = torch.arange(angles, dtype=torch.float32) * (math.pi / angles)
    p = radon(torch.from_numpy(mu)[None, None], theta).double() * pixel_mm  # line integrals
    expected = photons * torch.exp(-p)
    counts = torch.from_numpy(rng.poisson(expected.numpy()).astype(np.float64))
    counts = counts + torch.from_numpy(rng.normal(0.0, ELECTRONIC_SIGMA, counts.shape))
    p_noisy = -torch.log(counts.clamp(min=1.0) / photons)
    delta_mu = fbp((p_noisy - p).float() / pixel_mm, theta)  # 1/mm per pixel
    noise_hu = 1000.0 * delta_mu.numpy() / MU_WATER
    return (hu + noise_hu[top:top + rows, left:left + cols]).astype(np.float32)
