"""Benchmarks of the bundle's building blocks against their anchors, written to ``docs/benchmarks.md``.

Usage::

    python -m scripts.benchmark losses [--device cpu|cuda] [--threads 2] [--shape 2,14,64,64,64] [--repeats 5]
    python -m scripts.benchmark metrics [--device cpu|cuda] [--threads 2] [--shape 1,14,128,128,128] [--repeats 5]
    python -m scripts.benchmark inference [--device cpu|cuda] [--threads 2] [--cases 2x512x512x200 1x512x512x800]

Each subcommand owns one ``## <Name>`` section of the markdown file and replaces only its own block in it (one
block per device), so sections written by other subcommands or by hand are kept.

``losses``: forward + backward of every loss in ``ctlosses.LOSSES`` and of its anchor, in the same
process on the same inputs (``to_onehot_y=True`` with ``B1H[WD]`` labels; softmax where the loss has the
switch, given to both sides only if both accept it):

- MONAI 1.6.1's class of the same name (Jaccard: ``DiceLoss(jaccard=True)``; Focal Tversky: ``TverskyLoss``
  with the same alpha/beta; Combo: ``DiceCELoss``);
- for the Lovasz losses, the plain loop reference of ``tests/losses/lovasz_reference.py`` (one sort per image or
  batch and class, Algorithm 1 of Berman et al. 2018), given the one-hot target it needs inside the timing.

Runs alternate (ours, anchor, anchor, ours, ...) after one warm-up each, so a shared machine's load hits both
sides alike; the table gives medians. Memory is the peak of tensor memory allocated during one forward + backward
above what was allocated before it (inputs excluded, the input gradient included), as a multiple of the
logits' size: on CUDA from ``torch.cuda.max_memory_allocated``, on CPU from the allocation events of
``torch.profiler`` (``profile_memory=True``: every allocation and free of PyTorch's CPU allocator, in order),
measured in a separate, untimed run.

``metrics``: one update of ``ctlosses.organ_metrics.OrganCounts`` (per-organ Dice, IoU, precision and recall from
one accumulation) against MONAI's ``DiceMetric`` and ``MeanIoU`` called on the same prediction and label, on a
``1 x C x spatial`` one-hot prediction (as after ``AsDiscreted(argmax=True, to_onehot=C)``) with a one-hot label
and with a class-index label (MONAI's ``MeanIoU`` then gets the one-hot copy it requires, as in a real config).
Runs alternate as for the losses; the table gives medians.

``inference``: for each case (``--cases``, default two 512 x 512 x 200 CTs and one 512 x 512 x 800 CT, phantom cases
resampled to that size), wall seconds, voxels per second and the peak resident memory (RSS) of three commands on
the same volumes: ``python -m scripts.infer``, ``python -m monai.bundle run --config_file configs/inference.json``
(the bundle's chunked ``InvertArgmaxd``), and the reference, ``monai.bundle run`` with the model zoo's standard
postprocessing (``Activationsd`` + ``Invertd`` + ``AsDiscreted``, ``configs/reference/inference_invertd.json``
merged over the config). Each run is a fresh process timed from start to exit (start-up and model loading
included, as a user sees it), alternating which goes first; its memory is the largest sum of resident memory over
its process tree (loader workers included), sampled every 0.1 s. Each process's address space is capped
(``--memory-cap-gb``) so that a command that cannot fit fails alone and the table says so. The script runs with
its defaults for the device (bf16 autocast on recent GPUs, loader workers); the bundle runs with the config's.
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

DEFAULT_OUTPUT = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"

NEW_FILE_HEADER = """# Benchmarks

