"""Results as a table, a JSON file and a PNG plot.

The table uses ``rich`` when it is installed and plain text otherwise; the plot needs
``matplotlib`` (Agg backend, no display) and is skipped with a note when it is missing, so the
benchmark runs on a machine with only torch and triton.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from pathlib import Path


def _num(value: float | None, fmt: str = "{:,.0f}") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return fmt.format(value)


def _rate(value: float | None) -> str:
    """Images per second: whole numbers when large, three significant digits when small."""
    if value is None:
        return "-"
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def _cell(system: dict | None, key: str = "img_s", fmt: str | None = None) -> str:
    if not system:
        return "-"
    if system.get("status") != "ok":
        return system.get("status", "?")
    return _rate(system.get(key)) if fmt is None else _num(system.get(key), fmt)


def model_rows(results: dict) -> tuple[list[str], list[list[str]]]:
    header = ["model", "mode", "fastres img/s", "eager img/s", "compile img/s", "vs eager",
              "vs compile", "fastres / roofline", "roofline img/s", "fastres 1st step s",
              "compile 1st step s", "fastres served by", "saved/eager",
              "GB/step e/l/b", "mem-bound img/s e/l/b"]
    rows = []
    for e in results.get("models", []):
        s = e["systems"]
        rows.append([
            e["model"], e["mode"], _cell(s.get("fastres")), _cell(s.get("eager")),
            _cell(s.get("compile")), _num(e.get("speedup_vs_eager"), "{:.2f}x"),
            _num(e.get("speedup_vs_compile"), "{:.2f}x"),
            _cell(s.get("fastres"), "frac_roofline", "{:.1%}"), _rate(e.get("roofline_img_s")),
            _cell(s.get("fastres"), "first_call_s", "{:.1f}"),
            _cell(s.get("compile"), "first_call_s", "{:.1f}"),
            _served(s.get("fastres")),
            _num(e.get("saved_bytes_vs_eager"), "{:.3f}x"),
            _traffic(e, "gb_per_step", "{:.3g}"), _traffic(e, "img_s_bound", None),
        ])
    return header, rows


def _traffic(entry: dict, key: str, fmt: str | None) -> str:
    """``120/95.5/71.2``: the paper traffic model's figure (:mod:`.traffic`) for eager (e),
    per-layer fused (l), block fused (b); train entries; "-" where the model or the bandwidth
    is missing."""
    designs = (entry.get("traffic") or {}).get("designs") or {}
    values = [(designs.get(d) or {}).get(key) for d in ("eager", "per_layer", "block")]
    if not any(v is not None for v in values):
        return "-"
    return "/".join(_rate(v) if fmt is None else _num(v, fmt) for v in values)


def _served(system: dict | None) -> str:
    """``triton 53+53``: per backend, the fused forward (+ backward) passes of one step."""
    per = (system or {}).get("served_per_step") or {}
    backends = sorted({b for counts in per.values() for b in counts})
    return ", ".join(
        b + " " + "+".join(str(per[d].get(b, 0)) for d in ("forward", "backward") if d in per)
        for b in backends
    ) or "-"


_SHORT = {"resnet50": "R50", "resnext50_32x4d": "RX50", "resnet18": "R18",
          "wide_resnet50_2": "WRN50", "preact_resnet50": "PA50"}


def layer_rows(results: dict) -> tuple[list[str], list[list[str]]]:
    systems: list[str] = []
    for e in results.get("layers", []):
        for k in e.get("systems", {}):
            if k not in systems:
                systems.append(k)
    header = ["layer", "mode", *[f"{k.replace('fastres-', 'fr-')} µs" for k in systems],
              "best", "vs eager", "vs compile", "best/conv", "bound µs", "best/bound"]
    rows = []
    for e in results.get("layers", []):
        s = e.get("systems", {})
        best = s.get(e.get("best_fastres", ""), {})
        rows.append([
            f"{_SHORT.get(e['model'], e['model'])} {e['label']} {e['epilogue']}", e["mode"],
            *[_us(s.get(k)) for k in systems],
            e.get("best_fastres", "-").removeprefix("fastres-"),
            _num(e.get("speedup_vs_eager"), "{:.2f}x"),
            _num(e.get("speedup_vs_compile-default"), "{:.2f}x"),
            _num(best.get("time_vs_cudnn_conv"), "{:.2f}"),
            _num(e["bound_s"] * 1e6 if "bound_s" in e else None, "{:,.1f}"),
            _num(best.get("frac_roofline"), "{:.1%}"),
        ])
    return header, rows


def layer_summary_rows(results: dict) -> tuple[list[str], list[list[str]]]:
    """Per model and mode: shapes measured, geometric-mean speed-up of the best fastres backend
    vs eager and vs compile, and the median fraction of the roofline bound it reaches."""
    header = ["model", "mode", "shapes", "geomean vs eager", "geomean vs compile",
              "median best/bound"]
    groups: dict[tuple[str, str], list[dict]] = {}
    for e in results.get("layers", []):
        groups.setdefault((e["model"], e["mode"]), []).append(e)
    rows = []
    def geomean(entries: list[dict], key: str) -> float | None:
        vals = [e[key] for e in entries if e.get(key)]
        return math.exp(sum(map(math.log, vals)) / len(vals)) if vals else None

    for (model, mode), entries in groups.items():
        fracs = sorted(e["systems"][e["best_fastres"]]["frac_roofline"] for e in entries
                       if e.get("best_fastres"))
        rows.append([
            model, mode, str(len(entries)),
            _num(geomean(entries, "speedup_vs_eager"), "{:.2f}x"),
            _num(geomean(entries, "speedup_vs_compile-default"), "{:.2f}x"),
            _num(statistics.median(fracs) if fracs else None, "{:.1%}"),
        ])
    return header, rows


def _ms(system: dict | None) -> str:
    if not system:
        return "-"
    if system.get("status") != "ok":
        return system.get("status", "?")
    return f"{system['ms_per_step']:.3g}"


def block_rows(results: dict) -> tuple[list[str], list[list[str]]]:
    """One row per block: ms per training step (forward + backward) of the block op, the same
    block layer by layer, eager (and compile), fastres's speed-ups, what served fastres's
    passes, the bytes kept for backward over eager, and the paper traffic bound of each design
    (eager / per-layer / block) at the measured bandwidth."""
    compiled = any("compile" in e.get("systems", {}) for e in results.get("blocks", []))
    header = ["block", "mode", "fastres ms", "fr-layer ms", "eager ms",
              *(["compile ms"] if compiled else []), "vs eager", "layer vs eager",
              "vs layer", "fastres served by", "saved/eager", "layer saved/eager",
              "bound ms e/l/b"]
    rows = []
    for e in results.get("blocks", []):
        s = e.get("systems", {})
        layer = s.get("fastres-layer") or {}
        rows.append([
            f"{_SHORT.get(e['model'], e['model'])} {e['label']}", e["mode"],
            _ms(s.get("fastres")), _ms(layer), _ms(s.get("eager")),
            *([_ms(s.get("compile"))] if compiled else []),
            _num(e.get("speedup_vs_eager"), "{:.2f}x"),
            _num(1 / layer["time_vs_eager"] if layer.get("time_vs_eager") else None,
                 "{:.2f}x"),
            _num(e.get("speedup_vs_fastres-layer"), "{:.2f}x"),
            _served_ops(s.get("fastres")),
            _num(e.get("saved_bytes_vs_eager"), "{:.3f}x"),
            _num(layer.get("saved_bytes_vs_eager"), "{:.3f}x"),
            _traffic(e, "bound_ms", "{:.3g}"),
        ])
    return header, rows


def _served_ops(system: dict | None) -> str:
    """``triton residual_block 1+1``: per backend and op, forward (+ backward) passes."""
    per = (system or {}).get("served_per_step") or {}
    keys = sorted({k for counts in per.values() for k in counts})
    return ", ".join(
        k + " " + "+".join(str(per[d].get(k, 0)) for d in ("forward", "backward") if d in per)
        for k in keys
    ) or "-"


def block_summary_rows(results: dict) -> tuple[list[str], list[list[str]]]:
    """Per model: blocks measured and the geometric-mean training-step speed-up of the block op
    over eager and over the same blocks layer by layer, and of the per-layer path over eager."""
    header = ["model", "blocks", "fastres vs eager", "layer-path vs eager", "fastres vs layer",
              "saved/eager"]
    groups: dict[str, list[dict]] = {}
    for e in results.get("blocks", []):
        groups.setdefault(e["model"], []).append(e)

    def geomean(vals: list) -> float | None:
        vals = [v for v in vals if v]
        return math.exp(sum(map(math.log, vals)) / len(vals)) if vals else None

    rows = []
    for model, entries in groups.items():
        layer = [(e["systems"].get("fastres-layer") or {}).get("time_vs_eager")
                 for e in entries]
        rows.append([
            model, str(len(entries)),
            _num(geomean([e.get("speedup_vs_eager") for e in entries]), "{:.2f}x"),
            _num(geomean([1 / t for t in layer if t]), "{:.2f}x"),
            _num(geomean([e.get("speedup_vs_fastres-layer") for e in entries]), "{:.2f}x"),
            _num(geomean([e.get("saved_bytes_vs_eager") for e in entries]), "{:.3f}x"),
        ])
    return header, rows


def block_headline(results: dict) -> str | None:
    """One line: the block step's ratios over every block measured (geometric means), or None
    when no block has a fastres and an eager time."""
    entries = [e for e in results.get("blocks", []) if e.get("speedup_vs_eager")]
    if not entries:
        return None

    def geomean(vals: list) -> float | None:
        vals = [v for v in vals if v]
        return math.exp(sum(map(math.log, vals)) / len(vals)) if vals else None

    layer = [(e["systems"].get("fastres-layer") or {}).get("time_vs_eager") for e in entries]
    vs_layer = geomean([e.get("speedup_vs_fastres-layer") for e in entries])
    layer_vs_eager = geomean([1 / t for t in layer if t])
    saved = geomean([e.get("saved_bytes_vs_eager") for e in entries])
    served = sorted({k for e in entries for k in ((e["systems"].get("fastres") or {}).get(
        "served_per_step") or {}).get("forward", {})})
    return (f"block step (forward + backward of one block; geometric mean of {len(entries)} "
            f"block{'s' if len(entries) > 1 else ''}, batch {entries[0].get('batch')}, "
            f"{entries[0].get('dtype')}): fastres block op "
            f"{_num(geomean([e['speedup_vs_eager'] for e in entries]), '{:.2f}x')} eager, "
            f"{_num(vs_layer, '{:.2f}x')} the same blocks layer by layer; layer by layer "
            f"{_num(layer_vs_eager, '{:.2f}x')} eager; saved for backward "
            f"{_num(saved, '{:.3f}x')} eager; fastres served by {', '.join(served) or '-'}")


def summary_text(results: dict) -> str:
    """Plain-text model table and layer summary (what a log's last lines should show)."""
    parts = []
    header, rows = model_rows(results)
    if rows:
        parts.append(render_table("Model level (img/s)", header, rows))
    header, rows = block_rows(results)
    if rows:
        parts.append(render_table("Block level (ms per training step of one block)", header,
                                  rows))
        parts.append(render_table("Block level summary (geometric means)",
                                  *block_summary_rows(results)))
        headline = block_headline(results)
        if headline:
            parts.append(headline)
    header, rows = layer_summary_rows(results)
    if rows:
        parts.append(render_table("Layer level (best fastres backend)", header, rows))
    ceil = results.get("ceilings") or {}
    if ceil:
        parts.append(f"ceilings on {ceil.get('device')}: {ceil.get('tflops', 0):.3g} TFLOP/s, "
                     f"{ceil.get('tbps', 0):.3g} TB/s")
    if results.get("note"):
        parts.append(f"NOTE: {results['note']}")
    return "\n\n".join(parts)


def _us(system: dict | None) -> str:
    if not system:
        return "-"
    if system.get("status") != "ok":
        return system.get("status", "?")
    return f"{system['median_s'] * 1e6:,.1f}"


def render_table(title: str, header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Plain-text table (monospace, right-aligned numbers)."""
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) if rows else len(str(h))
              for i, h in enumerate(header)]
    lines = [title, "  ".join(str(h).ljust(w) for h, w in zip(header, widths))]
    lines.append("  ".join("-" * w for w in widths))
    for row in rows:
        lines.append("  ".join(
            str(c).ljust(w) if i < 2 else str(c).rjust(w)
            for i, (c, w) in enumerate(zip(row, widths))
        ))
    return "\n".join(lines)


def print_report(results: dict, *, use_rich: bool = True) -> None:
    """Print the model table (and the layer table if layers were measured)."""
    tables = [("Model level (img/s)", *model_rows(results))]
    if results.get("blocks"):
        tables.append(("Block level (ms per training step of one block: forward + backward)",
                       *block_rows(results)))
    if results.get("layers"):
        tables.append(("Layer level (median µs per call)", *layer_rows(results)))
    console = None
    if use_rich:
        try:
            from rich.console import Console
            from rich.table import Table

            console = Console()
            if not console.is_terminal:  # a log file: no reason to squeeze columns into 80
                console = Console(width=200)
        except ImportError:
            console = None
    note = results.get("note")
    for title, header, rows in tables:
        if not rows:
            continue
        if console is not None:
            table = Table(title=title)
            for i, h in enumerate(header):
                # fold, never "…": a cut-off number is a wrong number
                table.add_column(h, justify="left" if i < 2 else "right", overflow="fold")
            for row in rows:
                table.add_row(*row)
            console.print(table)
        else:
            print(render_table(title, header, rows))
            print()
    ceil = results.get("ceilings") or {}
    if ceil:
        print(f"ceilings measured on {ceil.get('device')}: {ceil.get('tflops', 0):.3g} TFLOP/s "
              f"({ceil.get('dtype')} matmul), {ceil.get('tbps', 0):.3g} TB/s (device copy)")
    if note:
        print(f"NOTE: {note}")


def write_json(results: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=1, default=str))
    tmp.replace(path)  # a reader (or a killed run) never sees half a file
    return path


def write_plot(results: dict, path: Path) -> Path | None:
    """Bar chart: img/s per model and mode, fastres / eager / compile side by side.

    Returns None (and writes nothing) when matplotlib is missing or there is nothing to plot.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    entries = results.get("models", [])
    if not entries:
        return None
    systems = ["fastres", "eager", "compile"]
    labels = [f"{e['model']}\n{e['mode']}" for e in entries]
    width = 0.8 / len(systems)
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(entries) + 2), 4.5))
    for i, system in enumerate(systems):
        values = []
        for e in entries:
            s = e["systems"].get(system, {})
            values.append(s.get("img_s", 0.0) if s.get("status") == "ok" else 0.0)
        xs = [j + (i - (len(systems) - 1) / 2) * width for j in range(len(entries))]
        ax.bar(xs, values, width, label=system)
    roof = [e.get("roofline_img_s") for e in entries]
    if any(roof):
        ax.scatter(range(len(entries)), [r or float("nan") for r in roof], marker="_", s=400,
                   color="black", label="conv roofline bound", zorder=3)
        ax.set_yscale("log")
    ax.set_xticks(range(len(entries)), labels, fontsize=8)
    ax.set_ylabel("images / s")
    env = results.get("environment", {})
    card = (env.get("gpu") or {}).get("name", "CPU")
    cfg = results.get("config", {})
    title = f"fastres bench on {card}: batch {cfg.get('batch')}, {cfg.get('resolution')}px, " \
            f"{cfg.get('dtype')}"
    if results.get("cpu_only"):
        title += "\n(tiny CPU configuration: says nothing about GPU speed)"
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m fastres.benchmark.report RESULTS.json ...``: print each file's summary;
    ``--block-headline`` first: only the block step's one-line ratios (nothing if none)."""
    import sys

    paths = list(sys.argv[1:] if argv is None else argv)
    headline_only = bool(paths) and paths[0] == "--block-headline"
    for path in paths[1:] if headline_only else paths:
        try:
            results = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            print(f"{path}: cannot read ({e})")
            continue
        if headline_only:
            line = block_headline(results)
            if line:
                print(line)
            continue
        print(f"== {path}")
        print(summary_text(results))
        print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
