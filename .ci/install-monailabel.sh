#!/usr/bin/env bash
# Builds a separate virtual environment with MONAI Label 0.8.5 for the `monailabel`-marked tests
# (tests/deploy/test_monailabel.py, and with "server" tests/deploy/test_monailabel_server.py), without touching the
# main .venv: the extra packages below must not hide a missing pin of the bundle itself from the main test run.
#
# Why not `pip install monailabel==0.8.5`: its requirements pull in torchvision (no PyPI build of it loads next to
# the CPU torch==2.13.0: "operator torchvision::nms does not exist") and sam2, and a resolver run over dozens of
# server-side packages. MONAI Label is installed with --no-deps plus only what BundleInferTask / BundleTrainTask /
# LocalDatastore import (found by importing them in a clean environment until nothing was missing).
#
# usage: bash .ci/install-monailabel.sh [VENV_DIR] [server]
#   VENV_DIR defaults to .venv-monailabel (relative to the repository root);
#   "server" adds what `monailabel start_server` imports (FastAPI app, DICOM and Girder datastores); without it
#   tests/deploy/test_monailabel_server.py skips itself. The server also imports torchvision.utils at start-up:
#   that test gives it a two-function stand-in on PYTHONPATH (see the test and docs/README.md, "MONAI Label").
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-.venv-monailabel}"
with_server="${2:-}"

[ -x "$venv/bin/python" ] || python3.11 -m venv "$venv"
"$venv/bin/pip" install -q -r requirements-dev.txt
"$venv/bin/pip" install -q --no-deps monailabel==0.8.5
# Module-level imports on the BundleInferTask / BundleTrainTask / LocalDatastore paths: pydantic and
# pydantic-settings (monailabel.config), expiring-dict (transform.cache), pynrrd (transform.writer),
# scikit-image and shapely (transform.post), watchdog (datastore.local).
"$venv/bin/pip" install -q pydantic==2.14.4 pydantic-settings==2.16.3 expiring-dict==1.1.2 pynrrd==1.1.3 \
    scikit-image==0.26.0 shapely==2.2.0 watchdog==7.1.0
# monailabel.transform.writer writes masks with ITK; its NIfTI writer needs only the core and IO wheels
# (about 0.6 GB instead of the 1.5 GB of all six ITK wheels that `itk` depends on).
"$venv/bin/pip" install -q --no-deps itk==5.4.7 itk-core==5.4.7 itk-io==5.4.7
if [ "$with_server" = server ]; then
    # pydicom 2.x: pydicom-seg 0.4.1 needs pydicom._storage_sopclass_uids, gone in pydicom 3;
    # dicomweb-client and pynetdicom are pinned to releases tested with it (newer ones need pydicom 3).
    "$venv/bin/pip" install -q fastapi==0.165.0 uvicorn==0.54.0 python-multipart==0.0.34 requests==2.34.2 \
        requests-toolbelt==1.0.0 pyjwt==2.15.1 passlib==1.7.4 schedule==1.2.2 cachetools==8.0.2 timeloop==1.0.2 \
        psutil==7.2.2 expiringdict==1.2.2 scikit-learn==1.9.1 girder-client==5.0.21 "dicomweb-client[gcp]==0.59.1" \
        pydicom==2.4.4 pydicom-seg==0.4.1 pynetdicom==2.0.2
fi
"$venv/bin/python" -c "import monailabel; print('monailabel', monailabel.__version__, 'in', '$venv')"
