"""What a new user sees when running the README's commands: a per-organ table after each validation (organs in
label order, Dice and IoU), a short metrics line, a last line naming the best checkpoint, no MONAI FutureWarning
about ``Orientationd``'s ``labels`` default, and README commands that run from the bundle's venv."""

import json
import re
import shlex

import pytest
from bundle_helpers import BUNDLE_ROOT, CONFIGS, bundle_copy, make_tiny_phantom, run_bundle

ORGANS = list(
    json.loads((CONFIGS / "metadata.json").read_text())["network_data_format"]["outputs"]["pred"][
        "channel_def"
    ].values()
)[1:]
STATS = re.compile(r"Epoch\[(\d+)\] Metrics -- (val_mean_dice: .*)$")
BEST = re.compile(r"best model: (\S+) \(epoch (\d+), val_mean_dice ([0-9.]+)\)$")
ORIENTATION_WARNING = re.compile(r"Orientationd.*labels|FutureWarning.*Orientation")


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    return make_tiny_phantom(tmp_path_factory.mktemp("phantom"))


@pytest.fixture(scope="module")
def training(phantom, tmp_path_factory):
    """Two epochs of the README's training command (tiny sizes) in a copy of the bundle, validating each epoch."""
    bundle = bundle_copy(tmp_path_factory.mktemp("user"))
    code, lines = run_bundle(bundle, "--dataset_dir", str(phantom), "--epochs", "2", "--val_interval", "1")
    assert code == 0, "\n".join(lines[-40:])
    return bundle, lines


def tables(lines):
    """Each per-organ table of the log: (title, header, organ rows, mean row), rows as (name, dice, iou)."""
    found = []
    for i, line in enumerate(lines):
        if "per-organ scores over" not in line:
            continue
        rows = []
        for row in lines[i + 2 : i + 2 + len(ORGANS) + 1]:
            name, dice, iou = re.fullmatch(r"(.+?)\s+(\S+)\s+(\S+)", row.strip()).groups()
            rows.append((name, float(dice), float(iou)))
        found.append((line, lines[i + 1].split(), rows[:-1], rows[-1]))
    return found


def stats_lines(lines):
    return [(int(m.group(1)), m.group(2)) for m in map(STATS.search, lines) if m]


def test_every_validation_prints_a_per_organ_table_in_label_order(training):
    _, lines = training
    found = tables(lines)
    assert [title.split("ctlosses.organ_metrics - INFO - ")[-1].split(":")[0] for title, *_ in found] == [
        "epoch 1",
        "epoch 2",
    ]
    stats = dict(stats_lines(lines))
    for title, header, rows, mean in found:
        epoch = int(re.search(r"epoch (\d+):", title).group(1))
        assert header == ["organ", "dice", "iou"]
        assert [name for name, *_ in rows] == ORGANS  # label order of metadata.json, not alphabetical
        assert all(0.0 <= iou <= dice <= 1.0 for _, dice, iou in rows)
        assert mean[0] == "mean"
        printed = float(re.search(r"val_mean_dice: ([0-9.]+)", stats[epoch]).group(1))
        assert mean[1] == pytest.approx(printed, abs=1e-4)


def test_metrics_line_holds_the_means_only(training):
    _, lines = training
    stats = stats_lines(lines)
    assert [epoch for epoch, _ in stats] == [1, 2]
    for _, text in stats:
        assert "/" not in text and len(text) < 120, text  # the per-organ values are in the table
        assert re.fullmatch(r"val_mean_dice: [0-9.]+ val_mean_iou: [0-9.]+", text.strip()), text


def test_last_line_names_the_best_model(training):
    bundle, lines = training
    best = [(i, m) for i, m in enumerate(map(BEST.search, lines)) if m]
    assert len(best) == 1, "\n".join(lines[-20:])
    index, match = best[0]
    # only the trainer's own closing line may follow
    assert all("Engine run finished" in line for line in lines[index + 1 :]), lines[index:]
    path, epoch, value = match.group(1), int(match.group(2)), float(match.group(3))
    assert path == "models/model.pt" and (bundle / path).is_file()
    scores = [(float(re.search(r"val_mean_dice: ([0-9.]+)", text).group(1)), e) for e, text in stats_lines(lines)]
    best_value = max(v for v, _ in scores)
    assert value == pytest.approx(best_value, abs=1e-4)
    assert epoch == min(e for v, e in scores if v == best_value)  # the first epoch reaching it is kept


