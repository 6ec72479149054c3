#!/usr/bin/env bash
# The shared tracking and tuning services, on 127.0.0.1 only:
#   PostgreSQL (databases `mlflow` and `optuna`) and an MLflow tracking server on it that also
#   serves the artifacts.
#
#   scripts/services.sh start    start what is not running (idempotent); prints the time to healthy
#   scripts/services.sh stop     stop both; the data stays in the services folder
#   scripts/services.sh status   what runs where
#   scripts/services.sh env      the shell exports a client needs (eval "$(scripts/services.sh env)")
#
# Environment: PILOT_SERVICES_DIR (default <project>/.services, git-ignored), PILOT_PG_PORT
# (55432), PILOT_MLFLOW_PORT (5050), PILOT_PG_BIN (PostgreSQL's bin folder), MLFLOW (the mlflow
# executable; default .venv/bin/mlflow, else the one on PATH), PILOT_PG_OS_USER (the unprivileged
# user PostgreSQL runs as when this script runs as root; default nobody).
#
# Authentication: PostgreSQL listens on 127.0.0.1 only and asks for a password (scram-sha-256)
# even there. The password is generated on first start and kept in $PILOT_SERVICES_DIR/pgpass
# (libpq's password-file format, mode 600); clients find it through PGPASSFILE.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIR="${PILOT_SERVICES_DIR:-$ROOT/.services}"
PG_PORT="${PILOT_PG_PORT:-55432}"
MLFLOW_PORT="${PILOT_MLFLOW_PORT:-5050}"
PG_USER=pilot                      # the database role
PGDATA="$DIR/postgres"
PGPASS="$DIR/pgpass"
MLFLOW_PID="$DIR/mlflow.pid"

find_pg_bin() {
  if [ -n "${PILOT_PG_BIN:-}" ]; then echo "$PILOT_PG_BIN"; return; fi
  local candidate
  candidate="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1 || true)"
  if [ -n "$candidate" ] && [ -x "$candidate/postgres" ]; then echo "$candidate"; return; fi
  command -v pg_ctl >/dev/null && dirname "$(command -v pg_ctl)" && return
  echo "PostgreSQL is not installed (no pg_ctl): install it (apt-get install postgresql) or set PILOT_PG_BIN." >&2
  exit 1
}

find_mlflow() {
  if [ -n "${MLFLOW:-}" ]; then echo "$MLFLOW"; return; fi
  if [ -x "$ROOT/.venv/bin/mlflow" ]; then echo "$ROOT/.venv/bin/mlflow"; return; fi
  command -v mlflow && return
  echo "mlflow is not installed: run \`make install\` or set MLFLOW to the mlflow executable." >&2
  exit 1
}

# PostgreSQL refuses to run as root: as root, run it as an unprivileged user.
as_pg() {
  if [ "$(id -u)" = 0 ]; then runuser -u "${PILOT_PG_OS_USER:-nobody}" -- "$@"; else "$@"; fi
}

now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

pg_running() { [ -f "$PGDATA/postmaster.pid" ] && as_pg "$PG_BIN/pg_ctl" status -D "$PGDATA" >/dev/null 2>&1; }

# The port of the running cluster (4th line of postmaster.pid), which wins over PILOT_PG_PORT.
pg_port() { if pg_running; then sed -n 4p "$PGDATA/postmaster.pid"; else echo "$PG_PORT"; fi; }

mlflow_alive() { [ -f "$MLFLOW_PID" ] && kill -0 "$(cat "$MLFLOW_PID")" 2>/dev/null; }
mlflow_port() { if mlflow_alive && [ -f "$DIR/mlflow.port" ]; then cat "$DIR/mlflow.port"; else echo "$MLFLOW_PORT"; fi; }
mlflow_healthy() { curl -fsS -m 2 "http://127.0.0.1:$1/health" >/dev/null 2>&1; }

psql_pilot() { PGPASSFILE="$PGPASS" psql -X -q -h 127.0.0.1 -p "$(pg_port)" -U "$PG_USER" "$@"; }

init_cluster() {
  mkdir -p "$DIR"
  if [ ! -f "$PGPASS" ]; then
    (umask 077; echo "127.0.0.1:*:*:$PG_USER:$(openssl rand -hex 24)" > "$PGPASS")
  fi
  [ -f "$PGDATA/PG_VERSION" ] && return
  if [ "$(id -u)" = 0 ]; then
    local os_user="${PILOT_PG_OS_USER:-nobody}"
    if ! runuser -u "$os_user" -- test -x "$DIR"; then
      echo "PostgreSQL runs as '$os_user' (it refuses root), who cannot enter '$DIR': make its parent folders world-executable (chmod o+x) or set PILOT_SERVICES_DIR." >&2
      exit 1
    fi
    mkdir -p "$PGDATA"; chown "$os_user" "$PGDATA"; chmod 700 "$PGDATA"
  fi
  echo "Creating the PostgreSQL cluster in $PGDATA"
  local pwfile="$DIR/.initdb-password"
  (umask 077; cut -d: -f5 "$PGPASS" >"$pwfile")
  [ "$(id -u)" = 0 ] && chown "${PILOT_PG_OS_USER:-nobody}" "$pwfile"
  as_pg "$PG_BIN/initdb" -D "$PGDATA" -U "$PG_USER" --pwfile="$pwfile" --auth=scram-sha-256 -E UTF8 \
    --locale=C.UTF-8 >"$DIR/initdb.log" 2>&1 || { rm -f "$pwfile"; cat "$DIR/initdb.log" >&2; exit 1; }
  rm -f "$pwfile"
}

