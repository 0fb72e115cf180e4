"""Datasets of the bundle: the MSD-style ``dataset.json`` reader, the embedded phantom default and the
checks that run before training, so that a bad dataset stops with one message naming the file.

Command line::

    python -m scripts.data phantom --out data/phantom            # the embedded synthetic default
    python -m scripts.data example-ct --out data/example_ct      # real CT from totalsegmentator's sdist
    python -m scripts.data check --dataset_dir data/phantom      # the checks training runs first
"""

from __future__ import annotations

import argparse
import json
import os
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np

from scripts.errors import BundleError

NUM_CLASSES = 14  # background + 13 BTCV organs


class DatasetError(BundleError, ValueError):
    """A dataset that cannot be trained on; the message names the file or value and what was expected."""


def _read_dataset_json(dataset_dir: Path) -> dict:
    path = dataset_dir / "dataset.json"
    if not path.is_file():
        raise DatasetError(
            f"{dataset_dir} has no dataset.json; expected an MSD-style dataset.json with a "
            f"'training' list of {{'image', 'label'}} entries."
        )
    try:
        content = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise DatasetError(f"cannot read {path}: {error}") from None
    training = content.get("training") if isinstance(content, dict) else None
    if not isinstance(training, list) or not training:
        raise DatasetError(f"{path}: expected a non-empty 'training' list, got {training!r:.80}.")
    return content


def _resolve(dataset_dir: Path, items: list, path: Path, keys: tuple[str, ...]) -> list[dict]:
    resolved = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or any(not isinstance(item.get(k), str) for k in keys):
            raise DatasetError(f"{path}: entry {i} must be a dict with string {list(keys)}, got {item!r:.120}.")
        resolved.append({k: str((dataset_dir / item[k]).resolve()) for k in keys})
    return resolved


def load_datalist(
    dataset_dir: str | os.PathLike,
    section: str = "training",
    val_fraction: float = 0.2,
    keys: tuple[str, ...] = ("image", "label"),
) -> list[dict]:
    """The ``section`` list of ``dataset_dir/dataset.json`` with absolute paths.

    MSD's ``dataset.json`` has no validation list: when ``validation`` is missing, the last
    ``max(1, round(val_fraction * n))`` training entries (in file order, so the split is deterministic) are
    the validation set and are removed from ``training``.

    Args:
        dataset_dir: folder holding ``dataset.json``; entries are relative to it.
        section: ``"training"``, ``"validation"`` or any other list in the file (e.g. ``"test"``).
        val_fraction: held-out fraction when the file has no ``validation`` list (default 0.2).
        keys: keys every entry must have (default ``("image", "label")``).
    """
    root = Path(dataset_dir)
    content = _read_dataset_json(root)
    path = root / "dataset.json"
    training = content["training"]
    if section in ("training", "validation") and "validation" not in content:
        if len(training) < 2:
            raise DatasetError(
                f"{path}: needs 2 or more training entries to hold one out for validation "
                f"(or a 'validation' list), got {len(training)}."
            )
        n_val = max(1, round(val_fraction * len(training)))
        items = training[:-n_val] if section == "training" else training[-n_val:]
    elif section in content:
        items = content[section]
    else:
        raise DatasetError(f"{path} has no {section!r} list; it has {sorted(content)}.")
    return _resolve(root, items, path, keys)


NIFTI_SUFFIXES = (".nii", ".nii.gz")


