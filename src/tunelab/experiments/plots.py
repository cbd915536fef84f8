"""Plot helpers shared by the report sections: a PNG from a drawing function, honest score axes.

Quality axes start at 0 (or at the untuned baseline, drawn as a line) and say which score they show:
a 0.0002 difference must not look like a gap.
"""

from __future__ import annotations

import io
import math
import statistics


def figure_png(draw, width: float = 6.4, height: float = 4.0, figure_level: bool = False) -> bytes:
    """Render ``draw(axis)`` (or ``draw(figure)`` with ``figure_level``) to PNG bytes with Agg."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure = plt.figure(figsize=(width, height), dpi=110)
    if figure_level:
        draw(figure)
    else:
        draw(figure.add_subplot(1, 1, 1))
        figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", bbox_inches="tight")
    plt.close(figure)
    return buffer.getvalue()


def score_axis(axis, values: list[float], label: str = "held-out score", baseline: float | None = None) -> None:
    """Start the quality axis at 0 and end it just above the best value (1.0 for scores in [0, 1])."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    top = max(finite, default=1.0)
    upper = 1.0 if 0.0 <= top <= 1.0 else top * 1.1
    axis.set_ylim(0.0, upper if upper > 0 else 1.0)
    axis.set_ylabel(label)
    if baseline is not None and math.isfinite(baseline):
        axis.axhline(baseline, color="grey", linestyle="--", linewidth=1, label=f"untuned baseline ({baseline:.3f})")


T_975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042]


def ci95(values: list[float]) -> float:
    """Half-width of the 95% confidence interval of the mean (Student's t, n-1 degrees of freedom)."""
    n = len(values)
    if n < 2:
        return 0.0
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    t = T_975[n - 2] if n - 2 < len(T_975) else 1.96
    return t * std / math.sqrt(n)


def mean_or_none(values: list) -> float | None:
    """Mean of the values that are not None; None when none is."""
    present = [v for v in values if v is not None]
    return statistics.fmean(present) if present else None


def point_colors(count: int) -> list:
    """A distinct colour for each of ``count`` markers (tab10, or tab20 beyond ten; repeats past twenty)."""
    import matplotlib

    palette = matplotlib.colormaps["tab10" if count <= 10 else "tab20"].colors
    return [palette[i % len(palette)] for i in range(count)]


def legend_beside(axis) -> None:
    """The legend right of the axes, not over the points (a dozen cells would hide some)."""
    axis.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