def test_training_prints_no_orientation_warning(training):
    _, lines = training
    assert not [line for line in lines if ORIENTATION_WARNING.search(line)]


def test_inference_prints_no_orientation_warning(training, phantom, tmp_path):
    bundle, _ = training
    code, lines = run_bundle(
        bundle,
        "--input",
        str(phantom / "imagesTr"),
        "--output_dir",
        str(tmp_path),
        configs=("inference.json",),
        env={"PYTHONWARNINGS": "error::FutureWarning:monai.utils.deprecate_utils"},
    )
    assert code == 0, "\n".join(lines[-30:])
    assert not [line for line in lines if ORIENTATION_WARNING.search(line)]
    assert len(list(tmp_path.glob("*_seg.nii.gz"))) == 3


def orientation_entries(value):
    if isinstance(value, dict):
        if value.get("_target_") in ("Orientationd", "monai.transforms.Orientationd"):
            yield value
        for item in value.values():
            yield from orientation_entries(item)
    elif isinstance(value, list):
        for item in value:
            yield from orientation_entries(item)


def test_every_orientationd_sets_labels_explicitly():
    """``labels: null`` is MONAI 1.6.1's default (its warning says the default became None); spelled out, MONAI
    no longer warns, and the behaviour stays: the axis labels follow the image's ``space`` (RAS for NIfTI)."""
    found = {}
    for path in sorted(CONFIGS.rglob("*.json")):
        for entry in orientation_entries(json.loads(path.read_text())):
            found.setdefault(path.relative_to(BUNDLE_ROOT).as_posix(), []).append(entry)
    assert {"configs/train.json", "configs/inference.json"} <= set(found)
    for path, entries in found.items():
        for entry in entries:
            assert "labels" in entry and entry["labels"] is None, (path, entry)


# --- the README's commands ------------------------------------------------------------------------------------


def readme_commands(path):
    """The shell commands of the ```bash blocks of a README, comments and continuation lines joined."""
    text = path.read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        if re.search(r"^source \S+/bin/activate", block, flags=re.M):
            continue  # an activated venv: its programs are on PATH
        for command in block.replace("\\\n", " ").splitlines():
            command = command.strip()
            if command and not command.startswith("#"):
                commands.append(command)
    return commands


@pytest.mark.parametrize("readme", ["README.md", "docs/README.md"])
def test_readme_commands_use_the_venv(readme):
    """After the two set-up commands a new user has no activated venv: every command names `.venv/bin/...`
    (a plain `python` has no MONAI), `bash` scripts and `python3.11 -m venv` excepted."""
    commands = readme_commands(BUNDLE_ROOT / readme)
    assert commands
    bare = []
    for command in commands:
        for part in re.split(r"&&|\|\||;|\|", command):
            words = shlex.split(part.strip(), posix=True) if part.strip() else []
            if not words:
                continue
            program = words[0]
            if program in ("python", "python3", "torchrun", "pip", "pytest"):
                bare.append(command)
    assert not bare, "commands run outside the venv:\n" + "\n".join(bare)


def test_docs_snippet_of_the_metrics_is_train_json():
    """The `validate` snippet of docs/README.md shows train.json's entries as they are, no key more or less."""
    text = (BUNDLE_ROOT / "docs" / "README.md").read_text()
    snippets = [block for block in re.findall(r"```json\n(.*?)```", text, flags=re.S) if '"organ_counts"' in block]
    assert len(snippets) == 1
    shown = json.loads("{" + snippets[0] + "}")["validate"]
    validate = json.loads((CONFIGS / "train.json").read_text())["validate"]
    assert set(shown) == {"organ_counts", "key_metric", "additional_metrics"}
    for key, value in shown.items():
        assert value == validate[key], key
    writer = [h for h in validate["handlers"] if isinstance(h, dict) and h["_target_"].endswith("OrganMetricsWriter")]
    assert writer and json.dumps(writer[0]) in text.replace("\n", "")
