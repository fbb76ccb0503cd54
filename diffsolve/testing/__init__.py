"""diffsolve.testing: property-test the stability of any sampler on problems with exact answers.

  - problems: `SingleGaussian`, `PointMass`, `MixtureProblem`, `KernelProblem` (exact flows / marginals), `log_slope`;
  - samplers: `as_sampler` puts a diffsolve Solver, a k-diffusion-style function or (through
    `diffsolve.integrations.scheduler_step`) a diffusers scheduler behind one `Sampler.run`;
  - properties: `assert_point_mass_exact`, `assert_batch_split_invariant`, ... take drawn inputs (property tests);
  - checks: `check_<name>` returns a `CheckReport` (name, passed, measured, expected, details), `assert_<name>` raises;
    `check_sampler` runs them all (`SuiteReport`), `Config` holds the thresholds (defaults: the stability report's);
  - `diffsolve.testing.strategies`: hypothesis strategies (imports hypothesis; this package does not);
  - `diffsolve.testing.pytest_plugin`: the `sampler_checks` fixture.
See docs/testing.md and docs/stability.md.
"""
from .checks import *  # noqa: F401,F403
from .contract import *  # noqa: F401,F403
from .mutants import *  # noqa: F401,F403
from .problems import *  # noqa: F401,F403
from .properties import *  # noqa: F401,F403
from .report import *  # noqa: F401,F403
from .samplers import *  # noqa: F401,F403
from .suite import *  # noqa: F401,F403
from . import checks as _checks, contract as _contract, mutants as _mutants, problems as _problems
from . import properties as _properties
from . import report as _report
from . import samplers as _samplers, suite as _suite

__all__ = sorted({*_checks.__all__, *_contract.__all__, *_mutants.__all__, *_problems.__all__, *_properties.__all__,
                  *_report.__all__, *_samplers.__all__,
                  *_suite.__all__})
