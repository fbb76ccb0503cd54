"""Closed-form models that tests share (import as `from _models import ...`): thin re-exports of the public ones in
`diffsolve.testing`."""
from diffsolve.testing import SingleGaussian, identity_model, log_slope

__all__ = ["SingleGaussian", "identity_model", "log_slope"]
