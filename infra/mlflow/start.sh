#!/usr/bin/env bash
# Runs the MLflow tracking server in the foreground (exec, so the recorded pid is the server itself):
# sqlite backend store, proxied artifact store, one worker, job execution and telemetry off.
# Called by connectors/services.py, which picks the port.
set -euo pipefail
: "${BAYESCURATE_MLFLOW_PYTHON:?python with mlflow installed}"
: "${BAYESCURATE_MLFLOW_DIR:?state dir holding mlflow.db and artifacts/}"
: "${BAYESCURATE_MLFLOW_PORT:?port to listen on}"
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false
export MLFLOW_DISABLE_TELEMETRY=true
mkdir -p "$BAYESCURATE_MLFLOW_DIR/artifacts"
exec "$BAYESCURATE_MLFLOW_PYTHON" -m mlflow server \
    --backend-store-uri "sqlite:///$BAYESCURATE_MLFLOW_DIR/mlflow.db" \
    --artifacts-destination "$BAYESCURATE_MLFLOW_DIR/artifacts" \
    --host 127.0.0.1 \
    --port "$BAYESCURATE_MLFLOW_PORT" \
    --workers 1
