"""The stability report: diffsolve.testing's whole suite, default thresholds, on every diffsolve sampler (the
registry, `diffsolve.SOLVERS`, iterated at run time), every k-diffusion 0.1.1.post1 sampler (`sample_*`), the main
diffusers 0.42 schedulers through `integrations.scheduler_step`, and the planted-bug mutants of
`diffsolve.testing.mutants` (which checks catch each). Writes benchmarks/results/stability.json and regenerates
the generated parts of docs/stability.md (the table and the list of failures) from it.

    .venv/bin/python benchmarks/stability.py                 # full run (~4 minutes on one core)
    .venv/bin/python benchmarks/stability.py --only heun,k-diffusion/sample_heun --out /tmp/s.json
    .venv/bin/python benchmarks/stability.py --render        # docs/stability.md from the committed JSON
"""
import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import RESULTS, machine_info, write_json_atomic  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "stability.md"
JSON = RESULTS / "stability.json"
MARKS = {"table": ("<!-- stability-table:start -->", "<!-- stability-table:end -->"),
         "failures": ("<!-- stability-failures:start -->", "<!-- stability-failures:end -->"),
         "mutants": ("<!-- stability-mutants:start -->", "<!-- stability-mutants:end -->")}
COLUMNS = ("sampler", "nominal order", "observed order", "stiff bound (score)", "stiff (flow)", "NFE / step",
           "deterministic", "global RNG", "batch-invariant f64 / f32", "threads", "exact", "agrees", "finite",
           "failed checks")


def samplers(only=None):
    """{id: (sampler object, meta)} of everything the report covers, ids "diffsolve/<name>", "k-diffusion/<fn>",
    "diffusers/<Class>"."""
    import diffsolve as ds
    from diffsolve.integrations.kdiffusion import load
    from diffsolve.testing import from_kdiffusion, from_solver
    out = {f"diffsolve/{name}": lambda name=name: from_solver(name) for name in sorted(ds.SOLVERS)}
    sampling = load()[0]
    for name in sorted(n for n in dir(sampling) if n.startswith("sample_")):
        out[f"k-diffusion/{name}"] = lambda name=name: from_kdiffusion(getattr(sampling, name), name=name)
    try:
        import diffusers
        from diffsolve.integrations.scheduler_step import REPORT_SCHEDULERS, scheduler_sampler
        for name in REPORT_SCHEDULERS:
            out[f"diffusers/{name}"] = lambda name=name: scheduler_sampler(getattr(diffusers, name))
    except ImportError:
        pass
    if only:
        out = {k: v for k, v in out.items() if k in only or k.split("/", 1)[1] in only}
    return out


def mutants():
    from diffsolve.integrations.kdiffusion import load
    from diffsolve.testing import kdiffusion_mutants, solver_mutants
    sampling = load()[0]
    out = {f"diffsolve/{k}": v for k, v in solver_mutants().items()}
    out.update({f"k-diffusion/{k}": v for k, v in
                kdiffusion_mutants(sampling.sample_heun, sampling.sample_euler_ancestral).items()})
    return out


def run(only=None, with_mutants=True):
    from diffsolve.testing import DEFAULT, check_sampler
    torch.set_num_threads(1)
    start = time.perf_counter()
    results = {}
    for key, make in samplers(only).items():
        report = check_sampler(make(), config=DEFAULT)
        results[key] = report.to_dict()
        print(f"{key:48s} {report.seconds:6.1f}s  {'ok' if report.passed else 'FAILED: ' + ', '.join(report.failures)}",
              flush=True)
    caught = {}
    for key, (obj, meta, designated) in (mutants().items() if with_mutants else ()):
        report = check_sampler(obj, config=DEFAULT, **meta)
        caught[key] = {"designated": designated, "failures": report.failures, "passed": report.passed}
        print(f"mutant {key:41s} {report.seconds:6.1f}s  caught by {report.failures}", flush=True)
    import dataclasses
    return {"machine": machine_info(), "seconds": round(time.perf_counter() - start, 1),
            "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(DEFAULT).items()},
            "samplers": results, "mutants": caught}


