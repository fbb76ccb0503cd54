"""The solvers, each a `diffsolve.sampling.Solver` on the one loop, and a registry that takes the names
as k-diffusion (`sample_dpmpp_2m`) and ComfyUI (`dpmpp_2m`) spell them."""
from ..odeint import Odeint, sample_odeint
from ..sampling import Solver
from .dpmpp import DPMpp2M, sample_dpmpp_2m
from .euler import (DDIM, Euler, Heun, ancestral_step, churn_sigma, sample_ddim, sample_euler,
                    sample_euler_ancestral, sample_heun)

__all__ = ["DDIM", "DPMpp2M", "Euler", "Heun", "Odeint", "SOLVERS", "sample_odeint", "solver_factory", "ancestral_step", "churn_sigma", "get_solver",
           "register", "sample_ddim", "sample_dpmpp_2m", "sample_euler", "sample_euler_ancestral", "sample_heun"]

SOLVERS = {}


def register(name, factory):
    """Register `factory(**params) -> Solver` under `name` (ComfyUI's spelling; `sample_<name>` also resolves)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"a solver name must be a non-empty string, got {name!r}")
    SOLVERS[name] = factory
    return factory


for _name, _factory in (("euler", Euler), ("heun", Heun), ("ddim", DDIM),
                        ("euler_ancestral", lambda eta=1.0, s_noise=1.0: DDIM(eta, s_noise)),
                        ("dpmpp_2m", DPMpp2M), ("odeint", Odeint)):
    register(_name, _factory)


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
