"""``trajectory.png``: perplexity against units removed, parameter count on a second axis."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any


def plot_trajectory(rows: Sequence[dict[str, Any]], path: str | os.PathLike[str], title: str | None = None) -> None:
    """Draw the search trajectory (rows as in ``SearchResult.trajectory``) to a PNG file."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed; safe in tests and on servers
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    steps = [r["step"] for r in rows]
    ppl = [r["ppl"] for r in rows]
    params = [r["params"] / 1e6 for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    try:
        ax.plot(steps, ppl, "o-", color="tab:red", label="perplexity")
        ax.set_xlabel("units removed")
        ax.set_ylabel("calibration perplexity", color="tab:red")
        if ppl and max(ppl) / max(min(ppl), 1e-9) > 50:
            ax.set_yscale("log")
        ax.tick_params(axis="y", labelcolor="tab:red")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax2 = ax.twinx()
        ax2.plot(steps, params, "s--", color="tab:blue", label="parameters")
        ax2.set_ylabel("parameters (M)", color="tab:blue")
        ax2.tick_params(axis="y", labelcolor="tab:blue")
        for r in rows[1:]:
            ax.annotate(str(r["unit"]), (r["step"], r["ppl"]), fontsize=6, rotation=45,
                        xytext=(2, 4), textcoords="offset points")
        ax.set_title(title or "Mamba-Shedder search")
        fig.tight_layout()
        tmp = f"{os.fspath(path)}.tmp.png"
        fig.savefig(tmp, format="png")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
