#!/usr/bin/env bash
# Prefect on PostgreSQL, on this machine: a PostgreSQL cluster, a Prefect server that keeps its
# state there, the `mpd` process work pool, and a worker polling it.
#
#   scripts/prefect-postgres.sh start     start what is not running yet (idempotent)
#   scripts/prefect-postgres.sh stop      stop the worker, the server and PostgreSQL
#   scripts/prefect-postgres.sh status    what runs, and the PREFECT_API_URL to export
#
# Settings (environment): MPD_SERVICES_DIR (default .services: the cluster's data, logs, pid
# files), PG_PORT (54329), PREFECT_PORT (4200), PYTHON (.venv/bin/python), WORKER (1; 0 = no
# worker), POOL (mpd, the pool prefect.yaml names). PostgreSQL refuses to run as root: as root,
# it runs as the `postgres` user, which must be able to reach MPD_SERVICES_DIR.
# `make prefect-postgres` / `make prefect-postgres-stop` call this with the defaults.
set -euo pipefail

ACTION=${1:-status}
DIR=$(realpath -m "${MPD_SERVICES_DIR:-.services}")
PG_PORT=${PG_PORT:-54329}
PREFECT_PORT=${PREFECT_PORT:-4200}
PY=${PYTHON:-.venv/bin/python}
WORKER=${WORKER:-1}
POOL=${POOL:-mpd}
PGDATA="$DIR/pg"
DB_URL="postgresql+asyncpg://postgres@127.0.0.1:$PG_PORT/prefect"
API_URL="http://127.0.0.1:$PREFECT_PORT/api"

die() { echo "prefect-postgres: $*" >&2; exit 1; }

pg_bin() {
    local bin
    bin=$(pg_config --bindir 2>/dev/null || true)
    [ -x "$bin/initdb" ] || bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
    [ -x "$bin/initdb" ] || die "PostgreSQL not found (Debian: apt-get install postgresql)"
    echo "$bin"
}

as_pg() {  # run a PostgreSQL program as its own user when we are root
    if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

psql_q() { PGOPTIONS="-c client_min_messages=warning" psql -h 127.0.0.1 -p "$PG_PORT" -U postgres -v ON_ERROR_STOP=1 -qAt "$@"; }

start_postgres() {
    local bin; bin=$(pg_bin)
    mkdir -p "$PGDATA"
    if [ "$(id -u)" = 0 ]; then
        chown postgres "$PGDATA"
        runuser -u postgres -- test -w "$PGDATA" \
            || die "user postgres cannot reach $PGDATA: set MPD_SERVICES_DIR to a directory it can traverse"
    fi
    if [ ! -f "$PGDATA/PG_VERSION" ]; then
        as_pg "$bin/initdb" -D "$PGDATA" -U postgres --auth=trust -E UTF8 >"$DIR/initdb.log" 2>&1 \
            || die "initdb failed: $(tail -3 "$DIR/initdb.log")"
    fi
    if ! as_pg "$bin/pg_ctl" -D "$PGDATA" status >/dev/null 2>&1; then
        as_pg "$bin/pg_ctl" -D "$PGDATA" -l "$PGDATA/server.log" -w -t 60 \
            -o "-p $PG_PORT -k $PGDATA -c listen_addresses=127.0.0.1" start >/dev/null \
            || die "PostgreSQL did not start: $(tail -3 "$PGDATA/server.log")"
    fi
    if [ "$(psql_q -d postgres -c "select 1 from pg_database where datname = 'prefect'")" != 1 ]; then
        psql_q -d postgres -c "create database prefect"
    fi
    psql_q -d prefect -c "create extension if not exists pg_trgm"  # Prefect's search indexes
    echo "postgres: 127.0.0.1:$PG_PORT, database prefect ($PGDATA)"
}

start_server() {
    if alive "$DIR/server.pid"; then echo "prefect server: running ($API_URL)"; return; fi
    mkdir -p "$DIR/prefect"
    env -u PREFECT_API_URL PREFECT_HOME="$DIR/prefect" \
        PREFECT_API_DATABASE_CONNECTION_URL="$DB_URL" PREFECT_SERVER_ANALYTICS_ENABLED=false \
        setsid "$PY" -m prefect server start --host 127.0.0.1 --port "$PREFECT_PORT" \
        >"$DIR/server.log" 2>&1 </dev/null &
    echo $! >"$DIR/server.pid"
    for _ in $(seq 1 180); do
        if curl -sf "$API_URL/health" >/dev/null 2>&1; then
            echo "prefect server: $API_URL (state in PostgreSQL)"
            return
        fi
        alive "$DIR/server.pid" || break
        sleep 1
    done
    die "the Prefect server did not answer at $API_URL: $(tail -5 "$DIR/server.log")"
}

start_worker() {
    export PREFECT_API_URL="$API_URL"
    "$PY" -m prefect --no-prompt work-pool inspect "$POOL" >/dev/null 2>&1 \
        || "$PY" -m prefect --no-prompt work-pool create "$POOL" --type process >/dev/null
    echo "work pool: $POOL (process)"
    [ "$WORKER" = 1 ] || return 0
    if alive "$DIR/worker.pid"; then echo "worker: running"; return; fi
    setsid "$PY" -m prefect worker start --pool "$POOL" >"$DIR/worker.log" 2>&1 </dev/null &
    echo $! >"$DIR/worker.pid"
    echo "worker: polling $POOL (log $DIR/worker.log)"
}

stop_pid() {  # the process group a pid file names, TERM then KILL
    local file=$1
    if alive "$file"; then
        local pid; pid=$(cat "$file")
        kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 1 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
        kill -KILL -- "-$pid" 2>/dev/null || true
    fi
    rm -f "$file"
}

case "$ACTION" in
start)
    command -v psql >/dev/null || die "psql not found (Debian: apt-get install postgresql-client)"
    [ -x "$PY" ] || die "$PY not found: run make first (or set PYTHON)"
    mkdir -p "$DIR"
    start_postgres
    start_server
    start_worker
    echo "export PREFECT_API_URL=$API_URL"
    ;;
stop)
    stop_pid "$DIR/worker.pid"
    stop_pid "$DIR/server.pid"
    if [ -f "$PGDATA/PG_VERSION" ]; then
        as_pg "$(pg_bin)/pg_ctl" -D "$PGDATA" -m fast -w stop >/dev/null 2>&1 || true
    fi
    echo "stopped (data kept in $DIR)"
    ;;
status)
    if [ -f "$PGDATA/PG_VERSION" ] && as_pg "$(pg_bin)/pg_ctl" -D "$PGDATA" status >/dev/null 2>&1; then
        echo "postgres: running on 127.0.0.1:$PG_PORT"
    else
        echo "postgres: stopped"
    fi
    alive "$DIR/server.pid" && echo "prefect server: $API_URL" || echo "prefect server: stopped"
    alive "$DIR/worker.pid" && echo "worker: running" || echo "worker: stopped"
    ;;
*)
    die "usage: $0 start|stop|status"
    ;;
esac