def inference_datalist(source: str | os.PathLike | list, key: str = "image") -> list[dict]:
    """Inputs of ``inference.json`` as ``[{key: path}, ...]`` from a folder, a file, a datalist or a list.

    - a folder with ``dataset.json``: its ``test`` images, else its ``validation`` images (MSD-style; with
      neither, the held-out training images of :func:`load_datalist`);
    - any other folder: every ``*.nii``/``*.nii.gz`` in it, sorted;
    - a ``dataset.json`` file: as its folder;
    - any other ``.json`` file: a list of paths or of ``{"image": path}`` dicts, relative to the file's folder;
    - a NIfTI file, or a list of paths.

    Raises:
        DatasetError: for a missing path, an empty folder or an unreadable datalist.
    """
    if isinstance(source, (list, tuple)):
        paths = [str(Path(p).resolve()) for p in source]
    else:
        path = Path(source)
        if path.is_dir() and (path / "dataset.json").is_file():
            content = _read_dataset_json(path)
            if isinstance(content.get("test"), list) and content["test"]:
                items = [t if isinstance(t, dict) else {"image": t} for t in content["test"]]
                return [{key: d["image"]} for d in _resolve(path, items, path / "dataset.json", ("image",))]
            return [{key: d["image"]} for d in load_datalist(path, "validation", keys=("image",))]
        if path.is_dir():
            paths = sorted(str(p.resolve()) for p in path.iterdir() if p.name.endswith(NIFTI_SUFFIXES))
            if not paths:
                raise DatasetError(f"inference input folder {path} holds no .nii/.nii.gz files.")
        elif path.is_file() and path.suffix == ".json":
            try:
                items = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError) as error:
                raise DatasetError(f"cannot read inference datalist {path}: {error}") from None
            if isinstance(items, dict) and path.name == "dataset.json":  # an MSD file: what its folder gives
                return inference_datalist(path.parent, key)
            if not isinstance(items, list) or not items:
                raise DatasetError(f"inference datalist {path}: expected a non-empty JSON list, got {items!r:.80}.")
            items = [t if isinstance(t, dict) else {"image": t} for t in items]
            paths = [d["image"] for d in _resolve(path.parent, items, path, ("image",))]
        elif path.is_file():
            paths = [str(path.resolve())]
        else:
            raise DatasetError(f"inference input {path} does not exist; pass --input <folder, NIfTI or datalist>.")
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise DatasetError(f"inference input files do not exist: {missing[:5]}")
    return [{key: p} for p in paths]


def _load(path: str, what: str) -> nib.Nifti1Image:
    if not os.path.isfile(path):
        raise DatasetError(f"{what} file {path} listed in dataset.json does not exist.")
    try:
        image = nib.load(path)
        data = np.asanyarray(image.dataobj)
    except (OSError, EOFError, zlib.error, nib.filebasedimages.ImageFileError, ValueError) as error:
        raise DatasetError(f"{what} file {path} is not a readable NIfTI image: {error}") from None
    if data.ndim not in (3, 4) or (data.ndim == 4 and data.shape[-1] != 1):
        raise DatasetError(f"{what} file {path}: expected a 3D volume, got shape {data.shape}.")
    return image


def prepare_dataset(
    dataset_dir: str | os.PathLike,
    generate_if_missing: bool = True,
    check: bool = True,
    num_classes: int = NUM_CLASSES,
    **phantom_kwargs,
) -> str:
    """Make ``dataset_dir`` ready for training and check it; the bundle's ``initialize`` step calls this.

    A missing or empty ``dataset_dir`` is filled with the synthetic phantom (``scripts.phantom.generate``)
    when ``generate_if_missing``; then every training and validation entry is checked with
    :func:`scripts.checks.check_dataset` (geometry, intensities, labels; verdicts cached by file size and
    modification time), so that bad data stops before the first iteration.

    Args:
        dataset_dir: the dataset folder (MSD-style ``dataset.json`` + NIfTI files).
        generate_if_missing: write the phantom when the folder is missing or empty (default True).
        check: check every entry (default True).
        num_classes: number of label values, background included (default 14).
        phantom_kwargs: passed to ``scripts.phantom.generate`` (``num_cases``, ``spacing_scale``...).

    Returns:
        ``dataset_dir`` as a string, so configs can use the call as a value.
    """
    root = Path(dataset_dir)
    if root.exists() and not root.is_dir():
        raise DatasetError(f"dataset_dir {root} is a file; expected a folder holding dataset.json.")
    if not root.exists() or not any(root.iterdir()):
        if not generate_if_missing:
            raise DatasetError(
                f"dataset_dir {root} is missing or empty and generating the phantom there is "
                f"off; pass --dataset_dir <folder with dataset.json>."
            )
        from scripts.phantom import generate

        print(f"dataset_dir {root} is missing or empty: generating the synthetic CT phantom there ...", flush=True)
        try:
            generate(root, **phantom_kwargs)
        except OSError as error:  # no permission, a file in the way, a read-only or full disk
            raise DatasetError(
                f"dataset_dir {root} is missing or empty and the phantom cannot be written there "
                f"({error}); pass --dataset_dir <writable folder or existing dataset>."
            ) from None
    if check:
        from scripts.checks import check_dataset

        check_dataset(
            root, {section: load_datalist(root, section) for section in ("training", "validation")}, num_classes
        )
    return str(root)