Figures measured with `python -m scripts.benchmark <subcommand>`; the module docstring of `scripts/benchmark.py`
says what is timed and how memory is measured. Each table names its machine, thread count and versions.
"""

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# ---------------------------------------------------------------------------------------------------- measuring


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_step(loss_fn: LossFn, logits: torch.Tensor, target: torch.Tensor) -> float:
    """Seconds for one forward + backward on a fresh leaf copy of ``logits``."""
    leaf = logits.detach().clone().requires_grad_(True)
    synchronize(logits.device)
    start = time.perf_counter()
    loss_fn(leaf, target).backward()
    synchronize(logits.device)
    return time.perf_counter() - start


def peak_extra_bytes(loss_fn: LossFn, logits: torch.Tensor, target: torch.Tensor) -> int:
    """Peak tensor bytes allocated during one forward + backward above the allocation before it."""
    leaf = logits.detach().clone().requires_grad_(True)
    if logits.device.type == "cuda":
        synchronize(logits.device)
        torch.cuda.reset_peak_memory_stats(logits.device)
        before = torch.cuda.memory_allocated(logits.device)
        loss_fn(leaf, target).backward()
        synchronize(logits.device)
        return torch.cuda.max_memory_allocated(logits.device) - before
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        loss_fn(leaf, target).backward()
    # every allocation (+) and free (-) of the CPU allocator while profiling, in time order
    events = sorted(
        (event.start_ns(), event.nbytes())
        for event in prof.profiler.kineto_results.events()
        if event.name() == "[memory]" and event.device_type() == torch.autograd.DeviceType.CPU
    )
    allocated = peak = 0
    for _, nbytes in events:
        allocated += nbytes
        peak = max(peak, allocated)
    return peak


@dataclass
class Case:
    """One of our callables against its anchor, with the issue's targets as ratios (None: no target)."""

    name: str
    anchor_label: str
    ours: LossFn
    anchor: LossFn
    time_limit: float | None = None
    memory_limit: float | None = None

    def target_text(self) -> str:
        limits = [
            f"{what} <= {limit}x"
            for what, limit in (("time", self.time_limit), ("memory", self.memory_limit))
            if limit is not None
        ]
        return ", ".join(limits)


@dataclass
class Comparison:
    case: Case
    ours_s: list[float]
    anchor_s: list[float]
    ours_bytes: int
    anchor_bytes: int

    @property
    def time_ratio(self) -> float:
        return statistics.median(self.ours_s) / statistics.median(self.anchor_s)

    @property
    def memory_ratio(self) -> float:
        return self.ours_bytes / max(self.anchor_bytes, 1)

    def verdict(self) -> str:
        """The targets and whether both were met, empty without a target."""
        if not self.case.target_text():
            return ""
        met = (self.case.time_limit is None or self.time_ratio <= self.case.time_limit) and (
            self.case.memory_limit is None or self.memory_ratio <= self.case.memory_limit
        )
        return f"{self.case.target_text()}: {'met' if met else '**not met**'}"


def compare(case: Case, logits: torch.Tensor, target: torch.Tensor, repeats: int) -> Comparison:
    """Alternate timed runs of ours and the anchor (one warm-up each; the side that goes first swaps every
    round), then one memory run each."""
    for fn in (case.ours, case.anchor):
        time_step(fn, logits, target)
    times: dict[str, list[float]] = {"ours": [], "anchor": []}
    for round_index in range(repeats):
        order = ("ours", "anchor") if round_index % 2 == 0 else ("anchor", "ours")
        for side in order:
            times[side].append(time_step(getattr(case, side), logits, target))
    ours_s, anchor_s = times["ours"], times["anchor"]
    return Comparison(
        case,
        ours_s,
        anchor_s,
        peak_extra_bytes(case.ours, logits, target),
        peak_extra_bytes(case.anchor, logits, target),
    )


# ---------------------------------------------------------------------------------------------------- losses

#: the switches every benchmarked loss gets when it takes them (only those both sides accept are passed)
LOSS_SWITCHES = {"to_onehot_y": True, "softmax": True, "use_softmax": True}
#: the targets on CPU with 2 threads, (time ratio, memory ratio): issue 2's for the region losses, issue 13's (item
#: 6, "Speed") for Combo and the Lovasz losses
REGION_TARGET = (0.7, 0.5)
COMBO_TARGET = (1.0, None)
LOVASZ_HINGE_TARGET = (0.3, None)
LOVASZ_SOFTMAX_TARGET = (0.12, None)
NO_TARGET = (None, None)


def _accepted(cls: type, kwargs: dict) -> set[str]:
    parameters = inspect.signature(cls.__init__).parameters
    return {key for key in kwargs if key in parameters}


