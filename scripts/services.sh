#!/usr/bin/env bash
# The shared tracking and tuning services: PostgreSQL (databases `mlflow`, `mlflow_auth` and
# `optuna`) and an MLflow tracking server on it that also serves the artifacts. See
# docs/shared_services.md.
#
#   scripts/services.sh start       start what is not running (idempotent); prints the time to healthy
#   scripts/services.sh stop        stop both; the data stays in the services folder
#   scripts/services.sh status      what runs where
#   scripts/services.sh env         the shell exports a client on this machine needs
#                                   (eval "$(scripts/services.sh env)")
#   scripts/services.sh env HOST    the exports for a client on another machine that reaches this one
#                                   as HOST (a file to copy there: it holds both passwords)
#   scripts/services.sh config      what `start` would configure (addresses, pg_hba lines); starts nothing
#
# Environment: PILOT_LISTEN (the address both services listen on: 127.0.0.1, the default, or
# 0.0.0.0 for every interface, or one address of this machine), PILOT_CLIENTS (the addresses
# PostgreSQL accepts clients from when it listens beyond loopback, a pg_hba address such as
# 10.0.0.0/8; default all), PILOT_ALLOWED_HOSTS (extra host names, comma-separated, that clients
# may call the MLflow server by; MLflow itself allows localhost and private IP addresses),
# PILOT_SERVICES_DIR (default <project>/.services, git-ignored), PILOT_CREDENTIALS_FILE (the
# Kedro credentials file `start` writes the client's entry pilot_services to; by default
# conf/shared/credentials.yml, for the default services folder only), PILOT_PG_PORT (55432),
# PILOT_MLFLOW_PORT (5050), PILOT_PG_BIN (PostgreSQL's bin folder), MLFLOW (the mlflow
# executable; default .venv/bin/mlflow, else the one on PATH), PILOT_PG_OS_USER (the unprivileged
# user PostgreSQL runs as when this script runs as root; default nobody).
#
# Authentication, on every address, loopback included:
# - PostgreSQL asks for a password (scram-sha-256). It is generated on first start and kept in
#   $PILOT_SERVICES_DIR/pgpass (libpq's password-file format, mode 600); local clients find it
#   through PGPASSFILE, remote ones get it as PGPASSWORD.
# - The MLflow server runs MLflow's basic-auth app: every request but /health needs a user. Two
#   are generated on first start and kept in $PILOT_SERVICES_DIR/mlflow-users (user:password
#   lines, mode 600): `admin`, who manages users, and `pilot`, the account clients use
#   (MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD). Every user may read and write every
#   experiment (default_permission EDIT); the user store is the database mlflow_auth.
# Neither service encrypts its traffic: beyond a trusted network, use an SSH tunnel instead.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIR="${PILOT_SERVICES_DIR:-$ROOT/.services}"
PG_PORT="${PILOT_PG_PORT:-55432}"
MLFLOW_PORT="${PILOT_MLFLOW_PORT:-5050}"
LISTEN="${PILOT_LISTEN:-127.0.0.1}"
PG_USER=pilot                      # the database role
PGDATA="$DIR/postgres"
PGPASS="$DIR/pgpass"
MLFLOW_PID="$DIR/mlflow.pid"
MLFLOW_USERS="$DIR/mlflow-users"   # admin:<password> and pilot:<password>
MLFLOW_SECRET="$DIR/mlflow-secret-key"
MLFLOW_CLIENT_USER=pilot

# The address this machine reaches the services on: loopback, unless they listen on one other address.
case "$LISTEN" in
  127.*|localhost|0.0.0.0|'*') LOCAL=127.0.0.1 ;;
  *) LOCAL="$LISTEN" ;;
esac
beyond_loopback() { case "$LISTEN" in 127.*|localhost) return 1 ;; *) return 0 ;; esac; }
# PostgreSQL always listens on 127.0.0.1 too: the MLflow server and this script connect there.
pg_listen_addresses() {
  case "$LISTEN" in
    127.0.0.1|localhost) echo 127.0.0.1 ;;
    0.0.0.0|'*') echo '*' ;;
    *) echo "127.0.0.1,$LISTEN" ;;
  esac
}

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
# The address a running server listens on (recorded at its start), which wins over PILOT_LISTEN.
listening_on() { if [ -f "$DIR/listen" ]; then cat "$DIR/listen"; else echo "$LISTEN"; fi; }
mlflow_local_host() { case "$(listening_on)" in 127.*|localhost|0.0.0.0|'*') echo 127.0.0.1 ;; *) listening_on ;; esac; }
mlflow_healthy() { curl -fsS -m 2 "http://$(mlflow_local_host):$1/health" >/dev/null 2>&1; }

