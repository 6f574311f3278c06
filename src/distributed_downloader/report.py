"""`status --report`: a self-contained HTML page of plots, and the same plots as PNG files.

Plots from matplotlib (Agg, no screen): images/s over time, per-server progress, errors by
code, and the servers that bound the ETA. The PNGs sit beside the page (`NAME-*.png`); the page
embeds them too, so it can be mailed or archived alone.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

from distributed_downloader.errors import require_module
from distributed_downloader.storage import atomic_write_bytes, atomic_write_text

TOP_SERVERS = 20  # servers a plot names; more would not be readable in one figure


def _pyplot() -> Any:
    require_module("matplotlib", "report", "status --report")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(figure: Any) -> bytes:
    import io

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return buffer.getvalue()


def _speed_plot(plt: Any, status: dict[str, Any]) -> tuple[Any, str | None]:
    figure, axes = plt.subplots(figsize=(8, 3))
    history = status["history"]
    points = []
    for before, after in zip(history, history[1:]):
        stored = after.get("successes", 0) - before.get("successes", 0)
        if after["time"] > before["time"] and stored >= 0 and before.get("running", True):
            points.append((after["time"], stored / (after["time"] - before["time"])))
    axes.set_title("download speed (images stored)")
    if not points:
        return _nothing(figure, axes, "no speed yet: a fetch writes a point every 5 s")
    start = points[0][0]
    axes.plot([(t - start) / 60 for t, _ in points], [v for _, v in points])
    axes.set_xlabel("minutes since the first fetch")
    axes.set_ylabel("images/s")
    return figure, None


def _nothing(figure: Any, axes: Any, why: str) -> tuple[Any, str]:
    """A plot without data says why, rather than showing empty axes."""
    axes.text(0.5, 0.5, why, ha="center", va="center", transform=axes.transAxes)
    axes.set_axis_off()
    return figure, why


def _servers_plot(plt: Any, status: dict[str, Any]) -> tuple[Any, str | None]:
    servers = sorted(status["all_servers"], key=lambda s: -s["rows"])[:TOP_SERVERS]
    figure, axes = plt.subplots(figsize=(8, 0.35 * len(servers) + 1))
    if not servers:
        return _nothing(figure, axes, "no server prepared")
    names = [s["server"] for s in servers][::-1]
    axes.barh(names, [s["rows"] for s in servers][::-1], color="#dddddd", label="rows")
    axes.barh(names, [s["done"] for s in servers][::-1], color="#3b7dd8", label="done")
    axes.set_xlabel("rows")
    axes.set_title(f"progress of the {len(servers)} largest servers")
    axes.legend(loc="lower right")
    return figure, None


def _errors_plot(plt: Any, status: dict[str, Any]) -> tuple[Any, str | None]:
    codes = status["errors_by_code"]
    figure, axes = plt.subplots(figsize=(8, 0.35 * max(1, len(codes)) + 1))
    axes.set_title(f"errors by code ({status['errors']:,} in all)")
    if not codes:
        return _nothing(figure, axes, "no error so far")
    axes.barh(list(codes)[::-1], list(codes.values())[::-1], color="#d8573b")
    axes.set_xlabel("rows")
    return figure, None


def _bound_plot(plt: Any, status: dict[str, Any]) -> tuple[Any, str | None]:
    servers = sorted((s for s in status["all_servers"] if s["remaining_seconds"]),
                     key=lambda s: -s["remaining_seconds"])[:10]
    figure, axes = plt.subplots(figsize=(8, 0.35 * max(1, len(servers)) + 1))
    axes.set_title("servers that bound the ETA")
    if not servers:
        return _nothing(figure, axes, "nothing left to fetch" if status["done"] >= status["rows"]
                        else "no server rate known yet (run profile or fetch)")
    axes.barh([s["server"] for s in servers][::-1],
              [s["remaining_seconds"] / 3600 for s in servers][::-1], color="#8a5bd8")
    axes.set_xlabel("hours left at the current rate")
    return figure, None


def write_report(status: dict[str, Any], path: Path) -> list[Path]:
    """Write the page and its PNGs; returns every file written."""
    plt = _pyplot()
    plots = {"speed": _speed_plot, "servers": _servers_plot, "errors": _errors_plot,
             "bound": _bound_plot}
    written, images = [], []
    for name, draw in plots.items():
        figure, why_empty = draw(plt, status)
        data = _png(figure)
        plt.close(figure)
        png = path.with_name(f"{path.stem}-{name}.png")
        atomic_write_bytes(png, data)
        written.append(png)
        caption = f"<p>{html.escape(why_empty)}</p>" if why_empty else ""
        images.append(f'<img alt="{name}" src="data:image/png;base64,'
                      f'{base64.b64encode(data).decode()}">{caption}')
    share = status["done"] / status["rows"] if status["rows"] else 1.0
    facts = [
        ("phase", status["phase"]),
        ("rows done", f"{status['done']:,} / {status['rows']:,} ({share:.1%})"),
        ("successes", f"{status['successes']:,}"),
        ("errors", f"{status['errors']:,}"),
        ("batches done", f"{status['batches_done']:,} / {status['batches']:,}"),
        ("images/s (last minutes)", f"{status['images_per_second']:.1f}"),
        ("ETA", "—" if status["eta_seconds"] is None else f"{status['eta_seconds'] / 3600:.1f} h"),
        ("bound by", status["bound_by"] or "—"),
    ]
    reused = status.get("reused") or {}
    if reused.get("previous"):
        facts.append(("reused from earlier downloads",
                      f"{reused['rows']:,} rows (images or final errors), not requested "
                      f"({', '.join(reused['previous'])})"))
        facts += [(f"URLs {kind.replace('_', ' ')}", f"{count:,}")
                  for kind, count in (reused.get("overlap") or {}).items()]
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>"
                   for k, v in facts)
    page = (f"<!doctype html><meta charset='utf-8'><title>distributed-downloader: "
            f"{html.escape(status['output'])}</title><style>body{{font-family:sans-serif;"
            f"max-width:60em;margin:2em auto}}th{{text-align:left;padding-right:2em}}"
            f"img{{max-width:100%;display:block;margin:1.5em 0}}</style>"
            f"<h1>{html.escape(status['output'])}</h1><table>{rows}</table>{''.join(images)}")
    atomic_write_text(path, page)
    return [path, *written]
