"""The paper's scaling figures from a sweep's runs: FID against Gflops, FID against training compute,
FID over training, and the loss curves (paper Fig. 2, 6, 8, 9).

    python -m dit.plots multirun/scaling --out figs/             # local run folders
    python -m dit.plots multirun/s multirun/b --out figs/          # several sweeps together
    python -m dit.plots wandb:my-team/dit --out figs/              # the runs of a wandb project

Runs are read from their summaries (dit.evaluation.run_summaries). Each model is plotted at its final
FID, the last measurement; runs of one config with several seeds (`seed=0,1,2`) are one point, their
mean, with error bars or a band of ± one standard deviation. The digits' miniature sweep plots its
digits FD the same way (conf/experiment/scaling_digits.yaml).

Training compute is Gflops × batch × steps × 3, as paper Fig. 9: Gflops count one forward pass of
one image (a multiply-add = 1 flop), and the backward pass costs about twice the forward.
"""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files, no display: scripts, CI, notebooks alike
import matplotlib.pyplot as plt  # noqa: E402

from dit.errors import ArgumentParser, exit_on_usage_error  # noqa: E402
from dit.evaluation.run_summaries import aggregate, load_runs  # noqa: E402

__all__ = ["FIGURES", "load_runs", "save_figures"]


def patch_colours(points):
    """One colour per patch size, the same in every figure (paper Fig. 2 colours by patch too)."""
    patches = sorted({p["patch"] for p in points}, key=lambda x: (x is None, x))
    return {patch: f"C{i}" for i, patch in enumerate(patches)}


def legend(ax, size):
    """A legend where the figure has labelled lines (a sweep with no FID measured yet has none)."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=size)


def seeds_note(point):
    return f", {len(point['seeds'])} seeds" if len(point["seeds"]) > 1 else ""


def fid_vs_gflops(points, runs=None):
    """Paper Fig. 8: the final FID of each model against its Gflops, log x, coloured by patch."""
    fig, ax = plt.subplots(figsize=(5.5, 4))
    colours = patch_colours(points)
    for patch, colour in colours.items():
        mine = [p for p in points if p["patch"] == patch]
        ax.errorbar(
            [p["gflops"] for p in mine],
            [p["final"] for p in mine],
            yerr=[p["final_spread"] for p in mine],
            color=colour,
            marker="o",
            capsize=3,
            label=f"patch {patch}",
        )
        for p in mine:
            ax.annotate(
                f"{p['name']}, {p['final_step']} steps{seeds_note(p)}",
                (p["gflops"], p["final"]),
                textcoords="offset points",
                xytext=(4, 4),
                fontsize=7,
            )
    ax.margins(x=0.25)  # room for the labels
    metric = points[0]["metric_name"] if points else "FID"
    ax.set(
        xscale="log",
        xlabel="Transformer Gflops (forward pass, one image)",
        ylabel=metric,
        title=f"{metric} vs. model Gflops",
    )
    legend(ax, 8)
    return fig


def fid_vs_compute(points, runs=None):
    """Paper Fig. 9: FID against training compute, Gflops × batch × steps × 3, one curve per model."""
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for p in points:
        steps, means, _ = zip(*p["history"])
        ax.plot([p["gflops"] * p["batch"] * s * 3 for s in steps], means, marker="o", label=p["name"] + seeds_note(p))
    metric = points[0]["metric_name"] if points else "FID"
    ax.set(xscale="log", xlabel="training compute (Gflops)", ylabel=metric, title=f"{metric} vs. training compute")
    legend(ax, 7)
    return fig


def fid_vs_steps(points, runs=None):
    """Paper Fig. 6: FID over training steps, one curve per model, a band of ± one standard deviation
    over its seeds."""
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for p in points:
        steps, means, spreads = zip(*p["history"])
        (line,) = ax.plot(steps, means, marker="o", label=p["name"] + seeds_note(p))
        if len(p["seeds"]) > 1:
            low = [m - s for m, s in zip(means, spreads)]
            high = [m + s for m, s in zip(means, spreads)]
            ax.fill_between(steps, low, high, color=line.get_color(), alpha=0.2)
    metric = points[0]["metric_name"] if points else "FID"
    ax.set(xlabel="training steps", ylabel=metric, title=f"{metric} over training")
    legend(ax, 7)
    return fig


def loss_curves(points, runs):
    """The training loss (the objective's total) of every run against steps."""
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for run in (r for r in runs if r["loss"]):
        seed = f", seed {run['seed']}" if run["seed"] is not None else ""
        ax.plot(*zip(*run["loss"]), label=run["name"] + seed, linewidth=1)
    ax.set(yscale="log", xlabel="training steps", ylabel="training loss", title="Loss curves")
    legend(ax, 6)
    return fig


FIGURES = dict(
    fid_vs_gflops=fid_vs_gflops, fid_vs_compute=fid_vs_compute, fid_vs_steps=fid_vs_steps, loss_curves=loss_curves
)


def save_figures(runs, out_dir):
    """Draw every figure of `runs` (load_runs) and write it as `<out_dir>/<name>.png`; returns {name: path}."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    points = aggregate(runs)
    paths = {}
    for name, draw in FIGURES.items():
        fig = draw(points, runs)
        fig.tight_layout()
        paths[name] = out_dir / f"{name}.png"
        fig.savefig(paths[name], dpi=120)
        plt.close(fig)
    return paths


def describe(points):
    """One line per plotted point: model, Gflops, final FID (± spread over seeds) at its step, best."""
    for p in points:
        spread = f" ± {p['final_spread']:.2f} over seeds {p['seeds']}" if len(p["seeds"]) > 1 else ""
        yield (
            f"{p['name']:>22}  {p['gflops']:9.4f} Gflops  {p['metric_name']} {p['final']:.2f}{spread} at step "
            f"{p['final_step']} (best {p['best']:.2f})  compute {p['compute']:.3g} Gflops"
        )


def main(argv=None):
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sources", nargs="+", help="run or sweep folders, or wandb:<entity>/<project>")
    parser.add_argument("--out", default="figs", help="folder for the PNGs")
    args = parser.parse_args(argv)
    runs = load_runs(args.sources)
    for line in describe(aggregate(runs)):
        print(line)
    for path in save_figures(runs, args.out).values():
        print(path)
    return runs


if __name__ == "__main__":
    exit_on_usage_error(main)