def monai_anchors() -> dict[str, tuple[str, type, dict, dict, tuple[float | None, float | None]]]:
    """registry name -> (anchor label, MONAI class, kwargs for the anchor only, kwargs for both sides, target)."""
    import monai.losses as monai_losses

    tversky = {"alpha": 0.3, "beta": 0.7}
    return {
        "dice": ("monai DiceLoss", monai_losses.DiceLoss, {}, {}, REGION_TARGET),
        "jaccard": ("monai DiceLoss(jaccard=True)", monai_losses.DiceLoss, {"jaccard": True}, {}, REGION_TARGET),
        "tversky": ("monai TverskyLoss", monai_losses.TverskyLoss, {}, {}, REGION_TARGET),
        "generalized_dice": ("monai GeneralizedDiceLoss", monai_losses.GeneralizedDiceLoss, {}, {}, NO_TARGET),
        "focal_tversky": (
            "monai TverskyLoss(alpha=0.3, beta=0.7)",
            monai_losses.TverskyLoss,
            {},
            tversky,
            REGION_TARGET,
        ),
        "focal": ("monai FocalLoss", monai_losses.FocalLoss, {}, {}, NO_TARGET),
        "dice_ce": ("monai DiceCELoss", monai_losses.DiceCELoss, {}, {}, NO_TARGET),
        "dice_focal": ("monai DiceFocalLoss", monai_losses.DiceFocalLoss, {}, {}, NO_TARGET),
        "combo": ("monai DiceCELoss", monai_losses.DiceCELoss, {}, {}, COMBO_TARGET),
    }


def lovasz_anchor(kind: str, per_image: bool) -> LossFn:
    """The loop reference on ``(logits, labels)``: one-hot target, softmax (softmax kind), Algorithm 1 per
    (image or batch, class), Berman's mean over present classes."""
    # the tests' oracle, a plain loop over images and classes (tests/losses/lovasz_reference.py)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "losses"))
    from lovasz_reference import lovasz_hinge_reference, lovasz_softmax_reference, reduce_table_reference

    def loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        dense = F.one_hot(labels[:, 0].long(), logits.shape[1]).movedim(-1, 1).to(logits.dtype)
        if kind == "softmax":
            table, counted = lovasz_softmax_reference(torch.softmax(logits, 1), dense, None, per_image, "present")
        else:
            table, counted = lovasz_hinge_reference(logits, dense, None, per_image)
        return reduce_table_reference(table, counted)

    return loss


def loss_cases(only: list[str] | None) -> tuple[list[Case], list[str]]:
    """A case for each loss in the registry (aliases once), and notes on what was left out."""
    from ctlosses import LOSSES

    unknown = sorted(set(only or ()) - set(LOSSES))
    if unknown:
        raise SystemExit(f"--only: unknown loss names {unknown}; known: {sorted(LOSSES)}.")
    anchors = monai_anchors()
    cases, notes, seen = [], [], {}
    for name, cls in LOSSES.items():
        if only and name not in only:
            continue
        if cls in seen.values():
            alias_of = next(key for key, value in seen.items() if value is cls)
            notes.append(f"`{name}` is an alias of `{alias_of}` (same class), not timed twice.")
            continue
        seen[name] = cls
        if name in anchors:
            label, anchor_cls, anchor_only, shared, limits = anchors[name]
            both = _accepted(cls, LOSS_SWITCHES) & _accepted(anchor_cls, LOSS_SWITCHES)
            switches = {key: LOSS_SWITCHES[key] for key in both}
            ours, anchor = cls(**switches, **shared), anchor_cls(**switches, **shared, **anchor_only)
            cases.append(Case(name, label, ours, anchor, *limits))
        elif name == "lovasz_softmax":
            cases.append(
                Case(
                    name,
                    "loop reference",
                    cls(to_onehot_y=True),
                    lovasz_anchor("softmax", False),
                    *LOVASZ_SOFTMAX_TARGET,
                )
            )
            cases.append(
                Case(
                    f"{name} (per_image=True)",
                    "loop reference (per_image=True)",
                    cls(to_onehot_y=True, per_image=True),
                    lovasz_anchor("softmax", True),
                )
            )
        elif name == "lovasz_hinge":
            cases.append(
                Case(
                    name,
                    "loop reference (per_image=True)",
                    cls(to_onehot_y=True),
                    lovasz_anchor("hinge", True),
                    *LOVASZ_HINGE_TARGET,
                )
            )
        else:
            notes.append(f"`{name}` has no anchor in this script yet.")
    missing = [key for key in [*anchors, "lovasz_softmax", "lovasz_hinge"] if key not in LOSSES]
    if missing and not only:
        notes.append(
            "Not in the registry at the time of this run (not measured): "
            + ", ".join(f"`{key}`" for key in missing)
            + "."
        )
    return cases, notes


