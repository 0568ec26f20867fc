#!/usr/bin/env bash
# Creates the Label Studio server venv (its Django pins clash with the project's: pyarrow<25, pytz<2023).
# Idempotent: does nothing when the venv already holds the pinned version.
# Usage: install.sh VENV_DIR [PYTHON]
set -euo pipefail
VENV="${1:?usage: install.sh VENV_DIR [PYTHON]}"
PYTHON="${2:-python3}"
VERSION="${BAYESCURATE_LS_VERSION:-1.23.2}"
if [ -x "$VENV/bin/python" ] && \
   [ "$("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("label-studio"))' 2>/dev/null)" = "$VERSION" ]; then
    exit 0
fi
"$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q "label-studio==$VERSION"