start_pg() {
  if pg_running; then echo "PostgreSQL already running on 127.0.0.1:$(pg_port)"; return; fi
  rm -f "$DIR/postgres.log"; touch "$DIR/postgres.log"
  [ "$(id -u)" = 0 ] && chown "${PILOT_PG_OS_USER:-nobody}" "$DIR/postgres.log"
  # TCP on 127.0.0.1 only; no Unix socket (its path would be limited to ~100 characters).
  if ! as_pg "$PG_BIN/pg_ctl" start -D "$PGDATA" -l "$DIR/postgres.log" -w -t 60 \
      -o "-c listen_addresses=127.0.0.1 -c port=$PG_PORT -c unix_socket_directories='' -c max_connections=200" >/dev/null; then
    echo "PostgreSQL did not start (port $PG_PORT taken? set PILOT_PG_PORT); its log:" >&2
    tail -20 "$DIR/postgres.log" >&2
    exit 1
  fi
  echo "PostgreSQL started on 127.0.0.1:$PG_PORT"
  for database in mlflow optuna; do
    if [ -z "$(psql_pilot -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname = '$database'")" ]; then
      psql_pilot -d postgres -c "CREATE DATABASE $database"
    fi
  done
}

start_mlflow() {
  local port
  if mlflow_alive; then
    port="$(mlflow_port)"
    for _ in $(seq 120); do mlflow_healthy "$port" && break; sleep 0.5; done
    echo "MLflow server already running at http://127.0.0.1:$port"
    return
  fi
  port="$MLFLOW_PORT"
  if mlflow_healthy "$port"; then
    echo "Another server already answers on 127.0.0.1:$port: stop it or set PILOT_MLFLOW_PORT." >&2
    exit 1
  fi
  mkdir -p "$DIR/mlartifacts"
  # setsid: the server outlives this shell; its process group is stopped as one.
  PGPASSFILE="$PGPASS" setsid "$(find_mlflow)" server \
    --backend-store-uri "postgresql+psycopg://$PG_USER@127.0.0.1:$(pg_port)/mlflow" \
    --artifacts-destination "$DIR/mlartifacts" --serve-artifacts \
    --host 127.0.0.1 --port "$port" --workers 2 >"$DIR/mlflow.log" 2>&1 </dev/null &
  echo $! >"$MLFLOW_PID"
  echo "$port" >"$DIR/mlflow.port"
  for _ in $(seq 240); do
    if mlflow_healthy "$port"; then echo "MLflow server started at http://127.0.0.1:$port"; return; fi
    if ! mlflow_alive; then break; fi
    sleep 0.25
  done
  echo "The MLflow server did not become healthy; its log ($DIR/mlflow.log):" >&2
  tail -20 "$DIR/mlflow.log" >&2
  exit 1
}

stop_mlflow() {
  if mlflow_alive; then
    local pid; pid="$(cat "$MLFLOW_PID")"
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid"
    for _ in $(seq 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
    kill -KILL -- "-$pid" 2>/dev/null || true
    echo "MLflow server stopped"
  else
    echo "MLflow server not running"
  fi
  rm -f "$MLFLOW_PID"
}

stop_pg() {
  if pg_running; then
    as_pg "$PG_BIN/pg_ctl" stop -D "$PGDATA" -m fast -w >/dev/null
    echo "PostgreSQL stopped (data kept in $PGDATA)"
  else
    echo "PostgreSQL not running"
  fi
}

# The project's own services: let `kedro run --env shared` find the password (conf/shared/mlflow.yml
# exports the pilot_services credentials as environment variables). Never for another services folder.
register_credentials() {
  [ -z "${PILOT_SERVICES_DIR:-}" ] || return 0
  local credentials="$ROOT/conf/local/credentials.yml"
  grep -qs '^pilot_services:' "$credentials" && return 0
  mkdir -p "$ROOT/conf/local"
  printf '\n# Written by scripts/services.sh: the local PostgreSQL password file (libpq format).\npilot_services:\n  PGPASSFILE: %s\n' "$PGPASS" >>"$credentials"
  echo "Added the entry pilot_services (PGPASSFILE) to conf/local/credentials.yml"
}

print_env() {
  echo "export MLFLOW_TRACKING_URI=http://127.0.0.1:$(mlflow_port)"
  echo "export PILOT_OPTUNA_STORAGE=postgresql+psycopg://$PG_USER@127.0.0.1:$(pg_port)/optuna"
  echo "export PGPASSFILE=$PGPASS"
}

PG_BIN="$(find_pg_bin)"
case "${1:-}" in
  start)
    started="$(now)"
    init_cluster
    start_pg
    start_mlflow
    register_credentials
    echo "Services healthy after $(elapsed "$started") s. Clients: eval \"\$(scripts/services.sh env)\""
    ;;
  stop)
    stop_mlflow
    stop_pg
    ;;
  status)
    if pg_running; then echo "PostgreSQL: running on 127.0.0.1:$(pg_port)"; else echo "PostgreSQL: stopped"; fi
    if mlflow_alive && mlflow_healthy "$(mlflow_port)"; then echo "MLflow: healthy at http://127.0.0.1:$(mlflow_port)"
    elif mlflow_alive; then echo "MLflow: starting (not healthy yet)"; else echo "MLflow: stopped"; fi
    pg_running && mlflow_alive
    ;;
  env)
    print_env
    ;;
  *)
    echo "usage: $0 start|stop|status|env" >&2
    exit 2
    ;;
esac
