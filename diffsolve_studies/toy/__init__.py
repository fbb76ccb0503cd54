"""2D toy data sets of the paper's studies as Gaussian mixtures (exact density, score and denoiser), and the
small learned score networks trained on them."""
from .datasets import fractal_tree, kde_mixture, pinwheel_points, spiral_points
from .model import ToyModel
from .train import toy_models, train_toy_model

__all__ = ["ToyModel", "fractal_tree", "kde_mixture", "pinwheel_points", "spiral_points", "toy_models",
           "train_toy_model"]