def make_inputs(shape: tuple[int, ...], device: torch.device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits ``shape`` and ``B1H[WD]`` labels of the same batch and size, uniform over the classes."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(shape, generator=generator)
    labels = torch.randint(0, shape[1], (shape[0], 1, *shape[2:]), generator=generator)
    return logits.to(device), labels.to(device)


def run_losses(args: argparse.Namespace) -> str:
    device = torch.device(args.device)
    shape = tuple(int(size) for size in args.shape.split(","))
    logits, labels = make_inputs(shape, device)
    logits_bytes = logits.numel() * logits.element_size()
    cases, notes = loss_cases(args.only)
    results = []
    for case in cases:
        case.ours, case.anchor = _to(case.ours, device), _to(case.anchor, device)
        result = compare(case, logits, labels, args.repeats)
        results.append(result)
        print(
            f"{case.name:32s} ours {statistics.median(result.ours_s) * 1e3:9.1f} ms  anchor "
            f"{statistics.median(result.anchor_s) * 1e3:9.1f} ms  time x{result.time_ratio:.2f}  "
            f"memory {result.ours_bytes / logits_bytes:.2f} vs {result.anchor_bytes / logits_bytes:.2f} "
            f"(x{result.memory_ratio:.2f})",
            flush=True,
        )
    return losses_markdown(results, notes, shape, device, args, logits_bytes)


def _to(loss: LossFn, device: torch.device) -> LossFn:
    return loss.to(device) if isinstance(loss, torch.nn.Module) else loss


def losses_markdown(results: list[Comparison], notes: list[str], shape, device, args, logits_bytes: int) -> str:
    lines = [
        f"### {machine_label(device)}",
        "",
        f"{environment_line(device, args.threads)} Input: logits `{tuple(shape)}` float32 "
        f"({logits_bytes / 2**20:.1f} MiB), labels `{(shape[0], 1, *shape[2:])}` int64 uniform over the classes, "
        f"`to_onehot_y=True`, softmax. Medians of {args.repeats} alternating runs after one warm-up each.",
        "",
        "| loss | anchor | ours (ms) | anchor (ms) | time ratio | ours peak extra (x logits) "
        "| anchor peak extra (x logits) | memory ratio | target (issues 2, 13) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        lines.append(
            f"| `{r.case.name}` | {r.case.anchor_label} | {statistics.median(r.ours_s) * 1e3:.1f} | "
            f"{statistics.median(r.anchor_s) * 1e3:.1f} | {r.time_ratio:.2f} | {r.ours_bytes / logits_bytes:.2f} | "
            f"{r.anchor_bytes / logits_bytes:.2f} | {r.memory_ratio:.2f} | {r.verdict()} |"
        )
    memory_source = (
        "`torch.cuda.max_memory_allocated`"
        if device.type == "cuda"
        else "the allocation and free events of `torch.profiler` (`profile_memory=True`) for PyTorch's CPU "
        "allocator, replayed in time order, in a separate untimed run"
    )
    lines += [
        "",
        f"- Peak extra memory: the most tensor memory allocated at once during one forward + backward above "
        f"what was allocated before it (the input gradient included), from {memory_source}.",
    ]
    lines += [f"- {note}" for note in notes]
    lines += [
        f"- Command: `python -m scripts.benchmark losses --device {device.type} --threads {args.threads} "
        f"--shape {args.shape} --repeats {args.repeats}`",
        "",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- report


# ---------------------------------------------------------------------------------------------------- metrics


def metric_update_seconds(
    shape: tuple[int, ...], label_format: str, device: torch.device, repeats: int, seed: int = 0
) -> tuple[list[float], list[float]]:
    """Seconds per update, ours and MONAI's (``DiceMetric`` + ``MeanIoU``), alternating after one warm-up each."""
    from monai.metrics import DiceMetric, MeanIoU
    from monai.networks.utils import one_hot

    from ctlosses.organ_metrics import OrganCounts

    num_classes, spatial = shape[1], shape[2:]
    generator = torch.Generator().manual_seed(seed)
    pred_index = torch.randint(0, num_classes, (shape[0], 1, *spatial), generator=generator).to(device)
    label_index = torch.randint(0, num_classes, (shape[0], 1, *spatial), generator=generator).to(device)
    pred = one_hot(pred_index, num_classes)
    label_onehot = one_hot(label_index, num_classes)
    label = label_onehot if label_format == "one-hot" else label_index.float()

    def ours() -> None:
        OrganCounts(num_classes=num_classes, include_background=False).update(pred, label)

    def monai() -> None:
        DiceMetric(include_background=False, num_classes=num_classes)(pred, label)
        MeanIoU(include_background=False)(pred, label_onehot)  # MeanIoU takes one-hot labels only

    timings: dict[str, list[float]] = {"ours": [], "monai": []}
    for run in range(repeats + 1):
        order = (("ours", ours), ("monai", monai)) if run % 2 == 0 else (("monai", monai), ("ours", ours))
        for name, update in order:
            synchronize(device)
            start = time.perf_counter()
            update()
            synchronize(device)
            if run > 0:  # the first round warms up allocators and kernels
                timings[name].append(time.perf_counter() - start)
    return timings["ours"], timings["monai"]


def run_metrics(args: argparse.Namespace) -> str:
    device = torch.device(args.device)
    shape = tuple(int(size) for size in args.shape.split(","))
    rows = []
    for label_format in ("one-hot", "class-index"):
        ours, monai = metric_update_seconds(shape, label_format, device, args.repeats)
        ours_ms, monai_ms = statistics.median(ours) * 1e3, statistics.median(monai) * 1e3
        print(
            f"{label_format:12s} ours {ours_ms:9.1f} ms  MONAI {monai_ms:9.1f} ms  x{ours_ms / monai_ms:.2f}",
            flush=True,
        )
        verdict = "met" if ours_ms / monai_ms <= 0.5 else "**not met**"
        rows.append(
            f"| {label_format} | {ours_ms:.1f} | {monai_ms:.1f} | {ours_ms / monai_ms:.2f} | <= 0.5x: {verdict} |"
        )
    return "\n".join(
        [
            f"### {machine_label(device)}",
            "",
            environment_line(device, torch.get_num_threads()) + f" Prediction: one-hot `{shape}` float32; "
            f"label as in the first column. Medians of {args.repeats} alternating runs after one warm-up each.",
            "",
            "| label | ours: `OrganCounts.update` (ms) | MONAI `DiceMetric` + `MeanIoU` (ms) | time ratio "
            "| target (issue 4) |",
            "|---|---:|---:|---:|---|",
            *rows,
            "",
            f"- Command: `python -m scripts.benchmark metrics --device {args.device} --threads {args.threads} "
            f"--shape {args.shape} --repeats {args.repeats}`",
        ]
    )


# ---------------------------------------------------------------------------------------------------- inference


def write_benchmark_volumes(folder: Path, size: tuple[int, int, int], count: int) -> int:
    """Phantom CTs resampled to ``size`` voxels (same field of view, finer spacing); returns the total voxels."""
    import nibabel as nib
    import numpy as np

    from scripts.phantom import make_case

    folder.mkdir(parents=True, exist_ok=True)
    for case in range(count):
        image, _, affine = make_case(seed=1000 + case)
        volume = torch.from_numpy(image.astype(np.float32))[None, None]
        resized = F.interpolate(volume, size=size, mode="trilinear", align_corners=False)[0, 0]
        scale = np.array(image.shape, dtype=float) / np.array(size, dtype=float)
        resized_affine = affine.copy()
        resized_affine[:3, :3] = affine[:3, :3] * scale  # each voxel axis shrinks by its resampling factor
        nib.save(
            nib.Nifti1Image(resized.round().numpy().astype(np.int16), resized_affine),
            folder / f"case_{case:02d}.nii.gz",
        )
    return count * size[0] * size[1] * size[2]


#: ``VOLUMESxXxYxZ``: the issue's sizes, two abdominal CTs and one whole-body CT
DEFAULT_CASES = ("2x512x512x200", "1x512x512x800")
#: each command's address space is capped (``RLIMIT_AS``) so that one that cannot fit fails on its own instead of
#: pushing the shared 24 GB machine into swapless out-of-memory kills
DEFAULT_MEMORY_CAP_GB = 18.0
RSS_SAMPLE_SECONDS = 0.1


@dataclass
class Run:
    """One fresh process of one command: wall seconds, the peak resident memory of its process tree, and the
    reason it failed (None when it exited 0)."""

    seconds: float
    peak_rss_bytes: int
    error: str | None = None


def parse_case(text: str) -> tuple[int, tuple[int, int, int]]:
    """``"2x512x512x200"`` -> ``(2, (512, 512, 200))``."""
    parts = text.lower().split("x")
    if len(parts) != 4 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"expected VOLUMESxXxYxZ such as 2x512x512x200, got {text!r}")
    count, *size = (int(p) for p in parts)
    return count, tuple(size)


def _process_tree_rss(root: int) -> int:
    """Resident bytes of ``root`` and all its descendants (loader workers), from ``/proc``."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):  # the process ended while we looked
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        try:
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, IndexError, ValueError):
            continue
    return total


def run_measured(command: list[str], threads: int, memory_cap_bytes: int | None, log: Path) -> Run:
    """One fresh process of ``command`` (stderr to ``log``), timed from start to exit, its tree's resident memory
    sampled every ``RSS_SAMPLE_SECONDS`` and never below the main process's own ``ru_maxrss``."""
    import resource

    def cap_address_space() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (memory_cap_bytes, memory_cap_bytes))

    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    start, peak = time.perf_counter(), 0
    with open(log, "wb") as stderr:
        process = subprocess.Popen(
            command,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            preexec_fn=cap_address_space if memory_cap_bytes else None,
        )
        while True:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            peak = max(peak, _process_tree_rss(process.pid))
            time.sleep(RSS_SAMPLE_SECONDS)
    seconds = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)  # reaped by wait4: keep Popen from waiting again
    peak = max(peak, usage.ru_maxrss * 1024)  # Linux reports KiB
    if process.returncode == 0:
        return Run(seconds, peak)
    lines = log.read_text(errors="replace").strip().splitlines()
    # the first exception line: the cause, before the chained ones monai.bundle adds (transform, config expression)
    errors = [line for line in lines if "Error" in line.split(":", 1)[0]] or lines[-1:] or ["(no output)"]
    return Run(seconds, peak, f"exit status {process.returncode}: {errors[0].strip()[:300]}")