# ------------------------------------------------------------------------------------------------ rendering
def fmt_number(value, digits=3):
    if value is None:
        return "-"
    if isinstance(value, str):
        return {"inf": "unbounded", "exact": "exact"}.get(value, value)
    if isinstance(value, float) and math.isinf(value):
        return "unbounded"
    if value == 0:
        return "0"
    return f"{value:.{digits}g}" if abs(value) >= 1e-3 else f"{value:.1e}"


def _mark(check):
    return {True: "yes", False: "**no**", None: "n/a"}[check["passed"]]


def row(key, entry):
    """The docs table's cells for one sampler, from its JSON entry."""
    c = entry["checks"]
    order = c["order"]
    observed = fmt_number(order["measured"]) if order["passed"] is not None else "n/a"
    if order["passed"] is False:
        observed = f"**{observed}**"
    stiff = c["stiff_score"]
    stiff_cell = "n/a" if stiff["passed"] is None else fmt_number(stiff["measured"])
    flow = c["stiff_flow"]
    flow_cell = "n/a" if flow["passed"] is None else ("unbounded" if flow["passed"] else
                                                      f"**{fmt_number(flow['measured'])}**")
    nfe = c["nfe"]
    nfe_cell = fmt_number(nfe["measured"]) + (" (total, adaptive)" if entry.get("adaptive") else "")
    nfe_cell += "" if nfe["passed"] is not False else " **(miscounted)**"
    batch = f"{_mark(c['batch_invariance'])} / {_mark(c['batch_invariance_float32'])}"
    failed = ", ".join(entry["failures"]) or "-"
    return [key, fmt_number(entry["order"]), observed, stiff_cell, flow_cell, nfe_cell, _mark(c["determinism"]),
            "untouched" if c["global_rng"]["passed"] else "**drawn from**", batch, _mark(c["thread_invariance"]),
            _mark(c["exactness"]), _mark(c["agreement"]), _mark(c["finiteness"]), failed]


def table(data):
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    lines += ["| " + " | ".join(row(k, v)) + " |" for k, v in data["samplers"].items()]
    return "\n".join(lines)


def failures(data):
    lines = []
    for key, entry in data["samplers"].items():
        for name in entry["failures"]:
            check = entry["checks"][name]
            measured = "inf" if check["measured"] in ("inf", math.inf) else fmt_number(check["measured"])
            lines.append(f"- `{key}` **{name}**: measured {measured}, expected "
                         f"{fmt_number(check['expected'])}. {check['details']}")
    return "\n".join(lines) or "- none"


def mutant_lines(data):
    lines = ["| mutant | planted defect caught by (designated check first) | other checks that failed |",
             "|---|---|---|"]
    for key, m in data["mutants"].items():
        if m["designated"] is None:
            lines.append(f"| `{key}` (original) | passes every check: {'yes' if m['passed'] else '**no**'} | "
                         f"{', '.join(m['failures']) or '-'} |")
        else:
            hit = "yes" if m["designated"] in m["failures"] else "**MISSED**"
            others = [f for f in m["failures"] if f != m["designated"]]
            lines.append(f"| `{key}` | {m['designated']}: {hit} | {', '.join(others) or '-'} |")
    return "\n".join(lines)


def render(data, text):
    """text with its generated sections replaced from data."""
    parts = {"table": table(data), "failures": failures(data), "mutants": mutant_lines(data)}
    for name, (start, end) in MARKS.items():
        i, j = text.index(start) + len(start), text.index(end)
        text = text[:i] + "\n" + parts[name] + "\n" + text[j:]
    return text


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default=None, help="comma-separated sampler ids or names")
    p.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/stability.json)")
    p.add_argument("--render", action="store_true", help="only regenerate docs/stability.md from the JSON")
    p.add_argument("--no-mutants", action="store_true")
    args = p.parse_args(argv)
    path = Path(args.out) if args.out else JSON
    if not args.render:
        data = run(set(args.only.split(",")) if args.only else None, not args.no_mutants)
        write_json_atomic(path, data)
        print(f"wrote {path} ({data['seconds']} s)")
    data = json.loads(path.read_text())
    if path == JSON:
        DOC.write_text(render(data, DOC.read_text()))
        print(f"rendered {DOC}")


if __name__ == "__main__":
    main()
