"""Loss study: train the bundle once per loss preset and seed under identical settings, evaluate, tabulate, plot.

Run as ``python -m scripts.study --dataset_dir DIR --losses all --iterations 200 --seeds 2 --out docs/study``
(or ``--budget-minutes M``: the wall-clock budget of the whole study, split evenly over its runs). Every
(loss, seed) run trains through ``configs/train.json`` merged with ``configs/losses/<loss>.json`` and is evaluated
with ``configs/evaluate.json``, in a fresh child process so that its peak memory is its own. A run writes
``<out>/runs/<loss>/seed<k>/result.json`` last; a later invocation skips runs that have one (resuming).

Outputs under ``--out``: ``results.csv`` and ``results.md`` (mean and spread over seeds), ``curves.md`` (validation
Dice against iterations, mean over seeds), ``commands.md``, and,
when matplotlib is importable, ``val_dice_curves.png``, ``organ_dice_heatmap.png``, ``small_organ_dice.png``
(the headline: small-organ and mean Dice per loss), ``axial_slices.png`` and, for runs that recorded it,
``small_organ_dice_curves.png`` (small-organ Dice against iterations, a band over seeds).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

BUNDLE_ROOT = Path(__file__).resolve().parents[1]
CONFIGS = BUNDLE_ROOT / "configs"
SMALL_ORGANS = (
    "gallbladder",
    "esophagus",
    "right adrenal gland",
    "left adrenal gland",
    "pancreas",
    "portal and splenic veins",
)
# validations per run when --val-points is not given: enough points for a curve, few enough to stay cheap
DEFAULT_VAL_POINTS = 5
# small-organ Dice levels whose iteration of first reaching curves.md lists per seed
REACH_THRESHOLDS = (0.5, 0.6, 0.7)
PLOTS = ("val_dice_curves.png", "organ_dice_heatmap.png", "small_organ_dice.png", "axial_slices.png")


def available_losses() -> list[str]:
    return sorted(p.stem for p in (CONFIGS / "losses").glob("*.json"))


def parse_losses(spec: str) -> list[str]:
    known = available_losses()
    if spec == "all":
        return known
    names = [n.strip() for n in spec.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if not names or unknown:
        raise ValueError(f"--losses must be 'all' or a comma list of {known}, got {spec!r}.")
    return names


def _overrides(args: argparse.Namespace) -> dict:
    settings = {}
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set expects KEY=JSON_VALUE, got {item!r}.")
        settings[key] = json.loads(value)
    return settings


def _workflow(files: list[str], settings: dict):
    from monai.bundle import ConfigWorkflow

    workflow = ConfigWorkflow(
        config_file=files,
        meta_file=str(CONFIGS / "metadata.json"),
        logging_file=str(CONFIGS / "logging.conf"),
        workflow_type="train",
        **settings,
    )
    workflow.initialize()
    return workflow


def run_single(
    loss: str,
    seed: int,
    dataset_dir: Path,
    run_dir: Path,
    iterations: int | None,
    budget_s: float | None,
    val_points: int,
    extra: dict,
    max_iterations_cap: int = 100_000,
) -> dict:
    """Train and evaluate one (loss, seed); write and return ``run_dir/result.json``."""
    import torch
    from ignite.engine import Events

    # one iteration per "epoch" so that iterations, validation interval and the cosine schedule share one unit
    # under a wall-clock budget the cosine schedule spans --max-iterations, so the learning rate barely decays
    max_iterations = iterations if iterations is not None else max_iterations_cap
    files = [str(CONFIGS / "train.json"), str(CONFIGS / "losses" / f"{loss}.json")]
    settings = {
        "bundle_root": str(BUNDLE_ROOT),
        "dataset_dir": str(dataset_dir),
        "generate_phantom": False,
        "output_dir": str(run_dir / "train"),
        "ckpt_dir": str(run_dir / "models"),
        "epochs": max_iterations,
        "train#trainer#epoch_length": 1,
        "val_interval": max(1, max_iterations // max(1, val_points)) if budget_s is None else max_iterations,
        "initialize": [
            f"$monai.utils.set_determinism(seed={int(seed)})",
            "$scripts.training.check_loss_target(@loss_target)",
        ],
        **extra,
    }
    workflow = _workflow(files, settings)
    trainer, evaluator = workflow.trainer, workflow.evaluator
    curve: list[tuple[int, float]] = []
    small_organ_curve: list[tuple[int, float]] = []
    organ_counts = workflow.parser.get_parsed_content("validate#organ_counts")
    organs = dict(zip(organ_counts.organ_names, organ_counts.organ_keys))  # name -> its key in the metrics
    timing = {"validation_s": 0.0}

    def record_validation(engine):
        # the evaluator's own key metric (validate#key_metric in train.json), whatever the config names it
        name = engine.state.key_metric_name
        curve.append((trainer.state.iteration, float(engine.state.metrics[name])))
        per_organ = {o: float(engine.state.metrics.get(f"{name}/{k}", math.nan)) for o, k in organs.items()}
        small_organ_curve.append((trainer.state.iteration, small_organ_dice(per_organ)))
        timing["validation_s"] += time.perf_counter() - timing.pop("val_start")

    evaluator.add_event_handler(Events.STARTED, lambda _: timing.__setitem__("val_start", time.perf_counter()))
    evaluator.add_event_handler(Events.COMPLETED, record_validation)
    if budget_s is not None:
        # the iteration count is unknown in advance: validate every budget/val_points seconds of training instead
        start_budget = time.perf_counter()
        next_validation = [budget_s / max(1, val_points)]

        def on_time(engine):
            trained = time.perf_counter() - start_budget - timing["validation_s"]
            if trained >= next_validation[0]:
                next_validation[0] += budget_s / max(1, val_points)
                evaluator.run()
            if trained >= budget_s:
                engine.terminate()

        trainer.add_event_handler(Events.ITERATION_COMPLETED, on_time)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    workflow.run()
    train_s = time.perf_counter() - start - timing["validation_s"]
    if not curve or curve[-1][0] != trainer.state.iteration:
        evaluator.run()  # the last weights must be validated too (and checkpointed if best)
    n_iter = trainer.state.iteration
    workflow.finalize()
    if torch.cuda.is_available():
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:  # ru_maxrss is in KiB on Linux
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    eval_dir = run_dir / "eval"
    evaluation = _workflow(
        [*files, str(CONFIGS / "evaluate.json")],
        {**settings, "output_dir": str(eval_dir), "validate#postprocessing#transforms#3#_disabled_": False},
    )
    evaluation.run()
    evaluation.finalize()
    with open(eval_dir / "organ_metrics_summary.csv") as f:
        rows = {r["organ"]: r for r in csv.DictReader(f)}
    result = {
        "loss": loss,
        "seed": seed,
        "iterations": n_iter,
        "s_per_iteration": train_s / max(1, n_iter),
        "peak_memory_mb": peak_mb,
        "memory_kind": "cuda_allocated" if torch.cuda.is_available() else "cpu_maxrss",
        "curve": curve,
        "small_organ_curve": small_organ_curve,
        "dice": {o: float(r["dice"]) for o, r in rows.items() if o != "mean"},
        "iou": {o: float(r["iou"]) for o, r in rows.items() if o != "mean"},
        "mean_dice": float(rows["mean"]["dice"]),
        "mean_iou": float(rows["mean"]["iou"]),
        # relative to run_dir, so that a moved or cloned study still finds them
        "predictions": sorted(str(p.relative_to(run_dir)) for p in eval_dir.rglob("*.nii.gz")),
    }
    (run_dir / "result.json").write_text(json.dumps(result, indent=1))
    return result


def _mean_spread(values: list[float]) -> tuple[float, float]:
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return math.nan, math.nan
    return statistics.fmean(finite), (statistics.stdev(finite) if len(finite) > 1 else 0.0)


def small_organ_dice(dice: dict[str, float]) -> float:
    """Mean Dice over the ``SMALL_ORGANS`` that the validation cases hold (an organ absent from every case has
    NaN Dice and is left out, so a dataset without, say, an esophagus is not scored 0 on it); NaN if none."""
    present = [dice[o] for o in SMALL_ORGANS if not math.isnan(dice.get(o, math.nan))]
    return statistics.fmean(present) if present else math.nan


def summarise(results: dict[str, list[dict]]) -> tuple[list[str], list[dict]]:
    """Per-loss rows of ``(mean, spread)`` pairs over seeds; columns in table order."""
    organs = list(next(iter(results.values()))[0]["dice"])
    columns = [
        *(f"dice_{o}" for o in organs),
        "mean_dice",
        "mean_iou",
        "small_organ_dice",
        "s_per_iteration",
        "peak_memory_mb",
    ]
    table = []
    for loss, runs in results.items():
        row = {"loss": loss, "seeds": len(runs)}
        for o in organs:
            row[f"dice_{o}"] = _mean_spread([r["dice"][o] for r in runs])
        row["small_organ_dice"] = _mean_spread([small_organ_dice(r["dice"]) for r in runs])
        for key in ("mean_dice", "mean_iou", "s_per_iteration", "peak_memory_mb"):
            row[key] = _mean_spread([r[key] for r in runs])
        table.append(row)
    return columns, table


def write_tables(out: Path, columns: list[str], table: list[dict]) -> None:
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["loss", "seeds", *(f"{c}{s}" for c in columns for s in ("", "_spread"))])
        for row in table:
            writer.writerow([row["loss"], row["seeds"], *(f"{v:.6g}" for c in columns for v in row[c])])
    header = ["loss", *(c.replace("dice_", "") if c.startswith("dice_") else c for c in columns)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in table:
        cells = ["—" if math.isnan(row[c][0]) else f"{row[c][0]:.3f} ± {row[c][1]:.3f}" for c in columns]
        lines.append(f"| {row['loss']} | " + " | ".join(cells) + " |")
    note = (
        "Mean ± sample standard deviation over seeds (± 0 with one seed). — : the organ is in no validation "
        "case. small_organ_dice: mean Dice over those of " + ", ".join(SMALL_ORGANS) + " that the validation "
        "cases hold. peak_memory_mb: peak RSS of the run's process on CPU, "
        "torch.cuda.max_memory_allocated on CUDA."
    )
    (out / "results.md").write_text("\n".join(lines) + "\n\n" + note + "\n")


def write_curve_table(out: Path, results: dict[str, list[dict]]) -> None:
    """``curves.md``: validation mean Dice and small-organ Dice against iterations, the mean over seeds at every
    iteration all of a loss' seeds validated: which loss leads at which budget, as numbers."""
    sections = []
    for key, title in (("curve", "validation mean Dice"), ("small_organ_curve", "validation small-organ Dice")):
        curves = {loss: [dict(run.get(key) or []) for run in runs] for loss, runs in results.items()}
        its = sorted({it for values in curves.values() for v in values for it in v})
        lines = [
            f"### {title}",
            "",
            "| loss | seeds | " + " | ".join(map(str, its)) + " |",
            "|---|---:" + "|---:" * len(its) + "|",
        ]
        for loss, values in curves.items():
            cells = [
                f"{statistics.fmean(v[it] for v in values):.3f}" if values and all(it in v for v in values) else ""
                for it in its
            ]
            lines.append(f"| {loss} | {len(values)} | " + " | ".join(cells) + " |")
        sections.append("\n".join(lines))
    note = "Mean over the seeds; an empty cell: not every seed of that loss validated at that iteration."
    if any(run.get("small_organ_curve") for runs in results.values() for run in runs):
        sections.append(_reach_section(results))
        note += (
            " Iterations until a Dice is first reached: one number per seed, in seed order; — : not reached; n/a: "
            "a run without a recorded small-organ curve."
        )
    (out / "curves.md").write_text("# Validation against iterations\n\n" + "\n\n".join(sections) + "\n\n" + note + "\n")