def inference_commands(inputs: Path, device: str) -> dict[str, Callable[[Path], list[str]]]:
    """The three commands, by table label: the script, the bundle run with the bundle's postprocessing, and the
    bundle run with the model zoo's (``configs/reference/inference_invertd.json`` merged over the config)."""
    import sys

    root = Path(__file__).resolve().parents[1]
    config = str(root / "configs" / "inference.json")
    reference = f"['{config}','{root / 'configs' / 'reference' / 'inference_invertd.json'}']"

    def bundle_run(config_file: str) -> Callable[[Path], list[str]]:
        return lambda out: [
            sys.executable,
            "-m",
            "monai.bundle",
            "run",
            "--config_file",
            config_file,
            "--bundle_root",
            str(root),
            "--input",
            str(inputs),
            "--output_dir",
            str(out),
            "--device",
            f"$torch.device('{device}')",
        ]

    return {
        "python -m scripts.infer": lambda out: [
            sys.executable,
            "-m",
            "scripts.infer",
            str(inputs),
            "--output",
            str(out),
            "--device",
            device,
            "--no-progress",
        ],
        "monai.bundle run, configs/inference.json (InvertArgmaxd)": bundle_run(config),
        "monai.bundle run, model zoo postprocessing (Invertd), the reference": bundle_run(reference),
    }


