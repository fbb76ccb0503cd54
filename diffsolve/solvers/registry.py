"""The solver registry: names as ComfyUI spells them ("dpmpp_2m"); k-diffusion's "sample_dpmpp_2m" resolves too."""
from ..sampling import Solver

__all__ = ["SOLVERS", "get_solver", "register", "solver_factory"]

SOLVERS = {}


def register(name, factory):
    """Register `factory(**params) -> Solver` under `name`; returns the factory (usable as a decorator's body)."""
    if not isinstance(name, str) or not name or name.startswith("sample_"):
        raise ValueError(f"a solver name must be a non-empty string without the sample_ prefix, got {name!r}")
    SOLVERS[name] = factory
    return factory


def solver_factory(name):
    """The registered factory of `name` ("dpmpp_2m" or "sample_dpmpp_2m"); ValueError listing the known names."""
    if not isinstance(name, str):
        raise ValueError(f"solver must be a Solver or a registry name, got {name!r}")
    key = name[len("sample_"):] if name.startswith("sample_") else name
    if key not in SOLVERS:
        raise ValueError(f"unknown solver {name!r}; known: {sorted(SOLVERS)}")
    return SOLVERS[key]


def get_solver(solver, **params):
    """A Solver from a Solver instance (params must be empty) or a registered name, e.g. "dpmpp_2m",
    "sample_dpmpp_2m"; an unknown name is a ValueError listing the known ones."""
    if isinstance(solver, Solver):
        if params:
            raise ValueError(f"parameters {sorted(params)} given with a Solver instance {solver!r}")
        return solver
    return solver_factory(solver)(**params)