def first_reaching(curve: list, threshold: float) -> int | None:
    """The first validated iteration of ``curve`` (``[iteration, Dice]`` pairs) at which Dice >= ``threshold``."""
    return next((it for it, value in sorted(curve) if value >= threshold), None)


def _reached(curve: list | None, threshold: float) -> str:
    if not curve:
        return "n/a"  # a run made before the runner recorded small-organ curves
    reached = first_reaching(curve, threshold)
    return "—" if reached is None else str(reached)


def _reach_section(results: dict[str, list[dict]]) -> str:
    """Per loss and seed, the iterations a run needed to reach each of ``REACH_THRESHOLDS`` in small-organ Dice:
    the budget a user must give a loss, per seed so that a lucky seed does not hide a slow loss."""
    lines = [
        "### iterations until the validation small-organ Dice first reaches",
        "",
        "| loss | seeds | " + " | ".join(f">= {t}" for t in REACH_THRESHOLDS) + " |",
        "|---|---:" + "|---:" * len(REACH_THRESHOLDS) + "|",
    ]
    for loss, runs in results.items():
        cells = [", ".join(_reached(run.get("small_organ_curve"), t) for run in runs) for t in REACH_THRESHOLDS]
        lines.append(f"| {loss} | {len(runs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_commands(out: Path, argv: list[str], finished: tuple[int, int]) -> None:
    import monai
    import torch

    try:
        commit = subprocess.run(
            ["git", "-C", str(BUNDLE_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, check=False
        ).stdout.strip()
    except OSError:
        commit = "unknown"
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    text = f"""# How these results were made

```
python -m scripts.study {shlex.join(argv)}
```

- bundle commit: {commit or "unknown"}
- python {platform.python_version()}, torch {torch.__version__}, monai {monai.__version__}
- machine: {platform.platform()}, {platform.processor() or platform.machine()}, {device}
- torch threads: {torch.get_num_threads()}
- runs finished: {finished[0]} of {finished[1]}
"""
    (out / "commands.md").write_text(text)


def _axial_slices(results: dict[str, list[dict]], dataset_dir: Path, out: Path):
    """(ground truth, {loss: prediction}, [losses whose prediction is missing]) of the axial slice with most
    organs of the first validation case."""
    import nibabel as nib
    import numpy as np

    from scripts.data import load_datalist

    case = load_datalist(dataset_dir, "validation")[0]
    label = np.asarray(nib.load(case["label"]).dataobj).squeeze()
    z = int(np.argmax([len(np.unique(label[..., k])) for k in range(label.shape[-1])]))
    stem = Path(case["image"]).name.split(".")[0]
    preds, missing = {}, []
    for loss, runs in results.items():
        recorded = next((p for p in runs[0]["predictions"] if Path(p).name.startswith(stem)), None)
        path = None if recorded is None else out / "runs" / loss / f"seed{runs[0]['seed']}" / recorded
        if path is None or not path.is_file():  # predictions are not committed
            missing.append(loss)
        else:
            preds[loss] = np.asarray(nib.load(path).dataobj).squeeze()[..., z]
    return label[..., z], preds, missing


def _headline_chart(path: Path, table: list[dict], dataset_name: str, plt, np) -> None:
    """Small-organ mean Dice and mean Dice per loss, best small-organ loss on top, whiskers = sd over seeds."""
    rows = sorted(table, key=lambda r: -1.0 if math.isnan(r["small_organ_dice"][0]) else r["small_organ_dice"][0])
    y = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(7, 1.4 + 0.42 * len(rows)))
    for offset, key, label, colour in (
        (0.2, "small_organ_dice", "small organs", "C3"),
        (-0.2, "mean_dice", "all organs", "C0"),
    ):
        means, spreads = [r[key][0] for r in rows], [r[key][1] for r in rows]
        ax.barh(
            y + offset,
            means,
            height=0.4,
            xerr=spreads,
            color=colour,
            label=label,
            error_kw={"elinewidth": 0.8, "capsize": 2},
        )
        for k, (v, sd) in enumerate(zip(means, spreads)):
            if not math.isnan(v):  # the value right of its whisker
                ax.text(v + sd + 0.015, y[k] + offset, f"{v:.2f}", va="center", fontsize=7)
    seeds = max(r["seeds"] for r in rows)
    ax.set_yticks(y, [r["loss"] for r in rows], fontsize=8)
    ax.set_xlim(0, 1.08)
    ax.set(
        xlabel="validation Dice (mean" + (f" ± sd over {seeds} seeds)" if seeds > 1 else ", one seed)"),
        title=f"{dataset_name}: Dice per loss (best on small organs on top)",
    )
    ax.title.set_fontsize(9)
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _small_organ_curves(path: Path, results: dict[str, list[dict]], plt, np) -> None:
    """Small-organ Dice against iterations: per loss the mean over seeds, and a band from the lowest to the highest
    seed, so that a loss that wins early and one that wins for good look different."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for index, (loss, runs) in enumerate(results.items()):
        its = sorted({it for run in runs for it, _ in run["small_organ_curve"]})
        # seeds validated at the same iterations; an iteration some seed lacks is left out of the band
        values = [dict(run["small_organ_curve"]) for run in runs]
        shared = [it for it in its if all(it in v for v in values)]
        grid = np.array([[v[it] for it in shared] for v in values])
        colour = f"C{index}"
        ax.plot(shared, grid.mean(axis=0), color=colour, label=f"{loss} ({len(runs)} seeds)")
        if len(runs) > 1:
            ax.fill_between(shared, grid.min(axis=0), grid.max(axis=0), color=colour, alpha=0.2, linewidth=0)
    ax.set(
        xlabel="iteration",
        ylabel="validation small-organ Dice",
        ylim=(0, 1),
        title="Small-organ Dice per loss: mean over seeds, band from the lowest to the highest seed",
    )
    ax.title.set_fontsize(9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_plots(out: Path, results: dict[str, list[dict]], table: list[dict], dataset_dir: Path) -> list[Path]:
    """The four PNGs of ``PLOTS``; imports matplotlib lazily so that the tables need nothing beyond the bundle."""
    import matplotlib
    import matplotlib.colors
    import matplotlib.patches

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for loss, runs in results.items():
        for k, run in enumerate(runs):
            its, dice = zip(*run["curve"]) if run["curve"] else ((), ())
            ax.plot(its, dice, marker="o", label=loss if k == 0 else None, color=f"C{list(results).index(loss)}")
    ax.set(xlabel="iteration", ylabel="validation mean Dice", title="Validation mean Dice per loss")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "val_dice_curves.png", dpi=120)
    plt.close(fig)

    if all(run.get("small_organ_curve") for runs in results.values() for run in runs):
        _small_organ_curves(out / "small_organ_dice_curves.png", results, plt, np)

    organs = list(next(iter(results.values()))[0]["dice"])
    grid = np.array([[row[f"dice_{o}"][0] for o in organs] for row in table])
    fig, ax = plt.subplots(figsize=(1 + 0.6 * len(organs), 1.5 + 0.4 * len(table)))
    image = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(organs)), organs, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(table)), [row["loss"] for row in table], fontsize=8)
    for (i, j), v in np.ndenumerate(grid):
        ax.text(
            j, i, "" if np.isnan(v) else f"{v:.2f}", ha="center", va="center", fontsize=6, color="k" if v > 0.6 else "w"
        )  # readable on viridis' bright end
    fig.colorbar(image, ax=ax, label="Dice")
    fig.tight_layout()
    fig.savefig(out / "organ_dice_heatmap.png", dpi=120)
    plt.close(fig)

    from scripts.data import _read_dataset_json

    dataset = _read_dataset_json(dataset_dir)  # the chart's title and the legend's organ names
    _headline_chart(out / "small_organ_dice.png", table, str(dataset.get("name", dataset_dir.name)), plt, np)

    truth, preds, missing = _axial_slices(results, dataset_dir, out)
    if missing and (out / "axial_slices.png").is_file():
        # e.g. a committed study resumed on another machine: keep the full panel rather than draw a partial one
        print(f"[study] axial_slices.png kept: no prediction files for {', '.join(missing)} here", flush=True)
        return [out / n for n in PLOTS]
    panels = [("ground truth", truth), *preds.items()]
    # zoom on the labelled anatomy (a margin of a fifth of its extent) so that small organs stay visible
    rows_idx, cols_idx = np.nonzero(truth) if truth.any() else (np.arange(truth.shape[0]), np.arange(truth.shape[1]))
    box = []
    for idx, size in ((rows_idx, truth.shape[0]), (cols_idx, truth.shape[1])):
        lo, hi = int(idx.min()), int(idx.max())
        margin = max(2, (hi - lo) // 5)
        box.append(slice(max(0, lo - margin), min(size, hi + margin + 1)))
    # black background, then one distinct colour per organ label
    colours = ["black", *plt.get_cmap("tab20").colors[:19]]
    labels_cmap = matplotlib.colors.ListedColormap(colours)
    ncols = min(6, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    aspect = (box[1].stop - box[1].start) / (box[0].stop - box[0].start)  # height / width once rotated
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.3 * ncols, nrows * (2.3 * aspect + 0.3) + 0.5), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (name, data) in zip(axes.flat, panels):
        ax.imshow(np.rot90(data[tuple(box)]), cmap=labels_cmap, vmin=-0.5, vmax=19.5, interpolation="nearest")
        ax.set_title(name, fontsize=8)
    names = {str(k): str(v) for k, v in dataset.get("labels", {}).items()}
    present = [int(v) for v in np.unique(truth) if v > 0]
    handles = [matplotlib.patches.Patch(color=colours[v], label=names.get(str(v), str(v))) for v in present]
    fig.legend(handles=handles, loc="lower center", ncol=min(7, max(1, len(handles))), fontsize=6, frameon=False)
    fig.tight_layout(rect=(0, 0.5 / fig.get_figheight(), 1, 1))  # the legend's strip at the bottom
    fig.savefig(out / "axial_slices.png", dpi=120)
    plt.close(fig)
    return [out / n for n in PLOTS]


def train_in_child(argv: list[str], loss: str, seed: int) -> None:
    """One run in a child process: its own peak memory, and no state carried between losses."""
    subprocess.run(
        [sys.executable, "-m", "scripts.study", *argv, "--run-one", loss, str(seed)], cwd=BUNDLE_ROOT, check=True
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m scripts.study", description=__doc__.split("\n")[0])
    parser.add_argument("--dataset_dir", required=True, type=Path)
    parser.add_argument("--losses", default="all", help="'all' or a comma list of configs/losses presets")
    length = parser.add_mutually_exclusive_group(required=True)
    length.add_argument("--iterations", type=int, help="training iterations per run")
    length.add_argument("--budget-minutes", type=float, help="wall-clock training budget of the whole study")
    parser.add_argument(
        "--max-iterations",
        type=int,
        default=100_000,
        help="with --budget-minutes: iteration cap, and the cosine schedule's length",
    )
    parser.add_argument("--seeds", type=int, default=1, help="runs per loss, seeds 0..N-1")
    parser.add_argument("--val-points", type=int, default=DEFAULT_VAL_POINTS, help="validations per run")
    parser.add_argument("--out", type=Path, default=BUNDLE_ROOT / "docs" / "study")
    parser.add_argument(
        "--set",
        action="append",
        metavar="KEY=JSON",
        help="extra bundle override, e.g. 'patch_size=[32,32,32]'; repeatable; the same for every run",
    )
    parser.add_argument(
        "--tabulate-only",
        action="store_true",
        help="train nothing: write the tables and plots of the runs that have finished (a study part-way through)",
    )
    parser.add_argument("--run-one", nargs=2, metavar=("LOSS", "SEED"), help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> dict[str, list[dict]]:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    if args.iterations is not None and args.iterations < 1:
        raise ValueError(f"--iterations must be >= 1, got {args.iterations}.")
    if args.seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {args.seeds}.")
    losses = parse_losses(args.losses)
    budget_s = None if args.budget_minutes is None else 60 * args.budget_minutes / (len(losses) * args.seeds)
    out = args.out.resolve()
    if args.run_one:
        loss, seed = args.run_one[0], int(args.run_one[1])
        run_single(
            loss,
            seed,
            args.dataset_dir.resolve(),
            out / "runs" / loss / f"seed{seed}",
            args.iterations,
            budget_s,
            args.val_points,
            _overrides(args),
            args.max_iterations,
        )
        return {}
    _overrides(args)  # fail on a bad --set before any run starts
    results: dict[str, list[dict]] = {loss: [] for loss in losses}
    # seed-major: a study stopped part-way still has every loss at the seeds it finished
    for seed in range(args.seeds):
        for loss in losses:
            done = out / "runs" / loss / f"seed{seed}" / "result.json"
            if done.is_file():
                print(f"[study] skipping {loss} seed {seed}: {done} exists", flush=True)
            elif args.tabulate_only:
                continue
            else:
                print(f"[study] training {loss} seed {seed}", flush=True)
                train_in_child(argv, loss, seed)
            results[loss].append(json.loads(done.read_text()))
    finished = sum(len(runs) for runs in results.values())
    results = {loss: runs for loss, runs in results.items() if runs}
    if not results:
        raise SystemExit(
            f"[study] no finished run under {out / 'runs'} for these losses and seeds: nothing to tabulate"
        )
    columns, table = summarise(results)
    write_tables(out, columns, table)
    write_curve_table(out, results)
    write_commands(out, [a for a in argv if a != "--tabulate-only"], (finished, len(losses) * args.seeds))
    try:
        write_plots(out, results, table, args.dataset_dir.resolve())
    except ImportError as e:
        print(f"[study] no plots: {e}", flush=True)
    return results


if __name__ == "__main__":
    main()