def measure_case(
    count: int, size: tuple[int, int, int], args: argparse.Namespace, tmp: Path
) -> tuple[int, dict[str, list[Run]]]:
    """Every command on ``count`` volumes of ``size``, ``args.repeats`` times, alternating which goes first."""
    inputs = tmp / f"in-{count}x{'x'.join(map(str, size))}"
    voxels = write_benchmark_volumes(inputs, size, count)
    commands = inference_commands(inputs, args.device)
    cap = int(args.memory_cap_gb * 2**30) if args.memory_cap_gb > 0 else None
    runs: dict[str, list[Run]] = {name: [] for name in commands}
    for repeat in range(args.repeats):
        for index, name in enumerate(list(commands) if repeat % 2 == 0 else list(reversed(commands))):
            out = tmp / f"out-{inputs.name}-{repeat}-{index}"
            run = run_measured(commands[name](out), args.threads, cap, tmp / f"{out.name}.log")
            runs[name].append(run)
            state = "ok" if run.error is None else f"FAILED ({run.error})"
            print(
                f"{inputs.name} {name}: {run.seconds:.1f} s, peak RSS {run.peak_rss_bytes / 2**30:.2f} GiB, {state}",
                flush=True,
            )
    return voxels, runs


@dataclass
class Row:
    """A command's medians over its completed runs on one case (None when none completed)."""

    seconds: float | None
    peak_rss_bytes: int | None
    voxels_per_second: float | None
    failures: list[str]

    @classmethod
    def of(cls, runs: list[Run], voxels: int) -> Row:
        done = [r for r in runs if r.error is None]
        failures = [r.error for r in runs if r.error is not None]
        if not done:
            return cls(None, None, None, failures)
        seconds = statistics.median(r.seconds for r in done)
        return cls(seconds, int(statistics.median(r.peak_rss_bytes for r in done)), voxels / seconds, failures)


