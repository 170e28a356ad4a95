"""PNG charts of eval loss, token accuracy and perplexity against steps (matplotlib, file I/O).

Draws the `reading.Series` of one or more jobs (a line with markers per job) and their zero-shot
baselines (dashed, flat). Called by `main` for `plot`. matplotlib is imported here only, with the
non-interactive Agg backend, so other commands do not pay for it.
"""

from __future__ import annotations

from pathlib import Path

from finetune_cli.reading import METRICS, Series

TITLES = {"loss": "Eval loss", "accuracy": "Token accuracy", "perplexity": "Perplexity"}


def write_png(series: list[Series], path: Path, *, title: str, metrics: tuple[str, ...] = METRICS) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 4), squeeze=False)
    for axis, metric in zip(axes[0], metrics, strict=True):
        for line in series:
            points = [(s, v) for s, v in zip(line.steps, line.values[metric], strict=True) if v is not None]
            if not points:
                continue
            steps, values = zip(*points, strict=True)
            if line.baseline:
                axis.plot(steps, values, linestyle="--", label=line.label)
            else:
                axis.plot(steps, values, marker="o", label=line.label)
        axis.set_title(TITLES[metric])
        axis.set_xlabel("step")
        axis.grid(True, alpha=0.3)
    axes[0][0].legend(fontsize="small")
    figure.suptitle(title)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
