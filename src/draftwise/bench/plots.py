"""PNG plots of a benchmark (matplotlib, Agg backend): speedup by category and method,
and acceptance by draft position."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from draftwise.bench.methods import PLAIN


def write_plots(data: dict[str, Any], out_dir: Path) -> list[str]:
    """Write speedup.png and acceptance.png into out_dir; return their file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    others = [m["label"] for m in data["methods"]
              if m["label"] != PLAIN and data["results"][m["label"]]["overall"]["questions"]]
    cats = [*data["categories"], "overall"]
    title = f"{data['settings']['model']} ({data['settings']['dtype']}), {data['machine']['gpu'] or data['machine']['cpu']}"

    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(cats) * max(1, len(others)) ** 0.5 + 2), 4.2))
    width = 0.8 / max(1, len(others))
    for i, label in enumerate(others):
        res = data["results"][label]
        rows = [*(res["categories"][c] for c in data["categories"]), res["overall"]]
        values = [r["speedup"] or 0.0 for r in rows]
        ax.bar([x + (i - (len(others) - 1) / 2) * width for x in range(len(cats))], values, width, label=label)
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    ax.set_xticks(range(len(cats)), cats, rotation=20, ha="right")
    ax.set_ylabel("speedup over plain decoding (x)")
    ax.set_title(f"Speedup by category\n{title}", fontsize=9)
    if others:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "speedup.png", dpi=110)
    plt.close(fig)
    written.append("speedup.png")

    fig, ax = plt.subplots(figsize=(6.0, 4.0))
    for label in others:
        acc = data["results"][label]["overall"]["acceptance_per_position"]
        if acc:
            ax.plot(range(1, len(acc) + 1), acc, marker="o", label=label)
    ax.set_xlabel("draft position")
    ax.set_ylabel("acceptance (share accepted at that position)")
    ax.set_ylim(0.0, 1.05)
    ax.set_title(f"Acceptance by draft position\n{title}", fontsize=9)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "acceptance.png", dpi=110)
    plt.close(fig)
    written.append("acceptance.png")
    return written
