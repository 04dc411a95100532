"""PNG plots of the logged training curves, written to the output directory when training ends.

One figure, `training_curves.png`, with a panel per quantity a person checks first: the loss, the
reward margin and accuracy, and the share of tokens selection kept. Missing metrics (a TRL loss
logs no `selection/*`) leave their panel out. Uses matplotlib's Agg backend: no display needed.
"""

from __future__ import annotations

from pathlib import Path

from transformers import TrainerCallback

PANELS = (
    ("loss", ("loss", "eval_loss")),
    ("reward margin", ("rewards/margins", "eval_rewards/margins")),
    ("reward accuracy", ("rewards/accuracies", "eval_rewards/accuracies")),
    ("kept-token share", ("selection/kept_share_chosen", "selection/kept_share_rejected")),
)


def plot_training_curves(log_history: list[dict], path: str | Path) -> Path | None:
    """Draw the panels that `log_history` has data for into `path`; None if it has none."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []
    for title, keys in PANELS:
        series = {}
        for key in keys:
            points = [(entry["step"], entry[key]) for entry in log_history if key in entry and "step" in entry]
            if points:
                series[key] = points
        if series:
            panels.append((title, series))
    if not panels:
        return None
    figure, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for axis, (title, series) in zip(axes[0], panels):
        for key, points in series.items():
            steps, values = zip(*points)
            axis.plot(steps, values, marker="o" if len(points) < 30 else None, markersize=3, label=key.split("/")[-1])
        axis.set_title(title)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
        if len(series) > 1:
            axis.legend(fontsize=7)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


class PlotCurvesCallback(TrainerCallback):
    """Writes `training_curves.png` into `output_dir` at the end of training (main process only)."""

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            plot_training_curves(state.log_history, Path(args.output_dir) / "training_curves.png")
