#!/usr/bin/env bash
# Run the tests marked `rig` inside the nested KVM+VFIO+iommufd+mdev rig.
#
# Called by .ci/run after the host tests as `bash .ci/rig.sh`. The harness
# (python -m tests.rig) installs the host packages it needs (apt-get, only
# when missing), downloads and builds what it lacks into its cache
# (~/.cache/pyvmm-rig, or $PYVMM_RIG_CACHE), and exits non-zero when the rig
# or any test fails. pytest's summary is printed by pytest inside the rig.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PY=${PYTHON:-python3}
# pytest runs inside the rig on the host's own Python: it must be installed.
"$PY" -c 'import pytest' 2>/dev/null || "$PY" -m pip install -q 'pytest>=7' || exit 1

start=$(date +%s)
"$PY" -m tests.rig --timeout "${PYVMM_RIG_TIMEOUT:-3600}" -- \
	"$PY" -m pytest -p tests.rig.pytest_plugin -m rig -ra tests
rc=$?
echo "rig: .ci/rig.sh took $(($(date +%s) - start))s, exit status $rc"
exit "$rc"