def inference_verdicts(rows: dict[str, Row]) -> list[str]:
    """The issue's CPU targets, each met or not, from one case's rows (script, bundle run, reference)."""
    script, bundle, reference = rows.values()
    lines = []
    if reference.seconds is None:
        return [
            "The reference did not complete, so the ratios to it cannot be given; "
            f"{'the script completed' if script.seconds else 'the script did not complete either'}."
        ]
    if script.seconds is not None:
        rss_ratio = script.peak_rss_bytes / reference.peak_rss_bytes
        speed_ratio = script.voxels_per_second / reference.voxels_per_second
        lines.append(
            f"Peak RSS of the script / the reference's: {rss_ratio:.2f}x (target <= 0.3x): "
            f"{'met' if rss_ratio <= 0.3 else '**not met**'}."
        )
        lines.append(
            f"Voxels per second of the script / the reference's: {speed_ratio:.2f}x (target >= 2x): "
            f"{'met' if speed_ratio >= 2 else '**not met**'}."
        )
    if script.seconds is not None and bundle.seconds is not None:
        bundle_ratio = bundle.seconds / script.seconds
        lines.append(
            f"`monai.bundle run` with `configs/inference.json` / the script, in seconds: {bundle_ratio:.2f}x "
            f"(target <= 1.2x): {'met' if bundle_ratio <= 1.2 else '**not met**'}."
        )
    return lines


