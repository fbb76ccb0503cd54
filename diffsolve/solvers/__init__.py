"""The solvers, each a `diffsolve.sampling.Solver` on the one loop, registered under the names k-diffusion
(`sample_dpmpp_2m`) and ComfyUI (`dpmpp_2m`) use. Each family module registers its own solvers."""
from ..odeint import Odeint, sample_odeint
from .registry import SOLVERS, get_solver, register, solver_factory
from .euler import *  # noqa: F401,F403
from .dpmpp import *  # noqa: F401,F403
from .singlestep import *  # noqa: F401,F403
from .multistep import *  # noqa: F401,F403
from .sde import *  # noqa: F401,F403
from .unipc import *  # noqa: F401,F403
from .lcm import *  # noqa: F401,F403
from .kernel_exp import *  # noqa: F401,F403
from .function import FunctionSolver
from . import dpmpp, euler, lcm, multistep, sde, singlestep, unipc
from . import kernel_exp

register("odeint", Odeint)

__all__ = ["FunctionSolver", "Odeint", "SOLVERS", "get_solver", "register", "sample_odeint", "solver_factory",
           *euler.__all__, *dpmpp.__all__, *singlestep.__all__, *multistep.__all__, *sde.__all__, *unipc.__all__, *lcm.__all__,
           *kernel_exp.__all__]
