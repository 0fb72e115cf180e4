"""The bundle behind a real `monailabel start_server`, driven over HTTP the way 3D Slicer's MONAI Label plugin
drives it.

One server for the module: MONAI Label 0.8.5's own `monaibundle` sample app (the folder that
`monailabel apps --download --name monaibundle` copies out of the installation), a copy of this bundle as its
model `ct_organ_segmentation` (training rewrites `models/model.pt`), and a studies folder of tiny phantom cases:
four labelled ones to train on and an unlabelled one to segment. The server listens on 127.0.0.1 on a free port,
runs in a process group of its own, and the group is killed when the module ends, whatever happened. Requests carry
the parameters the Slicer plugin sends: each option of the model's or trainer's `config` in /info/ with the first
entry of a list.

Needs the environment of `bash .ci/install-monailabel.sh .venv-monailabel server`; skipped, with that
instruction, where MONAI Label or its server-side packages are missing.
"""

import contextlib
import email.parser
import email.policy
import gzip
import hashlib
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

pytest.importorskip(
    "monailabel",
    reason="MONAI Label is not installed here: `bash .ci/install-monailabel.sh .venv-monailabel server` builds "
    ".venv-monailabel, then run `.venv-monailabel/bin/python -m pytest -m monailabel tests/deploy`",
)
for _module in ("fastapi", "uvicorn", "requests_toolbelt", "pydicom_seg"):
    if importlib.util.find_spec(_module) is None:
        pytest.skip(
            f"{_module} is missing: `monailabel start_server` needs the server packages of "
            "`bash .ci/install-monailabel.sh .venv-monailabel server`",
            allow_module_level=True,
        )
pytestmark = pytest.mark.monailabel

BUNDLE_ROOT = Path(__file__).resolve().parents[2]
MODEL = "ct_organ_segmentation"
START_UP_S = 180  # the server answers /info/ after about 20 s on 2 busy cores
REQUEST_S = 180  # one inference or `monai.bundle run`: 10-30 s
TRAIN_S = 300  # the training request: about 90 s, a third of it the training process' start-up

# `monailabel start_server` imports `torchvision.utils` (make_grid, save_image) at module level through
# monailabel.transform.post, which BundleInferTask imports; the bundle tasks never call either function. No PyPI
# build of torchvision loads next to the CPU torch==2.13.0 ("operator torchvision::nms does not exist"), so the
# MONAI Label environment has none and the server stops with "No module named 'torchvision'". The server (and
# the training process it starts, which inherits its environment) get this two-function stand-in through
# PYTHONPATH; the test process itself never imports it. Anything that calls it fails loudly.
TORCHVISION_STAND_IN = '''"""Stand-in written by tests/deploy/test_monailabel_server.py: satisfies MONAI Label's import only."""


def make_grid(*args, **kwargs):
    raise RuntimeError("torchvision is not installed; this stand-in only satisfies MONAI Label's import")


save_image = make_grid
'''


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def log_tail(log: Path, lines: int = 40) -> str:
    text = log.read_text(errors="replace").splitlines() if log.exists() else []
    return "\n".join([f"--- {log.name} (last lines) ---", *text[-lines:]])


