from . import diffsolve_guidance  # noqa: F401
