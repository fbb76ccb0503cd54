"""The 2D studies' tables: our numbers beside the paper's Tables 1-3 (markdown)."""
import json

from . import study

PAPER_KEYS = {"ideal": 0, "learned": 1, "cfg": 2, "autoguidance": 3}


def _fmt(v, digits=2):
    return "–" if v is None else f"{v:.{digits}f}"


def paper_tables():
    """The paper's Tables 1-3 as data (the copy shipped with the package as package data)."""
    from importlib.resources import files
    return json.loads(files("diffsolve_studies").joinpath("data/paper_tables.json").read_text())


def markdown_tables(results, paper):
    """Our numbers beside the paper's, one table per data set and metric."""
    lines = []
    for name in ("fractal", "spiral", "pinwheel"):
        cols = [c for c in study.COLUMNS[name] if any(k.startswith(f"{name}/{c}/") for k in results["runs"])]
        if not cols:
            continue
        table = paper["table1_fractal"] if name == "fractal" else paper["table2_unconditional"][name]
        for metric, paper_key, digits in (("nll", "nll", 2), ("precision", "precision", 2), ("recall", "recall", 2),
                                          ("mmd_biased_e4", "mmd_x1e4", 2), ("mmd_unbiased_e4", None, 2)):
            lines += [f"\n**{name}: {metric}** (ours / paper)\n", "| method | " + " | ".join(cols) + " |",
                      "|---|" + "---|" * len(cols)]
            for method in study.METHODS:
                cells = []
                for c in cols:
                    run = results["runs"].get(f"{name}/{c}/{method}")
                    ours = _fmt(run["metrics"][metric], digits) if run else "–"
                    theirs = table[paper_key][method][PAPER_KEYS[c]] if paper_key else None
                    cells.append(f"{ours} / {_fmt(theirs, digits)}")
                lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines += ["\n**The paper's claim, per column: MSD beats SDS and VSD in NLL and in precision**\n",
              "| data / column | NLL: MSD < SDS, VSD | precision: MSD > SDS, VSD | MSD NLL, abs(ours - paper) | "
              "NLL rank of MSD among SDS/VSD/SDI/MSD (ours / paper) |", "|---|---|---|---|---|"]
    for name in ("fractal", "spiral", "pinwheel"):
        table = paper["table1_fractal"] if name == "fractal" else paper["table2_unconditional"].get(name)
        for c in study.COLUMNS[name]:
            runs = {m: results["runs"].get(f"{name}/{c}/{m}") for m in study.METHODS[1:]}
            if not all(runs.values()):
                continue
            nll = {m: r["metrics"]["nll"] for m, r in runs.items()}
            prec = {m: r["metrics"]["precision"] for m, r in runs.items()}
            paper_nll = {m: table["nll"][m][PAPER_KEYS[c]] for m in runs}
            rank = sorted(nll, key=nll.get).index("msd") + 1
            paper_rank = sorted(paper_nll, key=paper_nll.get).index("msd") + 1
            lines.append(f"| {name}/{c} | {'yes' if nll['msd'] < min(nll['sds'], nll['vsd']) else 'no'} | "
                         f"{'yes' if prec['msd'] > max(prec['sds'], prec['vsd']) else 'no'} | "
                         f"{abs(nll['msd'] - paper_nll['msd']):.2f} | {rank} / {paper_rank} |")
    if results["efficiency"]:
        for stat, title in (("log_mean_efficiency", "ln(mean efficiency): own mean / oracle / paper"),
                            ("mean_log_efficiency", "mean of ln(efficiency): own mean / oracle / paper")):
            lines += [f"\n**Efficiency (eq. 17), {title}**\n",
                      "| data / column | " + " | ".join(study.METHODS[1:]) + " |", "|---|" + "---|" * 4]
            for key, per in results["efficiency"].items():
                name, column = key.split("/")
                paper_row = paper["table3_efficiency_log"][name]
                cells = []
                for m in study.METHODS[1:]:
                    own = "deterministic" if per[m]["own_mean"]["deterministic"] else _fmt(per[m]["own_mean"][stat])
                    cells.append(f"{own} / {_fmt(per[m]['oracle'][stat])} / "
                                 f"{_fmt(paper_row[m][0 if column == 'ideal' else 1])}")
                lines.append(f"| {key} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
