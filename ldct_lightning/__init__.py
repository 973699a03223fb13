"""ldct-lightning: two-stage low-dose CT denoising (Hu et al. 2024) with PyTorch Lightning and Hydra."""

__version__ = "0.1.0"