psql_pilot() { PGPASSFILE="$PGPASS" psql -X -q -h 127.0.0.1 -p "$(pg_port)" -U "$PG_USER" "$@"; }

user_password() { sed -n "s/^$1://p" "$MLFLOW_USERS"; }

# HTTP status of an MLflow REST call: rest USER METHOD PATH [JSON]
rest() {
  local user="$1" method="$2" path="$3" body="${4:-}"
  local url="http://$(mlflow_local_host):$(mlflow_port)/api/2.0/mlflow/$path"
  # the password goes to curl on stdin (a config line), never on its command line
  if [ -n "$body" ]; then
    printf 'user = "%s:%s"\n' "$user" "$(user_password "$user")" | curl -sS -m 10 -o /dev/null -w '%{http_code}' \
      -K - -X "$method" -H 'Content-Type: application/json' -d "$body" "$url"
  else
    printf 'user = "%s:%s"\n' "$user" "$(user_password "$user")" | curl -sS -m 10 -o /dev/null -w '%{http_code}' \
      -K - -X "$method" "$url"
  fi
}

init_cluster() {
  mkdir -p "$DIR"
  if [ ! -f "$PGPASS" ]; then
    (umask 077; echo "127.0.0.1:*:*:$PG_USER:$(openssl rand -hex 24)" > "$PGPASS")
  fi
  if [ ! -f "$MLFLOW_USERS" ]; then
    (umask 077; printf 'admin:%s\n%s:%s\n' "$(openssl rand -hex 24)" "$MLFLOW_CLIENT_USER" "$(openssl rand -hex 24)" >"$MLFLOW_USERS")
  fi
  # Flask's session and CSRF key; static, so that every server worker accepts the others' tokens
  [ -f "$MLFLOW_SECRET" ] || (umask 077; openssl rand -hex 32 >"$MLFLOW_SECRET")
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

# The lines of pg_hba.conf this script manages: clients beyond loopback, with a password.
# (initdb's own lines already ask loopback clients for one.)
hba_lines() {
  beyond_loopback || return 0
  echo "host    all    $PG_USER    ${PILOT_CLIENTS:-all}    scram-sha-256"
}

write_hba() {
  local hba="$PGDATA/pg_hba.conf" content
  content="$(as_pg sed '/^# BEGIN scripts\/services.sh/,/^# END scripts\/services.sh/d' "$hba")"
  if [ -n "$(hba_lines)" ]; then
    content="$content
# BEGIN scripts/services.sh: clients beyond loopback (PILOT_LISTEN=$LISTEN), password required
$(hba_lines)
# END scripts/services.sh"
  fi
  # written by the cluster's owner, so the file stays readable to PostgreSQL
  printf '%s\n' "$content" | as_pg tee "$hba" >/dev/null
}

start_pg() {
  if pg_running; then echo "PostgreSQL already running on $(listening_on):$(pg_port)"; return; fi
  rm -f "$DIR/postgres.log"; touch "$DIR/postgres.log"
  [ "$(id -u)" = 0 ] && chown "${PILOT_PG_OS_USER:-nobody}" "$DIR/postgres.log"
  write_hba
  # TCP only; no Unix socket (its path would be limited to ~100 characters).
  if ! as_pg "$PG_BIN/pg_ctl" start -D "$PGDATA" -l "$DIR/postgres.log" -w -t 60 \
      -o "-c listen_addresses='$(pg_listen_addresses)' -c port=$PG_PORT -c unix_socket_directories='' -c max_connections=200 -c password_encryption=scram-sha-256" >/dev/null; then
    echo "PostgreSQL did not start (port $PG_PORT taken? set PILOT_PG_PORT; PILOT_LISTEN=$LISTEN not an address of this machine?); its log:" >&2
    tail -20 "$DIR/postgres.log" >&2
    exit 1
  fi
  echo "$LISTEN" >"$DIR/listen"
  echo "PostgreSQL started on $LISTEN:$PG_PORT"
}

# At every start, not only the first: a cluster from an older version of this script has no mlflow_auth.
create_databases() {
  for database in mlflow mlflow_auth optuna; do
    if [ -z "$(psql_pilot -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname = '$database'")" ]; then
      psql_pilot -d postgres -c "CREATE DATABASE $database"
    fi
  done
}

# MLflow's basic-auth app reads this file (MLFLOW_AUTH_CONFIG_PATH). It holds no secret: the
# database password comes from PGPASSFILE, the admin's from MLFLOW_AUTH_ADMIN_PASSWORD.
write_auth_config() {
  cat >"$DIR/mlflow-auth.ini" <<EOF
# Written by scripts/services.sh at every start.
[mlflow]
default_permission = EDIT
database_uri = postgresql+psycopg://$PG_USER@127.0.0.1:$(pg_port)/mlflow_auth
admin_username = admin
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
# A checked password is trusted for 60 s per worker: checking one (scrypt) takes ~0.1 s of CPU,
# on every request without this cache; a changed password takes effect within that minute.
auth_cache_ttl_seconds = 60
EOF
}

# The client account exists with the password in mlflow-users (created, or reset if it differs).
ensure_client_user() {
  local user="$MLFLOW_CLIENT_USER" body code
  code="$(rest admin GET users/current)"
  if [ "$code" != 200 ]; then
    echo "The MLflow server refuses the admin password kept in $MLFLOW_USERS (HTTP $code): restore that file from a backup, or reset the admin's password in the database mlflow_auth." >&2
    exit 1
  fi
  [ "$(rest "$user" GET users/current)" = 200 ] && return 0
  body="{\"username\": \"$user\", \"password\": \"$(user_password "$user")\"}"
  code="$(rest admin POST users/create "$body")"
  [ "$code" = 200 ] || code="$(rest admin PATCH users/update-password "$body")"
  if [ "$code" != 200 ]; then
    echo "Could not create the MLflow user '$user' (HTTP $code); the server's log: $DIR/mlflow.log" >&2
    exit 1
  fi
  echo "MLflow user '$user' set up (password in $MLFLOW_USERS)"
}

start_mlflow() {
  local port
  if mlflow_alive; then
    port="$(mlflow_port)"
    for _ in $(seq 120); do mlflow_healthy "$port" && break; sleep 0.5; done
    echo "MLflow server already running at http://$(listening_on):$port"
    if [ "$(curl -s -m 5 -o /dev/null -w '%{http_code}' "http://$(mlflow_local_host):$port/api/2.0/mlflow/experiments/search?max_results=1")" = 200 ]; then
      echo "It runs without authentication (started by an older scripts/services.sh): restart it with \`make services-stop && make services\`." >&2
    fi
    return
  fi
  port="$MLFLOW_PORT"
  if curl -fsS -m 2 "http://$LOCAL:$port/health" >/dev/null 2>&1; then
    echo "Another server already answers on $LOCAL:$port: stop it or set PILOT_MLFLOW_PORT." >&2
    exit 1
  fi
  mkdir -p "$DIR/mlartifacts"
  write_auth_config
  local allowed=()
  if [ -n "${PILOT_ALLOWED_HOSTS:-}" ]; then
    # MLflow's default list (localhost, private IP addresses) and the names given, with any port
    local hosts="localhost,localhost:*,127.0.0.1,127.0.0.1:*,[::1],[[]::1]:*,10.*,192.168.*,172.1[6-9].*,172.2[0-9].*,172.3[01].*,fc00:*,fd00:*"
    local name
    for name in ${PILOT_ALLOWED_HOSTS//,/ }; do hosts="$hosts,$name,$name:*"; done
    allowed=(--allowed-hosts "$hosts")
  fi
  # setsid: the server outlives this shell; its process group is stopped as one.
  PGPASSFILE="$PGPASS" MLFLOW_AUTH_CONFIG_PATH="$DIR/mlflow-auth.ini" \
    MLFLOW_FLASK_SERVER_SECRET_KEY="$(cat "$MLFLOW_SECRET")" \
    MLFLOW_AUTH_ADMIN_PASSWORD="$(user_password admin)" \
    setsid "$(find_mlflow)" server --app-name basic-auth \
    --backend-store-uri "postgresql+psycopg://$PG_USER@127.0.0.1:$(pg_port)/mlflow" \
    --artifacts-destination "$DIR/mlartifacts" --serve-artifacts "${allowed[@]}" \
    --host "$LISTEN" --port "$port" --workers 2 >"$DIR/mlflow.log" 2>&1 </dev/null &
  echo $! >"$MLFLOW_PID"
  echo "$port" >"$DIR/mlflow.port"
  echo "$LISTEN" >"$DIR/listen"
  for _ in $(seq 240); do
    if mlflow_healthy "$port"; then
      echo "MLflow server started at http://$LISTEN:$port (basic authentication)"
      ensure_client_user
      return
    fi
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
    rm -f "$DIR/listen"
  else
    echo "PostgreSQL not running"
  fi
}

# The project's own services: let `kedro run --env shared` on this machine find the passwords.
# conf/shared/credentials.yml (git-ignored, mode 600) gets an entry pilot_services, rewritten at
# every start, whose keys conf/shared/mlflow.yml exports as environment variables before the run.
# (Not conf/local: Kedro reads it only without --env.) For another services folder, only where
# PILOT_CREDENTIALS_FILE names the file.
register_credentials() {
  local credentials="${PILOT_CREDENTIALS_FILE:-}"
  if [ -z "$credentials" ]; then
    [ -z "${PILOT_SERVICES_DIR:-}" ] || return 0
    credentials="$ROOT/conf/shared/credentials.yml"
  fi
  touch "$credentials"; chmod 600 "$credentials"
  sed -i -e '/^# Written by scripts\/services.sh/d' \
    -e '/^pilot_services:/,/^[^ ]/{/^pilot_services:/d;/^ /d}' "$credentials"
  printf '# Written by scripts/services.sh at every start: the services in %s.\npilot_services:\n  PGPASSFILE: %s\n  MLFLOW_TRACKING_USERNAME: %s\n  MLFLOW_TRACKING_PASSWORD: %s\n' \
    "$DIR" "$PGPASS" "$MLFLOW_CLIENT_USER" "$(user_password "$MLFLOW_CLIENT_USER")" >>"$credentials"
  echo "$credentials, entry pilot_services: PGPASSFILE and the MLflow account '$MLFLOW_CLIENT_USER'"
}

# print_env [HOST]: exports for a client here (loopback, the password file) or on another machine
# that reaches this one as HOST (the passwords themselves).
print_env() {
  local host="${1:-}"
  if [ -z "$host" ]; then
    echo "export MLFLOW_TRACKING_URI=http://$(mlflow_local_host):$(mlflow_port)"
    echo "export MLFLOW_TRACKING_USERNAME=$MLFLOW_CLIENT_USER"
    echo "export MLFLOW_TRACKING_PASSWORD=$(user_password "$MLFLOW_CLIENT_USER")"
    echo "export PILOT_OPTUNA_STORAGE=postgresql+psycopg://$PG_USER@127.0.0.1:$(pg_port)/optuna"
    echo "export PGPASSFILE=$PGPASS"
    return
  fi
  case "$(listening_on)" in
    127.*|localhost) case "$host" in 127.*|localhost) ;; *)
      echo "# warning: the services listen on $(listening_on) only; restart them with PILOT_LISTEN=0.0.0.0 for '$host' to reach them" >&2 ;;
    esac ;;
  esac
  echo "# Client settings for the PILOT services on $host (written by scripts/services.sh env $host)."
  echo "# Secret: keep this file mode 600. Use: . ~/pilot-services.env (docs/shared_services.md)"
  echo "export MLFLOW_TRACKING_URI=http://$host:$(mlflow_port)"
  echo "export MLFLOW_TRACKING_USERNAME=$MLFLOW_CLIENT_USER"
  echo "export MLFLOW_TRACKING_PASSWORD=$(user_password "$MLFLOW_CLIENT_USER")"
  echo "export PILOT_OPTUNA_STORAGE=postgresql+psycopg://$PG_USER@$host:$(pg_port)/optuna"
  echo "export PGPASSWORD=$(cut -d: -f5 "$PGPASS")"
}

