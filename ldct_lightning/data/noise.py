"""Noise models that turn an NDCT image into a simulated LDCT one, and noise-level estimation.

Stage 1 trains on NDCT crops plus simulated noise. The noise level that makes the simulated LDCT match
the real LDCT series is ``sqrt(sd_ldct^2 - sd_ndct^2)`` (the NDCT crop already carries its own noise):
:func:`estimate_noise_sd_hu` measures both series and :func:`simulation_sigma` combines them.

Each noise model is a small callable ``model(hu, generator) -> noisy_hu`` on a HU image (a crop or a
slice, numpy or torch) with an explicit random generator, so that datasets stay reproducible.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import torch
from scipy import ndimage

from ldct_lightning.data import projector

Generator = np.random.Generator | torch.Generator | None


def torch_generator(generator: Generator) -> torch.Generator | None:
    """A torch generator for ``generator``: itself, or one seeded from a numpy generator."""
    if isinstance(generator, np.random.Generator):
        return torch.Generator().manual_seed(int(generator.integers(0, 2**63 - 1)))
    return generator


def _as_tensor(hu: np.ndarray | torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.asarray(hu, dtype=np.float32)) if isinstance(hu, np.ndarray) else hu.float()


def _like(result: torch.Tensor, hu: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    return result.numpy() if isinstance(hu, np.ndarray) else result


class GaussianNoise:
    """Add white Gaussian noise of ``sigma_hu`` (the paper's stage-1 simulation).

    With a ``scale_range`` every call (one crop) draws its own SD, ``sigma_hu`` times a factor
    log-uniform in the range: a network trained so sees a range of noise levels instead of one
    scanner's, as the blind DnCNN of Zhang et al. 2017 (IEEE TIP 26:3142) does.

    Args:
        sigma_hu: noise SD in HU (>= 0).
        scale_range: ``(low, high)`` factors on ``sigma_hu``, ``0 < low <= high`` (default: exactly
            ``sigma_hu``).

    Example:
        >>> noisy = GaussianNoise(25.0)(crop_hu, np.random.default_rng(0))
    """

    def __init__(self, sigma_hu: float, scale_range: tuple[float, float] = (1.0, 1.0)) -> None:
        if not sigma_hu >= 0:
            raise ValueError(f"sigma_hu must be a number >= 0, got {sigma_hu}")
        low, high = (float(v) for v in scale_range)
        if not 0 < low <= high:
            raise ValueError(f"scale_range must be (low, high) with 0 < low <= high, got {scale_range}")
        self.sigma_hu = float(sigma_hu)
        self.scale_range = (low, high)
        self._torch_generator: torch.Generator | None = None

    def __call__(
        self, hu: np.ndarray | torch.Tensor, generator: Generator = None
    ) -> np.ndarray | torch.Tensor:
        """Return ``hu + N(0, sigma^2)`` as float32, same type (numpy or torch) as ``hu``.

        Args:
            hu: image(s) in HU.
            generator: numpy or torch random generator (seed it for reproducible noise).

        Returns:
            The noisy image.
        """
        x = _as_tensor(hu)
        gen = self._generator(generator)
        sigma = self.sigma_hu
        low, high = self.scale_range
        if high > low:
            u = float(torch.rand((), generator=gen))
            sigma *= math.exp(math.log(low) + u * (math.log(high) - math.log(low)))
        # torch.randn is about twice as fast as numpy's normal sampler for crop-sized arrays
        noise = torch.randn(x.shape, generator=gen, dtype=torch.float32)
        return _like(noise.mul_(sigma).add_(x), hu)

    def _generator(self, generator: Generator) -> torch.Generator | None:
        if isinstance(generator, np.random.Generator):
            # one reseeded generator per instance: creating a torch.Generator per call costs more than the noise
            if self._torch_generator is None:
                self._torch_generator = torch.Generator()
            return self._torch_generator.manual_seed(int(generator.integers(0, 2**63 - 1)))
        return generator

    def __getstate__(self) -> dict:
        return {"sigma_hu": self.sigma_hu, "scale_range": self.scale_range, "_torch_generator": None}

    def __repr__(self) -> str:
        scale = "" if self.scale_range == (1.0, 1.0) else f", scale_range={self.scale_range}"
        return f"GaussianNoise(sigma_hu={self.sigma_hu:g}{scale})"


class ProjectionNoise:
    """Add the noise of a projection-domain low-dose acquisition (Poisson + electronic noise, FBP).

    The image is projected (parallel beam), Poisson photon noise with ``photons_per_ray`` unattenuated
    photons and Gaussian electronic noise are added to the counts, and the noise field
    ``FBP(noisy sinogram) - FBP(noiseless sinogram)`` is added to the input. Unlike
    :func:`ldct_lightning.data.projector.simulate_dose` (which returns the noisy reconstruction itself),
    the input's sharpness is kept, so the target of a denoiser stays the input image. The noise is
    correlated, with FBP texture and streaks behind dense structures.

    The noise level depends on the path lengths through the image that is given: on a crop, rays only
    cross the crop, so the same ``photons_per_ray`` gives less noise than on the whole slice. Calibrate
    the photons for the image size in use with :func:`calibrate_photons`.

    Args:
        photons_per_ray: unattenuated photons per detector bin and view.
        electronic_noise_sd: SD of the electronic noise in photon counts.
        n_views: projection angles over 180 degrees.
        pixel_mm: pixel size in mm.
        filter_name: FBP filter (see :func:`ldct_lightning.data.projector.ramp_filter`).
    """

    def __init__(
        self,
        photons_per_ray: float,
        electronic_noise_sd: float = 0.0,
        n_views: int = 128,
        pixel_mm: float = 0.7,
        filter_name: str = "hann",
    ) -> None:
        if not photons_per_ray > 0:
            raise ValueError(f"photons_per_ray must be > 0, got {photons_per_ray}")
        if electronic_noise_sd < 0 or n_views < 1 or pixel_mm <= 0:
            raise ValueError(
                f"need electronic_noise_sd >= 0, n_views >= 1, pixel_mm > 0; got {electronic_noise_sd}, "
                f"{n_views}, {pixel_mm}"
            )
        self.photons_per_ray = float(photons_per_ray)
        self.electronic_noise_sd = float(electronic_noise_sd)
        self.n_views = int(n_views)
        self.pixel_mm = float(pixel_mm)
        self.filter_name = filter_name

    def noise_field(self, hu: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """The noise alone (HU) for square image(s) (H, W) or (B, H, W)."""
        sino = projector.forward_project(projector.hu_to_mu(hu), self.n_views, self.pixel_mm)
        noisy = projector.add_poisson_noise(sino, self.photons_per_ray, self.electronic_noise_sd, generator)
        # one batched FBP for the noisy and the noiseless sinogram
        both = torch.cat((noisy.reshape(-1, *sino.shape[-2:]), sino.reshape(-1, *sino.shape[-2:])))
        recon = projector.fbp(both, hu.shape[-1], self.pixel_mm, self.filter_name)
        n = len(both) // 2
        return ((recon[:n] - recon[n:]) * (1000.0 / projector.MU_WATER)).reshape(hu.shape)

    def __call__(
        self, hu: np.ndarray | torch.Tensor, generator: Generator = None
    ) -> np.ndarray | torch.Tensor:
        """Return ``hu`` plus projection-domain noise, float32, same type as ``hu``.

        Args:
            hu: square image(s) (H, W) or (B, H, W) in HU.
            generator: numpy or torch random generator.

        Returns:
            The noisy image.
        """
        x = _as_tensor(hu)
        return _like(x + self.noise_field(x, torch_generator(generator)).to(torch.float32), hu)

    def __repr__(self) -> str:
        return (
            f"ProjectionNoise(photons_per_ray={self.photons_per_ray:.4g}, electronic_noise_sd="
            f"{self.electronic_noise_sd:g}, n_views={self.n_views}, pixel_mm={self.pixel_mm:g})"
        )


def calibrate_photons(
    images_hu: Iterable[np.ndarray | torch.Tensor],
    target_sd_hu: float,
    electronic_noise_sd: float = 0.0,
    n_views: int = 128,
    pixel_mm: float = 0.7,
    soft_tissue_hu: tuple[float, float] = (-100.0, 200.0),
    iterations: int = 3,
    seed: int = 0,
) -> float:
    """Photons per ray at which :class:`ProjectionNoise` adds noise of ``target_sd_hu`` in soft tissue.

    Quantum noise variance scales as 1 / photons, so each iteration rescales the photons by
    ``(measured / target)^2``; a few iterations absorb the electronic-noise part.

    Args:
        images_hu: a few representative square images (crops of the size used in training).
        target_sd_hu: wanted SD of the added noise in soft tissue (``soft_tissue_hu``), in HU.
        electronic_noise_sd: electronic noise SD in counts.
        n_views: projection angles.
        pixel_mm: pixel size in mm.
        soft_tissue_hu: HU range of the pixels where the SD is measured.
        iterations: rescaling steps.
        seed: random seed of the simulated noise.

    Returns:
        The calibrated photons per ray.
    """
    if not target_sd_hu > 0:
        raise ValueError(f"target_sd_hu must be > 0, got {target_sd_hu}")
    images = torch.stack([_as_tensor(im) for im in images_hu])
    mask = (images >= soft_tissue_hu[0]) & (images <= soft_tissue_hu[1])
    if not mask.any():
        mask = torch.ones_like(images, dtype=torch.bool)
    photons = 1e5
    generator = torch.Generator().manual_seed(seed)
    for _ in range(iterations):
        model = ProjectionNoise(photons, electronic_noise_sd, n_views, pixel_mm)
        sd = float(model.noise_field(images, generator)[mask].std())
        photons *= (sd / target_sd_hu) ** 2
    return photons


def _blocks(image: np.ndarray, patch: int) -> np.ndarray:
    """Non-overlapping ``patch x patch`` blocks of an image as rows (n_blocks, patch * patch)."""
    rows, cols = image.shape[0] // patch * patch, image.shape[1] // patch * patch
    blocks = image[:rows, :cols].reshape(rows // patch, patch, cols // patch, patch).swapaxes(1, 2)
    return blocks.reshape(-1, patch * patch)


def estimate_noise_sd_hu(
    volumes: Iterable[np.ndarray],
    soft_tissue_hu: tuple[float, float] = (-100.0, 200.0),
    patch: int = 10,
    smooth_px: float = 2.0,
    max_slices: int = 8,
) -> float:
    """Robust estimate of the pixel noise SD (HU) in flat soft tissue of CT volumes.

    Each of up to ``max_slices`` evenly spaced slices per volume is cut into non-overlapping
    ``patch x patch`` blocks. A block is kept when its Gaussian-smoothed version (``smooth_px``; the
    smoothing makes the test insensitive to the noise itself) lies entirely in ``soft_tissue_hu``, which
    drops blocks that touch fat, air, bone or contrast. A plane is fitted to each kept block (removing
    smooth anatomy and shading), the SD of the residual is taken (``patch^2 - 3`` degrees of freedom),
    and the result is the median over all kept blocks.

    What it estimates and its bias: the SD of the noise in homogeneous soft tissue (liver, spleen,
    muscle), the quantity the paper's Gaussian simulation needs. Unbiased within 1 % for white noise.
    Texture and small structures left in kept blocks bias it high, the more so the lower the noise;
    the block mean and plane absorb low-frequency noise power, which biases correlated (FBP) noise low.
    Measured on the built-in demo set (256 px, 1.4 mm, against the generator's noisy-minus-noiseless
    SD in the liver): LDCT -4..+1 %, NDCT +7..+12 %, so :func:`simulation_sigma` comes out 1-5 % low.

    Args:
        volumes: HU arrays (n, rows, cols) or single slices (rows, cols), e.g. cached series.
        soft_tissue_hu: HU range the smoothed block must lie in.
        patch: block size in pixels.
        smooth_px: SD (pixels) of the Gaussian smoothing used to select blocks.
        max_slices: slices sampled per volume.

    Returns:
        The noise SD in HU.

    Raises:
        ValueError: no block of soft tissue was found.
    """
    yy, xx = np.mgrid[:patch, :patch].astype(np.float64)
    design = np.stack((np.ones(patch * patch), yy.ravel() - yy.mean(), xx.ravel() - xx.mean()), axis=1)
    # residual = block - its least-squares plane, for all blocks at once (one matrix product)
    residual_op = np.eye(patch * patch) - design @ np.linalg.pinv(design)
    lo, hi = soft_tissue_hu
    sds = []
    for volume in volumes:
        volume = np.asarray(volume) if np.ndim(volume) == 3 else np.asarray(volume)[None]
        n, rows, cols = volume.shape
        if rows < patch or cols < patch:
            continue
        for k in np.unique(np.linspace(0, n - 1, min(n, max_slices)).round().astype(int)):
            image = np.asarray(volume[k], dtype=np.float64)
            smooth = _blocks(ndimage.gaussian_filter(image, smooth_px), patch)
            blocks = _blocks(image, patch)[(smooth.min(axis=1) >= lo) & (smooth.max(axis=1) <= hi)]
            if len(blocks):
                res = blocks @ residual_op
                sds.append(np.sqrt((res**2).sum(axis=1) / (patch * patch - 3)))
    if not sds:
        raise ValueError(
            f"no {patch}x{patch} block of soft tissue ({lo:g}..{hi:g} HU) found: cannot estimate the noise "
            "level. Set the noise SD explicitly (noise.sigma_hu)"
        )
    return float(np.median(np.concatenate(sds)))


def simulation_sigma(ldct_sd_hu: float, ndct_sd_hu: float) -> float:
    """SD of the noise to add to NDCT so that it matches LDCT: ``sqrt(max(ldct^2 - ndct^2, 0))``.

    Args:
        ldct_sd_hu: noise SD of the LDCT series.
        ndct_sd_hu: noise SD of the NDCT series.

    Returns:
        The simulation SD in HU (0 when the NDCT is as noisy as the LDCT).
    """
    return math.sqrt(max(ldct_sd_hu**2 - ndct_sd_hu**2, 0.0))
