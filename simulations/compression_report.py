"""Bytes up against accuracy, one row per compression mode (issue #13's evidence).

    python -m simulations.compression_report ROOT [--out DIR]

``ROOT/<mode>/<preset>/fml-seed<N>/`` as ``simulations/compression/run.sh`` writes it (or
the JSON copied from there). Writes ``compression.md`` (the table) and ``compression.png``
(accuracy against bytes per round, mean ± std over seeds) into ``--out`` (default
``ROOT/report``). Each mode is compared with the ``none`` rows of the same seeds.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Any

from simulations.runs import load_runs, mean_std, pyplot, save_figure, series

Run = dict[str, Any]


def mode_label(config: dict[str, Any]) -> str:
    """A mode as the run config set it: ``topk 5 %``, ``svd 0.95``, ``int8``."""
    mode = config.get("compression", "none")
    if mode == "topk":
        mode = f"topk {100 * config.get('compression-ratio', 0.1):g} %"
    elif mode == "svd":
        mode = f"svd {config.get('compression-energy', 0.95):g}"
    down = config.get("compression-down", "none")
    return mode if down == "none" else f"{mode}, {down} down"


def _final(run: Run, key: str) -> float:
    values = series(run["records"], key)
    return values[-1] if values else float("nan")


def bytes_up(run: Run, key: str = "bytes_up") -> float:
    """Bytes all clients sent up (or ``bytes_down``) per round, mean over the rounds."""
    return statistics.mean(r[key] for r in run["records"])


def summarise(modes: dict[str, list[Run]]) -> list[dict[str, Any]]:
    """Per mode: seeds, mean bytes up per round, the factor against ``none`` and the final
    private / meme accuracies with their change against ``none`` on the same seeds
    (in points); rows by falling bytes."""
    base = {r["seed"]: r for runs in modes.values() for r in runs
            if r["config"].get("compression", "none") == "none"}
    rows = []
    for runs in modes.values():
        seeds = sorted(r["seed"] for r in runs)
        paired = [r for r in runs if r["seed"] in base]

        def delta(key: str, paired: list[Run] = paired) -> float | None:
            if not paired:
                return None
            return 100 * statistics.mean(_final(r, key) - _final(base[r["seed"]], key)
                                         for r in paired)

        up = statistics.mean(bytes_up(r) for r in runs)
        ref = statistics.mean(bytes_up(base[r["seed"]]) for r in paired) if paired else None
        rows.append({
            "mode": mode_label(runs[0]["config"]), "seeds": seeds, "bytes_up": up,
            "bytes_down": statistics.mean(bytes_up(r, "bytes_down") for r in runs),
            "factor": ref / up if ref else None,
            "private": [_final(r, "local_accuracy") for r in runs],
            "meme": [_final(r, "central_meme_accuracy") for r in runs],
            "meme_personal": [_final(r, "meme_accuracy") for r in runs],
            "d_private": delta("local_accuracy"), "d_meme": delta("central_meme_accuracy")})
    return sorted(rows, key=lambda row: -row["bytes_up"])


def _pts(value: float | None) -> str:
    return "–" if value is None else f"{value:+.2f}"


def table(rows: list[dict[str, Any]]) -> str:
    """The Markdown table of :func:`summarise`'s rows."""
    out = ["| mode | seeds | MB up / round | fewer bytes up | MB down / round | private "
           "model (%) | Δ private (pts) | meme, central (%) | Δ meme (pts) | meme, "
           "personalised (%) |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        factor = "–" if r["factor"] is None else f"{r['factor']:.1f}x"
        out.append(f"| {r['mode']} | {','.join(map(str, r['seeds']))} | "
                   f"{r['bytes_up'] / 1e6:.2f} | {factor} | {r['bytes_down'] / 1e6:.2f} | "
                   f"{mean_std(r['private'])} | "
                   f"{_pts(r['d_private'])} | {mean_std(r['meme'])} | {_pts(r['d_meme'])} | "
                   f"{mean_std(r['meme_personal'])} |")
    return "\n".join(out) + "\n"


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Final accuracy (mean ± std over seeds) against MB up per round, log scale."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for key, label, marker in (("private", "private model", "o"),
                               ("meme", "meme (central test set)", "s")):
        xs = [r["bytes_up"] / 1e6 for r in rows]
        ys = [100 * statistics.mean(r[key]) for r in rows]
        es = [100 * statistics.stdev(r[key]) if len(r[key]) > 1 else 0 for r in rows]
        ax.errorbar(xs, ys, yerr=es, fmt=marker, capsize=3, label=label)
        for x, y, r in zip(xs, ys, rows, strict=True):
            ax.annotate(r["mode"], (x, y), textcoords="offset points", xytext=(4, 4),
                        fontsize=8)
    ax.set_xscale("log")
    from matplotlib.ticker import FormatStrFormatter

    for axis_format in (ax.xaxis.set_major_formatter, ax.xaxis.set_minor_formatter):
        axis_format(FormatStrFormatter("%g"))  # 2, 3, 10 rather than 2x10^0
    ax.set_xlabel("MB sent up per round (all clients)")
    ax.set_ylabel("final accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, path)


def load_modes(root: Path) -> dict[str, list[Run]]:
    """``{mode folder: [fml run, ...]}`` for every mode folder with finished runs."""
    modes = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and p.name != "report"):
        try:
            found = load_runs(folder)
        except SystemExit:  # nothing finished in this mode yet
            continue
        runs = [r for algos in found.values() for rs in algos.values() for r in rs
                if r["config"].get("algorithm") == "fml"]
        if runs:
            modes[folder.name] = runs
    if not modes:
        raise SystemExit(f"no finished runs under {root} (expected <mode>/<preset>/fml-seed<N>/)")
    return modes


def main() -> None:
    """Entry point: ``python -m simulations.compression_report``."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("root", type=Path)
    p.add_argument("--out", type=Path)
    a = p.parse_args()
    out = a.out or a.root / "report"
    out.mkdir(parents=True, exist_ok=True)
    rows = summarise(load_modes(a.root))
    text = table(rows)
    (out / "compression.md").write_text(text)
    plot(rows, out / "compression.png")
    print(text, end="")
    print(f"wrote {out / 'compression.md'} and {out / 'compression.png'}")


if __name__ == "__main__":
    main()