def write_fit_dataset(
    source_dir: str | os.PathLike, out_dir: str | os.PathLike, cases: list[str] | None = None
) -> Path:
    """A dataset whose ``validation`` list is its ``training`` list: validation then measures how far a loss
    *fits* those cases, not how it generalises (the question a study on one or two real CTs can still answer).

    Args:
        source_dir: folder with the source ``dataset.json``; its whole ``training`` list is read (no hold-out).
        out_dir: where the new ``dataset.json`` goes; its entries point back at the source files.
        cases: image file stems to keep (``example_ct`` for ``imagesTr/example_ct.nii.gz``); None keeps all.
    """
    source, out = Path(source_dir).resolve(), Path(out_dir)
    content = _read_dataset_json(source)
    items = _resolve(source, content["training"], source / "dataset.json", ("image", "label"))
    if cases is not None:
        known = [Path(item["image"]).name.split(".")[0] for item in items]
        missing = sorted(set(cases) - set(known))
        if missing:
            raise DatasetError(f"{source / 'dataset.json'}: no training case named {missing}; it has {known}.")
        items = [item for item, stem in zip(items, known) if stem in cases]
    out.mkdir(parents=True, exist_ok=True)
    relative = [{k: os.path.relpath(v, out.resolve()) for k, v in item.items()} for item in items]
    fitted = {
        **content,
        "name": f"{content.get('name', source.name)}-fit",
        "numTraining": len(relative),
        "description": f"training cases of {Path(source_dir).as_posix()} also used as validation cases (fitting, not "
        f"generalisation). {content.get('description', '')}".strip(),
        "training": relative,
        "validation": relative,
    }
    (out / "dataset.json").write_text(json.dumps(fitted, indent=2) + "\n")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="datasets of the CT segmentation bundle")
    commands = parser.add_subparsers(dest="command", required=True)
    phantom = commands.add_parser("phantom", help="write the synthetic CT phantom dataset")
    phantom.add_argument("--out", required=True)
    phantom.add_argument("--num_cases", type=int, default=16)
    phantom.add_argument("--num_validation", type=int, default=4)
    phantom.add_argument("--seed", type=int, default=0)
    example = commands.add_parser("example-ct", help="real CT cases from totalsegmentator==2.18.0's sdist")
    example.add_argument("--out", required=True)
    example.add_argument("--sdist", default=None, help="an already downloaded totalsegmentator-2.18.0.tar.gz")
    fit = commands.add_parser("fit", help="a dataset validating on its own training cases (fitting studies)")
    fit.add_argument("--dataset_dir", required=True, help="source folder with dataset.json")
    fit.add_argument("--out", required=True)
    fit.add_argument("--cases", nargs="+", default=None, help="image stems to keep (default: all training cases)")
    check = commands.add_parser("check", help="run the pre-training checks on a dataset")
    check.add_argument("--dataset_dir", required=True)
    args = parser.parse_args(argv)
    if args.command == "phantom":
        from scripts.phantom import generate

        print(generate(args.out, args.num_cases, args.num_validation, args.seed))
    elif args.command == "example-ct":
        from scripts.example_ct import build_example_ct

        print(build_example_ct(args.out, args.sdist))
    elif args.command == "fit":
        print(write_fit_dataset(args.dataset_dir, args.out, args.cases))
    else:
        try:
            prepare_dataset(args.dataset_dir, generate_if_missing=False)
        except (
            BundleError
        ) as error:  # the data's fault: its message alone (the base class, as this module may be __main__)
            raise SystemExit(f"{args.dataset_dir}: FAILED\n{error}") from None
        print(f"{args.dataset_dir}: OK")


if __name__ == "__main__":
    main()
