#!/usr/bin/env bash
# An S3-compatible server on this machine (moto's server mode), for object-storage workspaces
# without a cloud account: the tests run against it, and so can a trial of `workspace: s3://…`.
#
#   scripts/s3-server.sh start [BUCKET]   start it (idempotent) and create BUCKET (default mpd)
#   scripts/s3-server.sh stop             stop it (its objects live in memory: they go too)
#   scripts/s3-server.sh status           whether it runs, and the environment to export
#
# Settings (environment): MPD_SERVICES_DIR (default .services: pid file and log), S3_PORT
# (9000), PYTHON (.venv/bin/python). `make s3-server` / `make s3-server-stop` call this.
set -euo pipefail

ACTION=${1:-status}
BUCKET=${2:-mpd}
DIR=$(realpath -m "${MPD_SERVICES_DIR:-.services}")
PORT=${S3_PORT:-9000}
PY=${PYTHON:-.venv/bin/python}
URL="http://127.0.0.1:$PORT"
PID="$DIR/s3.pid"

die() { echo "s3-server: $*" >&2; exit 1; }
alive() { [ -f "$PID" ] && kill -0 "$(cat "$PID")" 2>/dev/null; }
env_lines() {
    echo "export AWS_ENDPOINT_URL=$URL AWS_ACCESS_KEY_ID=mpd AWS_SECRET_ACCESS_KEY=mpd AWS_DEFAULT_REGION=us-east-1"
}

case "$ACTION" in
start)
    mkdir -p "$DIR"
    if ! alive; then
        "$PY" -m moto.server -H 127.0.0.1 -p "$PORT" >"$DIR/s3.log" 2>&1 &
        echo $! >"$PID"
        for _ in $(seq 1 100); do
            "$PY" - "$URL" <<'PY' 2>/dev/null && break
import sys, urllib.request
urllib.request.urlopen(sys.argv[1], timeout=1)
PY
            alive || die "the server exited: $(tail -3 "$DIR/s3.log")"
            sleep 0.2
        done
    fi
    AWS_ACCESS_KEY_ID=mpd AWS_SECRET_ACCESS_KEY=mpd "$PY" - "$URL" "$BUCKET" <<'PY' || die "cannot create bucket $BUCKET"
import sys, boto3
s3 = boto3.client("s3", endpoint_url=sys.argv[1], region_name="us-east-1")
if sys.argv[2] not in [b["Name"] for b in s3.list_buckets()["Buckets"]]:
    s3.create_bucket(Bucket=sys.argv[2])
PY
    echo "s3-server: $URL (bucket $BUCKET); for mpd:" >&2
    env_lines
    ;;
stop)
    if alive; then kill "$(cat "$PID")"; fi
    rm -f "$PID"
    ;;
status)
    if alive; then echo "s3-server: running at $URL (pid $(cat "$PID"))" >&2; env_lines; else echo "s3-server: not running" >&2; exit 3; fi
    ;;
*)
    die "usage: $0 start [BUCKET] | stop | status"
    ;;
esac
