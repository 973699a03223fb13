"""Baselines of the comparison: RED-CNN's loss wrapper and BM3D (the networks live in ``models/``)."""
