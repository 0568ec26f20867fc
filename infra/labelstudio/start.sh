#!/usr/bin/env bash
# Runs the Label Studio server in the foreground (exec, so the recorded pid is the server itself).
# Called by connectors/services.py, which picks the port and sets the LABEL_STUDIO_* environment
# (data dir, admin user, legacy token, local-files root). Needs the venv made by install.sh.
set -euo pipefail
: "${BAYESCURATE_LS_VENV:?path of the Label Studio venv}"
: "${BAYESCURATE_LS_PORT:?port to listen on}"
: "${LABEL_STUDIO_BASE_DATA_DIR:?data dir}"
exec "$BAYESCURATE_LS_VENV/bin/label-studio" start \
    --no-browser \
    --internal-host 127.0.0.1 \
    --port "$BAYESCURATE_LS_PORT" \
    --data-dir "$LABEL_STUDIO_BASE_DATA_DIR"