print_config() {
  echo "listen address:            $LISTEN (PILOT_LISTEN)"
  echo "PostgreSQL listen_addresses: $(pg_listen_addresses), port $PG_PORT"
  echo "PostgreSQL clients beyond loopback (pg_hba.conf):"
  if [ -n "$(hba_lines)" ]; then hba_lines | sed 's/^/  /'; else echo "  none"; fi
  echo "MLflow server:             http://$LISTEN:$MLFLOW_PORT, basic authentication (users in $MLFLOW_USERS)"
}

[ "${1:-}" = config ] || PG_BIN="$(find_pg_bin)"
case "${1:-}" in
  start)
    started="$(now)"
    if [ -f "$DIR/listen" ] && [ "$(listening_on)" != "$LISTEN" ] && (pg_running || mlflow_alive); then
      echo "The services already listen on $(listening_on); to listen on $LISTEN, \`make services-stop\` first." >&2
    fi
    init_cluster
    start_pg
    create_databases
    start_mlflow
    register_credentials
    echo "Services healthy after $(elapsed "$started") s. Clients: eval \"\$(scripts/services.sh env)\""
    ;;
  stop)
    stop_mlflow
    stop_pg
    ;;
  status)
    if pg_running; then echo "PostgreSQL: running on $(listening_on):$(pg_port)"; else echo "PostgreSQL: stopped"; fi
    if mlflow_alive && mlflow_healthy "$(mlflow_port)"; then echo "MLflow: healthy at http://$(listening_on):$(mlflow_port) (basic authentication)"
    elif mlflow_alive; then echo "MLflow: starting (not healthy yet)"; else echo "MLflow: stopped"; fi
    pg_running && mlflow_alive
    ;;
  env)
    [ -f "$MLFLOW_USERS" ] || { echo "No services in $DIR yet: run \`make services\` first." >&2; exit 1; }
    print_env "${2:-}"
    ;;
  config)
    print_config
    ;;
  *)
    echo "usage: $0 start|stop|status|env [HOST]|config" >&2
    exit 2
    ;;
esac