def stop_process_group(process: subprocess.Popen):
    """SIGTERM to a process group started with start_new_session (for the server: the server and the training
    processes it starts), then SIGKILL to whatever is left of it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=20)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=20)


def first_options(config: dict) -> dict:
    """The request parameters the Slicer plugin sends by default: each option of a model's or trainer's
    `config` in /info/, with the first entry of a list (what its table shows); the device is set to the CPU, as
    for the `monai.bundle run` the masks are compared with."""
    return {**{key: value[0] if isinstance(value, list) else value for key, value in config.items()}, "device": "cpu"}


class BundleRun:
    """`python -m monai.bundle run --config_file configs/inference.json` in the bundle folder on one image with
    one checkpoint, started in the background (it overlaps the server's work on 2 cores)."""

    def __init__(self, bundle: Path, image: Path, checkpoint: Path, out: Path):
        command = [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json"]
        command += ["--bundle_root", str(bundle), "--input", str(image), "--output_dir", str(out)]
        command += ["--ckpt_path", str(checkpoint), "--device", "cpu"]
        self.out, self.log = out, out.with_name(out.name + ".log")
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                command, cwd=bundle, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

    def mask(self) -> np.ndarray:
        """The mask it wrote, as an array."""
        try:
            code = self.process.wait(timeout=REQUEST_S)
        except subprocess.TimeoutExpired:
            self.stop()
            pytest.fail(f"monai.bundle run took over {REQUEST_S} s\n{log_tail(self.log)}")
        assert code == 0, f"monai.bundle run failed ({code})\n{log_tail(self.log)}"
        (written,) = self.out.glob("*.nii.gz")
        return np.asarray(nib.load(written).dataobj)

    def stop(self):
        if self.process.poll() is None:
            stop_process_group(self.process)


@dataclass
class Layout:
    app: Path  # apps/monaibundle
    bundle: Path  # apps/monaibundle/model/ct_organ_segmentation
    studies: Path
    image: Path  # the unlabelled study
    stand_in: Path  # the folder holding the torchvision stand-in package


class Server:
    """A running `monailabel start_server` and its HTTP API."""

    def __init__(self, url: str, process: subprocess.Popen, log: Path):
        self.url, self.process, self.log = url, process, log

    def log_tail(self) -> str:
        return log_tail(self.log)

    def request(self, method: str, path: str, body=None, headers=None, timeout=REQUEST_S):
        """(status, content type, body bytes) of one HTTP request; HTTP errors are returned, not raised."""
        req = urllib.request.Request(self.url + path, data=body, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as response:
                return response.status, response.headers.get("content-type", ""), response.read()
        except urllib.error.HTTPError as error:
            return error.code, error.headers.get("content-type", ""), error.read()

    def get_json(self, path: str):
        status, _, body = self.request("GET", path)
        assert status == 200, f"GET {path}: HTTP {status} {body[:500]!r}\n{self.log_tail()}"
        return json.loads(body)

    def post_json(self, path: str, content: dict):
        status, _, body = self.request("POST", path, json.dumps(content).encode(), {"Content-Type": "application/json"})
        assert status == 200, f"POST {path}: HTTP {status} {body[:500]!r}\n{self.log_tail()}"
        return json.loads(body)

    def infer(self, image_id: str, params: dict) -> tuple[dict, nib.Nifti1Image]:
        """`POST /infer/<model>?image=<id>` with the form field `params`, as the Slicer plugin sends it. The
        answer (no `output` asked for) is multipart: `params` (JSON) and `image` (the label volume)."""
        boundary = uuid.uuid4().hex
        form = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="params"\r\n\r\n{json.dumps(params)}\r\n'
            f"--{boundary}--\r\n"
        ).encode()
        headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
        status, content_type, body = self.request("POST", f"/infer/{MODEL}?image={image_id}", form, headers)
        assert status == 200, f"POST /infer/{MODEL}: HTTP {status} {body[:500]!r}\n{self.log_tail()}"
        assert content_type.startswith("multipart/"), content_type
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
            b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + body
        )
        parts = {
            p.get_param("name", header="content-disposition"): p.get_payload(decode=True) for p in message.iter_parts()
        }
        assert set(parts) == {"params", "image"}, f"multipart fields {sorted(parts)}"
        volume = parts["image"]
        volume = gzip.decompress(volume) if volume[:2] == b"\x1f\x8b" else volume
        return json.loads(parts["params"]), nib.Nifti1Image.from_bytes(volume)


@pytest.fixture(scope="module")
def layout(tiny_phantom, tmp_path_factory) -> Layout:
    root = tmp_path_factory.mktemp("monailabel_server")

    # the sample app, as `monailabel apps --download --name monaibundle --output apps` copies it out of the
    # installation (that command spends 20 s importing MONAI for a copytree, so the test copies the folder itself)
    sample_app = Path(sys.prefix) / "monailabel" / "sample-apps" / "monaibundle"
    assert (sample_app / "main.py").is_file(), f"MONAI Label's monaibundle sample app is not at {sample_app}"
    app = root / "apps" / "monaibundle"
    shutil.copytree(sample_app, app, ignore=shutil.ignore_patterns("logs", "model", "__pycache__"))
    bundle = app / "model" / MODEL
    for part in ("configs", "ctlosses", "scripts", "models"):
        shutil.copytree(BUNDLE_ROOT / part, bundle / part, ignore=shutil.ignore_patterns("__pycache__", "model.*.pt"))
    assert (bundle / "models" / "model.pt").is_file(), "the bundle ships no models/model.pt"

    # studies: the four training cases with their labels under labels/final (MONAI Label trains on those), and
    # one validation case without a label, to segment
    studies = root / "studies"
    (studies / "labels" / "final").mkdir(parents=True)
    content = json.loads((tiny_phantom / "dataset.json").read_text())
    for item in content["training"]:
        shutil.copy(tiny_phantom / item["image"], studies / Path(item["image"]).name)
        shutil.copy(tiny_phantom / item["label"], studies / "labels" / "final" / Path(item["image"]).name)
    image = studies / Path(content["validation"][0]["image"]).name
    shutil.copy(tiny_phantom / content["validation"][0]["image"], image)
    # not RAS-aligned, so that a missed inversion of the bundle's Orientationd would show
    assert nib.aff2axcodes(nib.load(image).affine) != ("R", "A", "S")

    stand_in = root / "stand_in"
    (stand_in / "torchvision").mkdir(parents=True)
    (stand_in / "torchvision" / "__init__.py").write_text('"""Stand-in package; see utils.py."""\n')
    (stand_in / "torchvision" / "utils.py").write_text(TORCHVISION_STAND_IN)
    return Layout(app=app, bundle=bundle, studies=studies, image=image, stand_in=stand_in)


@pytest.fixture(scope="module")
def shipped_weights(layout, tmp_path_factory) -> Path:
    """A copy of the bundle's models/model.pt taken before any training request."""
    copy = tmp_path_factory.mktemp("shipped") / "model.pt"
    shutil.copy(layout.bundle / "models" / "model.pt", copy)
    return copy


@pytest.fixture(scope="module")
def shipped_reference(layout, shipped_weights):
    """`monai.bundle run` with the shipped weights on the unlabelled study, started before the server."""
    run = BundleRun(layout.bundle, layout.image, shipped_weights, shipped_weights.parent / "bundle_run")
    try:
        yield run
    finally:
        run.stop()


@pytest.fixture(scope="module")
def server(layout, shipped_reference, tmp_path_factory):
    executable = Path(sys.executable).parent / "monailabel"
    assert executable.is_file(), f"no `monailabel` command next to {sys.executable}"
    port = free_port()
    env = {
        **os.environ,
        "PATH": f"{executable.parent}{os.pathsep}{os.environ.get('PATH', '')}",  # `monailabel` runs `python`
        "PYTHONPATH": str(layout.stand_in),
        "MONAI_LABEL_SESSION_PATH": str(tmp_path_factory.mktemp("sessions")),  # not ~/.cache/monailabel
    }
    # --conf zoo_source github: the bundle folder under model/ is used as it is, without asking the online zoo
    command = [str(executable), "start_server", "--app", str(layout.app), "--studies", str(layout.studies)]
    command += ["--conf", "models", MODEL, "--conf", "zoo_source", "github", "--host", "127.0.0.1", "--port", str(port)]
    log = layout.app.parent.parent / "server.log"
    with log.open("wb") as log_file:
        process = subprocess.Popen(
            command, cwd=log.parent, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
        )
    running = Server(f"http://127.0.0.1:{port}", process, log)
    try:
        deadline = time.monotonic() + START_UP_S
        while True:
            assert process.poll() is None, f"the server exited with {process.returncode}\n{running.log_tail()}"
            assert time.monotonic() < deadline, f"no answer on /info/ after {START_UP_S} s\n{running.log_tail()}"
            with contextlib.suppress(OSError):  # not listening yet
                if running.request("GET", "/info/", timeout=10)[0] == 200:
                    break
            time.sleep(1)
        yield running
    finally:
        stop_process_group(process)


@pytest.fixture(scope="module")
def info(server):
    return server.get_json("/info/")


@pytest.fixture(scope="module")
def first_inference(server, info, layout, shipped_weights):
    """The server's answer for the unlabelled study with the shipped weights."""
    return server.infer(layout.image.name.removesuffix(".nii.gz"), first_options(info["models"][MODEL]["config"]))


@pytest.fixture(scope="module")
def training(server, info, first_inference):
    """One `POST /train/<model>` with the trainer's options as the Slicer plugin sends them, for one epoch on 3
    cases with 1 to validate, followed on `GET /train/` until it ends: the task as the server reports it."""
    params = {**first_options(info["trainers"][MODEL]["config"]), "max_epochs": 1, "val_split": 0.25}
    params["multi_gpu"] = False  # on a machine with several GPUs: the torchrun path, tested in test_monailabel.py
    task_id = server.post_json(f"/train/{MODEL}", params)["id"]
    deadline = time.monotonic() + TRAIN_S
    while True:
        task = server.get_json("/train/")
        assert task["id"] == task_id
        if task["status"] not in ("SUBMITTED", "RUNNING"):
            return task
        assert time.monotonic() < deadline, f"training still {task['status']} after {TRAIN_S} s\n{server.log_tail()}"
        time.sleep(2)


def trainer_runs(server: Server) -> int:
    """How many times a SupervisedTrainer finished a run, by the training process' log in the server's."""
    lines = server.log.read_text(errors="replace").splitlines()
    return sum("SupervisedTrainer" in line and "Engine run finished" in line for line in lines)


def organ_labels(bundle: Path) -> dict[str, int]:
    metadata = json.loads((bundle / "configs" / "metadata.json").read_text())
    channels = metadata["network_data_format"]["outputs"]["pred"]["channel_def"]
    return {name: int(index) for index, name in channels.items() if name != "background"}


def test_info_lists_the_model_its_13_organs_and_its_trainer(server, info, layout):
    organs = organ_labels(layout.bundle)
    assert len(organs) == 13 and sorted(organs.values()) == list(range(1, 14))
    assert list(info["models"]) == [MODEL], f"models served: {list(info['models'])}"
    model = info["models"][MODEL]
    assert model["type"] == "segmentation" and model["dimension"] == 3
    assert model["labels"] == organs
    assert sorted(info["labels"]) == sorted(organs)
    assert list(info["trainers"]) == [MODEL]
    # the studies it will train on: the four with a label under labels/final, of five
    stats = server.get_json("/datastore/?output=stats")
    assert (stats["total"], stats["completed"]) == (5, 4), stats


def test_infer_returns_the_mask_of_monai_bundle_run(layout, first_inference, shipped_reference):
    params, volume = first_inference
    assert params["label_names"] == organ_labels(layout.bundle)
    source = nib.load(layout.image)
    assert volume.shape == source.shape
    np.testing.assert_allclose(volume.affine, source.affine, atol=1e-4)
    mask = np.asarray(volume.dataobj)
    np.testing.assert_array_equal(mask, shipped_reference.mask())
    assert len(np.unique(mask)) > 2, f"the shipped model segments (almost) nothing: labels {np.unique(mask)}"


def test_train_one_epoch_then_infer_uses_the_new_weights(
    server, info, layout, first_inference, shipped_weights, training
):
    details = "\n".join(training.get("details", []))
    assert training["status"] == "DONE", f"training ended {training['status']}:\n{details}\n{server.log_tail()}"
    assert training["request"]["max_epochs"] == 1
    assert trainer_runs(server) >= 1, f"no trainer run in the server's log\n{server.log_tail()}"

    # the epoch validated and saved new weights over models/model.pt; the shipped ones were kept aside
    checkpoint = layout.bundle / "models" / "model.pt"
    assert sha256(checkpoint) != sha256(shipped_weights), f"models/model.pt was not rewritten:\n{details}"
    kept = [p for p in checkpoint.parent.glob("model.*.pt") if sha256(p) == sha256(shipped_weights)]
    assert len(kept) == 1, f"the shipped weights were not kept aside: {sorted(checkpoint.parent.iterdir())}"

    # the next inference uses them: it is the mask `monai.bundle run` gives with the new checkpoint, and not the
    # mask the server gave with the shipped one
    trained = shutil.copy(checkpoint, shipped_weights.parent / "trained.pt")
    reference = BundleRun(layout.bundle, layout.image, Path(trained), shipped_weights.parent / "bundle_run_trained")
    try:
        _, volume = server.infer(
            layout.image.name.removesuffix(".nii.gz"), first_options(info["models"][MODEL]["config"])
        )
        mask = np.asarray(volume.dataobj)
        assert (mask != np.asarray(first_inference[1].dataobj)).any(), "the mask after training is the shipped one's"
        np.testing.assert_array_equal(mask, reference.mask())
    finally:
        reference.stop()


# MONAI Label 0.8.5 lists `run_id: ""` among its trainer's options in /info/ and the Slicer plugin sends it back;
# BundleTrainTask passes it on to monai.bundle.run, which then evaluates the whole of train.json (the config's root
# has the ID ""), not only its `run` list. train.json is written for that: `"training": "@run"` refers to the run
# list (a copy, "%run", ran the trainer a second time), and the dataset is prepared only inside the datalist keys
# that MONAI Label replaces (a top-level expression generated the phantom into the bundle's data/).


def test_a_training_request_runs_the_trainer_once(server, training):
    assert trainer_runs(server) == 1, f"{trainer_runs(server)} trainer runs for one training request of 1 epoch"


def test_a_training_request_writes_no_dataset_into_the_bundle(layout, training):
    assert not (layout.bundle / "data").exists(), sorted(p.name for p in (layout.bundle / "data").rglob("*"))[:5]
