"""`numoe plot`: the community's charts, as PNG or SVG (by the output file's extension).

    numoe plot pareto points.json -o pareto.png [--y kld] [--title ...] [--log-y]
    numoe plot sweep numoe.json llama.txt -o sweep.svg [--label A --label B]

pareto: perplexity (or KLD) against size in GiB from the JSON of the ik_llama.cpp quant
threads: a list of {"name", "bpw", "ppl", "size"} objects (or {"title", "data": [...]}); "ppl"
may be "3.3469 +/- 0.01936", points with "skip": true are left out, "legend" groups them by
colour. The Pareto frontier (no other point is both smaller and better) is a solid line through
filled, labelled points; every other point is hollow, labelled, with a dashed line up from the
frontier that beats it.
sweep: S_PP and S_TG against N_KV, one series per file (cluster/sweep_results.py reads them).
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cluster.errors import NumoeError

FORMATS = (".png", ".svg")
FIGURE_SIZE_IN = (10.0, 6.0)
DPI = 100
# "3.3469 +/- 0.01936", as llama-perplexity prints its final estimate
_VALUE_PM = re.compile(r"^\s*([-+0-9.eE]+)\s*(?:\+/-|±)\s*([-+0-9.eE]+)\s*$")


@dataclass(frozen=True)
class QuantPoint:
    name: str
    size_gib: float
    value: float  # perplexity or KLD, lower is better
    error: float | None = None  # the +/- of the value, when given
    bpw: float | None = None
    group: str = ""  # the "legend" field: who made the quant


def add_plot_parser(commands: argparse._SubParsersAction) -> None:
    plot = commands.add_parser(
        "plot", help="charts: perplexity-against-size Pareto, sweep-bench speed (PNG/SVG)",
        description="Draw a chart as PNG or SVG, chosen by the -o file's extension.")
    kinds = plot.add_subparsers(dest="chart", required=True, metavar="CHART")

    pareto = kinds.add_parser(
        "pareto", help="perplexity (or KLD) against size, with the Pareto frontier",
        description="Quality against size from a JSON list of {name, bpw, ppl, size (GiB)} "
                    "objects (optional kld, legend, skip), the Pareto frontier drawn through "
                    "the points nothing smaller beats.")
    pareto.add_argument("points", help="JSON file of points")
    pareto.add_argument("-o", "--output", required=True, help="output file, .png or .svg")
    pareto.add_argument("--y", dest="y_field", choices=("ppl", "kld"), default="ppl",
                        help="quantity on the y axis (default: %(default)s)")
    pareto.add_argument("--title", default=None, help="chart title (default: the file's)")
    pareto.add_argument("--log-y", action="store_true", help="logarithmic y axis")
    pareto.set_defaults(handler=_run_pareto)

    sweep = kinds.add_parser(
        "sweep", help="sweep-bench S_PP and S_TG against N_KV, one series per file",
        description="Prompt and decode speed against KV depth from `numoe bench --json` "
                    "files, llama-sweep-bench jsonl, or its table pasted into a text file.")
    sweep.add_argument("files", nargs="+", help="sweep results, one series each")
    sweep.add_argument("-o", "--output", required=True, help="output file, .png or .svg")
    sweep.add_argument("--label", action="append", default=None,
                       help="legend text of each file, in order (repeatable; default: the "
                            "engine or file name)")
    sweep.add_argument("--title", default=None, help="chart title (default: the model)")
    sweep.set_defaults(handler=_run_sweep)


# -- Pareto ----------------------------------------------------------------------------------


def pareto_frontier(points: list[QuantPoint]) -> list[QuantPoint]:
    """The points no other point dominates (at most as large and at most as bad, one of them
    strictly), by size. Equal points do not dominate each other."""
    frontier: list[QuantPoint] = []
    for point in sorted(points, key=lambda p: (p.size_gib, p.value)):
        best = frontier[-1] if frontier else None
        if best is None or point.value < best.value or (
                point.value == best.value and point.size_gib == best.size_gib):
            frontier.append(point)
    return frontier


def load_points(path: str | Path, y_field: str = "ppl") -> tuple[list[QuantPoint], str]:
    """The points of a community-format JSON file, and its title ("" when it has none)."""
    data = _read_json(Path(path))
    title = ""
    if isinstance(data, dict):
        title = "\n".join(str(data[key]) for key in ("title", "subtitle") if data.get(key))
        data = data.get("data")
    if not isinstance(data, list):
        raise NumoeError(f"{path}: give a JSON list of points (objects with name, bpw, ppl, "
                         f"size), or an object whose \"data\" is that list")
    points = [_point(entry, f"{path} point {i + 1}", y_field) for i, entry in enumerate(data)
              if not (isinstance(entry, dict) and entry.get("skip") is True)]
    if not points:
        raise NumoeError(f"{path}: the list of points is empty; give at least one "
                         f"{{\"name\", \"size\", \"{y_field}\"}} object")
    return points, title


def _point(entry: object, where: str, y_field: str) -> QuantPoint:
    if not isinstance(entry, dict):
        raise NumoeError(f"{where}: must be an object with name, size (GiB) and {y_field}")
    missing = [key for key in ("name", "size", y_field) if entry.get(key) is None]
    if missing:
        raise NumoeError(f"{where} ({entry.get('name', 'unnamed')}): missing "
                         f"{', '.join(missing)}; each point needs name, size (GiB) and "
                         f"{y_field}")
    value, error = _number_pm(entry[y_field], f"{where} {y_field}")
    size, _ = _number_pm(entry["size"], f"{where} size")
    bpw = None if entry.get("bpw") is None else _number_pm(entry["bpw"], f"{where} bpw")[0]
    if size <= 0:
        raise NumoeError(f"{where}: size {size} must be a positive number of GiB")
    return QuantPoint(name=str(entry["name"]), size_gib=size, value=value, error=error,
                      bpw=bpw, group=str(entry.get("legend") or ""))


def _number_pm(raw: Any, where: str) -> tuple[float, float | None]:
    """A number, or a "value +/- error" string."""
    if isinstance(raw, bool):
        raise NumoeError(f"{where}: {raw!r} is not a number")
    if isinstance(raw, int | float):
        return float(raw), None
    if isinstance(raw, str):
        match = _VALUE_PM.match(raw)
        try:
            return (float(match[1]), float(match[2])) if match else (float(raw), None)
        except ValueError:
            pass
    raise NumoeError(f"{where}: {raw!r} is not a number (nor \"value +/- error\")")


def draw_pareto(points: list[QuantPoint], output: Path, title: str, y_label: str,
                log_y: bool = False) -> None:
    plt = _pyplot()
    frontier = pareto_frontier(points)
    on_frontier = {id(point) for point in frontier}
    groups = sorted({point.group for point in points})
    colours = {group: f"C{i % 10}" for i, group in enumerate(groups)}
    figure, axes = plt.subplots(figsize=FIGURE_SIZE_IN, dpi=DPI)
    axes.plot([p.size_gib for p in frontier], [p.value for p in frontier], "-", color="0.25",
              linewidth=1.5, zorder=1, label="Pareto frontier")
    for point in points:
        colour = colours[point.group]
        best = id(point) in on_frontier
        if not best:  # dashed up from the frontier point that beats it
            beater = min((p for p in frontier if p.size_gib <= point.size_gib),
                         key=lambda p: p.value)
            axes.plot([point.size_gib, point.size_gib], [beater.value, point.value], "--",
                      color=colour, linewidth=0.8, alpha=0.6, zorder=1)
        if point.error is not None:
            axes.errorbar(point.size_gib, point.value, yerr=point.error, fmt="none",
                          ecolor=colour, elinewidth=0.8, capsize=2, zorder=2)
        axes.plot(point.size_gib, point.value, "o", markersize=7, zorder=3,
                  color=colour, markerfacecolor=colour if best else "white",
                  markeredgewidth=1.5, linestyle="none")
        label = point.name if point.bpw is None else f"{point.name} ({point.bpw:.3g} bpw)"
        axes.annotate(label, (point.size_gib, point.value), textcoords="offset points",
                      xytext=(5, 5), fontsize=8, color=colour if best else "0.35")
    for group in groups:
        if group:
            axes.plot([], [], "o", color=colours[group], label=group)
    axes.plot([], [], "o", color="0.35", markerfacecolor="white", label="not on the frontier")
    if log_y:
        axes.set_yscale("log")
    axes.set_xlabel("size (GiB)")
    axes.set_ylabel(y_label)
    axes.set_title(title)
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=8)
    _save(figure, output)


def _run_pareto(args: argparse.Namespace) -> int:
    output = _output_path(args.output)
    points, file_title = load_points(args.points, args.y_field)
    y_label = "perplexity (lower is better)" if args.y_field == "ppl" else \
        "KL divergence (lower is better)"
    title = args.title or file_title or f"{y_label.split(' (')[0]} against size"
    draw_pareto(points, output, title, y_label, args.log_y)
    print(f"numoe: wrote {output} ({len(points)} points, "
          f"{len(pareto_frontier(points))} on the frontier)")
    return 0


# -- sweep-bench ------------------------------------------------------------------------------


def _run_sweep(args: argparse.Namespace) -> int:
    from cluster.sweep_results import load_sweep  # noqa: PLC0415

    output = _output_path(args.output)
    labels = args.label or []
    if len(labels) > len(args.files):
        raise NumoeError(f"{len(labels)} --label values for {len(args.files)} files; give at "
                         f"most one label per file")
    results = [load_sweep(path) for path in args.files]
    for result, label in zip(results, labels, strict=False):
        result.label = label
    models = sorted({result.model for result in results if result.model})
    title = args.title or ("sweep-bench: " + ", ".join(models) if models else "sweep-bench")
    plt = _pyplot()
    figure, (pp_axes, tg_axes) = plt.subplots(1, 2, figsize=FIGURE_SIZE_IN, dpi=DPI)
    for index, result in enumerate(results):
        n_kv = [row.n_kv for row in result.rows]
        style = {"marker": "o", "markersize": 4, "color": f"C{index % 10}",
                 "label": result.legend}
        pp_axes.plot(n_kv, [row.speed_pp for row in result.rows], **style)
        tg_axes.plot(n_kv, [row.speed_tg for row in result.rows], **style)
    for axes, what in ((pp_axes, "prompt processing S_PP"), (tg_axes, "generation S_TG")):
        axes.set_xlabel("N_KV (tokens in the KV cache)")
        axes.set_ylabel("tokens / s")
        axes.set_title(what)
        axes.set_ylim(bottom=0)
        axes.grid(True, alpha=0.3)
        axes.legend(fontsize=8)
    figure.suptitle(title)
    _save(figure, output)
    print(f"numoe: wrote {output} ({len(results)} series)")
    return 0


# -- shared -----------------------------------------------------------------------------------


def _output_path(raw: str) -> Path:
    output = Path(raw)
    if output.suffix.lower() not in FORMATS:
        raise NumoeError(f"-o {raw}: unknown image format {output.suffix or '(none)'!r}; "
                         f"end the name with {' or '.join(FORMATS)}")
    return output


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as error:
        raise NumoeError(f"cannot read {path}: {getattr(error, 'strerror', None) or error}") \
            from error
    except json.JSONDecodeError as error:
        raise NumoeError(f"{path}: not valid JSON ({error.msg} at line {error.lineno})") \
            from error


def _pyplot() -> Any:
    """pyplot on the file-only Agg backend (no display needed), imported on first use."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    return plt


def _save(figure: Any, output: Path) -> None:
    import matplotlib.pyplot as plt  # noqa: PLC0415

    figure.tight_layout()
    try:
        figure.savefig(output, format=output.suffix.lower().lstrip("."), dpi=DPI)
    except OSError as error:
        raise NumoeError(f"cannot write {output}: {error.strerror or error}") from error
    finally:
        plt.close(figure)