def inference_table(
    count: int, size: tuple[int, int, int], voxels: int, runs: dict[str, list[Run]], memory_cap_gb: float
) -> list[str]:
    """One case's markdown table and verdicts."""
    rows = {name: Row.of(case_runs, voxels) for name, case_runs in runs.items()}
    lines = [
        f"**{count} x {' x '.join(map(str, size))}** ({voxels / 1e6:.0f} M voxels in all)",
        "",
        "| command | seconds (median) | runs | peak RSS (GiB) | voxels per second |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, row in rows.items():
        done = f"{len(runs[name]) - len(row.failures)} of {len(runs[name])}"
        if row.seconds is None:
            lines.append(f"| {name} | did not complete | {done} | | |")
        else:
            lines.append(
                f"| {name} | {row.seconds:.1f} | {done} | {row.peak_rss_bytes / 2**30:.2f} "
                f"| {row.voxels_per_second:.3g} |"
            )
    lines.append("")
    for name, row in rows.items():
        for failure in dict.fromkeys(row.failures):
            lines.append(f"- {name} failed under the {memory_cap_gb:g} GiB address-space cap: `{failure}`")
    lines += [f"- {line}" for line in inference_verdicts(rows)]
    return lines + [""]


def run_inference(args: argparse.Namespace) -> str:
    import tempfile

    device = torch.device(args.device)
    environment = environment_line(device, args.threads, INFERENCE_SOURCES)  # the load average before any run
    tables = []
    with tempfile.TemporaryDirectory(prefix="infer-bench-") as tmp:
        for count, size in args.cases:
            voxels, runs = measure_case(count, size, args, Path(tmp))
            tables += inference_table(count, size, voxels, runs, args.memory_cap_gb)
    load_after = f"{os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else "unknown"
    cases = " ".join(f"{c}x{'x'.join(map(str, s))}" for c, s in args.cases)
    return "\n".join(
        [
            f"### {machine_label(device)}",
            "",
            environment + f" Load average {load_after} at the end. Input: phantom CTs resampled to each size, "
            f"`models/model.pt`, config defaults (the script with its own defaults for the device). Each run is a fresh "
            f"process timed from start to exit (start-up and model loading included); medians of {args.repeats} "
            "alternating run(s).",
            "",
            *tables,
            "- Peak RSS: the largest resident memory of the command's process tree (main process and loader workers), "
            f"sampled every {RSS_SAMPLE_SECONDS:g} s, and never below the main process's own `ru_maxrss`. Every command "
            f"ran with its address space capped at {args.memory_cap_gb:g} GiB (`RLIMIT_AS`), so that one that cannot "
            "fit fails alone instead of exhausting the shared machine.",
            f"- Command: `python -m scripts.benchmark inference --device {args.device} --threads {args.threads} "
            f"--cases {cases} --repeats {args.repeats} --memory-cap-gb {args.memory_cap_gb:g}`",
        ]
    )


def machine_label(device: torch.device) -> str:
    if device.type == "cuda":
        return f"CUDA: {torch.cuda.get_device_name(device)}"
    return f"CPU: {cpu_model()}"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


MEASURED_SOURCES = ("ctlosses", "tests/losses/lovasz_reference.py", "ctlosses/organ_metrics.py")


def source_version(paths: tuple[str, ...] = MEASURED_SOURCES) -> str:
    """The commit measured, flagged when the measured sources differ from it (a shared working tree)."""
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        changed = subprocess.run(
            ["git", "status", "--porcelain", "--", *paths], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "an unknown commit"
    return f"commit `{commit}`" + (" plus uncommitted changes to the measured modules" if changed else "")


INFERENCE_SOURCES = ("scripts/infer.py", "scripts/lean_inverse.py", "configs/inference.json", "configs/reference")


def environment_line(device: torch.device, threads: int, sources: tuple[str, ...] = MEASURED_SOURCES) -> str:
    import monai

    date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    load = f", load average {os.getloadavg()[0]:.1f} at the start" if hasattr(os, "getloadavg") else ""
    return (
        f"Measured {date} at {source_version(sources)} on {platform.system()} {platform.machine()} "
        f"({os.cpu_count()} logical CPUs{load}), torch {torch.__version__}, MONAI {monai.__version__}, {threads} torch threads."
    )


def write_block(path: Path, section: str, block_id: str, body: str) -> None:
    """Put ``body`` between ``<!-- block_id -->`` markers inside the ``## section`` of ``path``.

    An existing block with the same id is replaced; other blocks and sections are kept.
    """
    text = path.read_text() if path.exists() else NEW_FILE_HEADER
    start, end = f"<!-- {block_id} -->", f"<!-- /{block_id} -->"
    block = f"{start}\n{body.rstrip()}\n{end}"
    if start in text and end in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end) :]
    else:
        heading = f"## {section}"
        if heading not in text.splitlines():
            text = text.rstrip() + f"\n\n{heading}\n"
        lines = text.splitlines()
        begin = lines.index(heading)
        stop = next((i for i in range(begin + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        section_text = "\n".join(lines[begin:stop]).rstrip() + "\n\n" + block + "\n"
        text = (
            "\n".join(lines[:begin])
            + ("\n" if begin else "")
            + section_text
            + ("\n" + "\n".join(lines[stop:]) if stop < len(lines) else "")
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text.rstrip() + "\n")


# ---------------------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m scripts.benchmark", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    losses = commands.add_parser("losses", help="each loss in ctlosses against its anchor")
    losses.add_argument("--shape", default="2,14,64,64,64", help="logits shape B,C,H,W[,D] (default: %(default)s)")
    losses.add_argument("--only", nargs="+", metavar="NAME", help="registry names to run (default: all)")
    losses.set_defaults(run=run_losses, section="Losses")
    add_common_options(losses)
    metrics = commands.add_parser("metrics", help="per-organ metric update against MONAI's DiceMetric + MeanIoU")
    metrics.add_argument(
        "--shape", default="1,14,128,128,128", help="prediction shape B,C,H,W[,D] (default: %(default)s)"
    )
    metrics.set_defaults(run=run_metrics, section="Metrics")
    add_common_options(metrics)
    inference = commands.add_parser(
        "inference", help="scripts.infer and monai.bundle run against the model zoo's postprocessing on the same CTs"
    )
    inference.add_argument(
        "--cases",
        nargs="+",
        type=parse_case,
        default=[parse_case(c) for c in DEFAULT_CASES],
        metavar="VOLUMESxXxYxZ",
        help="volumes and their size, one table each (default: " + " ".join(DEFAULT_CASES) + ")",
    )
    inference.add_argument(
        "--memory-cap-gb",
        type=float,
        default=DEFAULT_MEMORY_CAP_GB,
        help="address-space cap of each command in GiB, 0 for none (default: %(default)s)",
    )
    inference.set_defaults(run=run_inference, section="Inference")
    add_common_options(inference, repeats=1)  # a run takes minutes at 512 x 512 x 200
    return parser


def add_common_options(command: argparse.ArgumentParser, repeats: int = 5) -> None:
    """Options every subcommand takes."""
    command.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    command.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default: %(default)s)")
    command.add_argument("--repeats", type=int, default=repeats, help="timed runs per side (default: %(default)s)")
    command.add_argument(
        "--output", type=Path, default=DEFAULT_OUTPUT, help="markdown file (default: docs/benchmarks.md)"
    )
    command.add_argument("--no-write", action="store_true", help="print the table, leave the file alone")


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device available")
    markdown = args.run(args)
    print(markdown)
    if not args.no_write:
        block_id = f"{args.command}:{args.device}"
        write_block(args.output, args.section, block_id, markdown)
        print(f"wrote {args.output} ({block_id})")


if __name__ == "__main__":
    main()
