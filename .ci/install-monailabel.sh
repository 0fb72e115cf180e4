#!/usr/bin/env bash
# Builds a separate virtual environment with MONAI Label 0.8.5 for the `monailabel`-marked tests
# (tests/deploy/test_monailabel.py), without touching the main .venv: the extra packages below must not hide a
# missing pin of the bundle itself from the main test run.
#
# Why not `pip install monailabel==0.8.5`: its requirements pull in torchvision (no PyPI build of it loads next to
# the CPU torch==2.13.0: "operator torchvision::nms does not exist") and sam2, and a resolver run over dozens of
# server-side packages. MONAI Label is installed with --no-deps plus only what BundleInferTask / BundleTrainTask /
# LocalDatastore import (found by importing them in a clean environment until nothing was missing).
#
# usage: bash .ci/install-monailabel.sh [VENV_DIR]   (default .venv-monailabel, from the repository root)
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-.venv-monailabel}"

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
"$venv/bin/python" -c "import monailabel; print('monailabel', monailabel.__version__, 'in', '$venv')"
