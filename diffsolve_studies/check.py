"""`diffsolve check MODULE:NAME`: the diffsolve.testing suite on a user's sampler, as a table.

NAME is a k-diffusion-style function `f(model, x, sigmas, ...)`, a diffsolve Solver class or instance, or a diffusers
scheduler class or instance; MODULE is an importable module or a path to a .py file. Exit status 0 when every check
passes, 1 naming the failed checks otherwise, 2 on a usage error.
"""
import importlib
import importlib.util
import json
import sys
from pathlib import Path

from diffsolve.runs import ArgumentParser, at_least

KIND_CHOICES = ("k-diffusion", "diffsolve", "diffusers-scheduler")


def _parser():
    p = ArgumentParser(prog="diffsolve check", description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument("target", metavar="MODULE:NAME", help="the sampler: module (or file.py) and attribute")
    p.add_argument("--kind", choices=KIND_CHOICES, default=None, help="what NAME is (default: inferred)")
    p.add_argument("--json", metavar="PATH", default=None, help="also write the reports as JSON to PATH")
    p.add_argument("--order", type=at_least(0.0, float), default=None,
                   help="nominal order (default: declared by a Solver, the registry twin of a k-diffusion name, "
                        "or the table of diffusers schedulers)")
    p.add_argument("--checks", default=None, help="comma-separated subset of the checks (default: all)")
    p.add_argument("--details", action="store_true", help="print how each figure was measured")
    return p


def load_target(target):
    """The object named by MODULE:NAME (MODULE a dotted module or a path to a .py file)."""
    if ":" not in target:
        raise ValueError(f"expected MODULE:NAME, got {target!r}")
    module_name, _, attr = target.rpartition(":")
    if module_name.endswith(".py") or "/" in module_name:
        path = Path(module_name)
        if not path.is_file():
            raise ValueError(f"no such file: {path}")
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules.setdefault(path.stem, module)
        spec.loader.exec_module(module)
    else:
        sys.path.insert(0, str(Path.cwd()))
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise ValueError(f"cannot import {module_name!r}: {e}") from None
        finally:
            sys.path.pop(0)
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ValueError(f"{module_name!r} has no attribute {attr!r}") from None


def _is_scheduler(obj):
    return hasattr(obj, "set_timesteps") and hasattr(obj, "step") and hasattr(obj, "config")


def build_sampler(obj, kind=None, order=None):
    """The kit's Sampler for what the command loaded."""
    from diffsolve.testing import as_sampler
    meta = {} if order is None else {"order": order}
    if kind == "diffusers-scheduler" or (kind is None and _is_scheduler(obj)):
        from diffsolve.integrations.scheduler_step import scheduler_sampler
        return scheduler_sampler(obj, **meta)
    return as_sampler(obj, kind, **meta)


def main(argv=None):
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        obj = load_target(args.target)
        sampler = build_sampler(obj, args.kind, args.order)
        checks = None if args.checks is None else [c.strip() for c in args.checks.split(",") if c.strip()]
        from diffsolve.testing import CHECKS, check_sampler
        if checks is not None and not set(checks) <= set(CHECKS):
            raise ValueError(f"unknown checks {sorted(set(checks) - set(CHECKS))}; known: {', '.join(CHECKS)}")
    except ValueError as e:
        parser.error(str(e))
    report = check_sampler(sampler, checks=checks)
    print(report.table(details=args.details))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report.to_dict(), indent=1))
    if not report.passed:
        for r in report.reports:
            if r.passed is False:
                print(f"failed check {r.name}: {r.details}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
