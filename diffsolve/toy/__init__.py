"""2D toy data sets of the paper's studies as Gaussian mixtures (exact density, score and denoiser)."""
from .datasets import fractal_tree, kde_mixture, pinwheel_points, spiral_points

__all__ = ["fractal_tree", "kde_mixture", "pinwheel_points", "spiral_points"]
