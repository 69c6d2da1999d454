#!/usr/bin/env bash
# The local stack without Docker: PostgreSQL and Redis from Debian packages, Apache Kafka (KRaft,
# single node) from Maven Central jars, all on loopback, state under .stack/ (git-ignored).
#
#   stack/stack.sh up | down | status
#
# `up` installs what is missing, starts what is not running and waits until every server answers a
# real client round trip. It is idempotent: with everything running it only re-checks. `down` stops
# only the processes this script started (their pid files live in the state folder).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
STATE=${DATALAYER_STATE_DIR:-$ROOT/.stack}
CACHE=${DATALAYER_CACHE_DIR:-$ROOT/.cache}
PY=${DATALAYER_PYTHON:-$ROOT/.venv/bin/python}

PG_PORT=${DATALAYER_PG_PORT:-5432}
REDIS_PORT=${DATALAYER_REDIS_PORT:-6379}
KAFKA_PORT=${DATALAYER_KAFKA_PORT:-9092}
KAFKA_CONTROLLER_PORT=${DATALAYER_KAFKA_CONTROLLER_PORT:-9093}
KAFKA_HEAP=${DATALAYER_KAFKA_HEAP:-512m}
# The local stack's credentials; compose.yaml and the settings defaults use the same ones.
PG_USER=datalayer
PG_PASSWORD=datalayer
PG_DB=datalayer

KAFKA_LIBS=$CACHE/kafka-libs
LOGS=$STATE/logs
PIDS=$STATE/pids

log() { printf '%s\n' "$*"; }
die() { printf 'stack: %s\n' "$*" >&2; exit 1; }

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

pid_alive() { # pidfile -- running, not merely a zombie nobody reaped (PID 1 here may not reap)
  [ -f "$1" ] || return 1
  local state
  state=$(ps -o stat= -p "$(cat "$1")" 2>/dev/null) || return 1
  [ -n "$state" ] && [ "${state#Z}" = "$state" ]
}

port_open() { # port
  (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

port_owner() { # port -> "name(pid)" of the listener, when ss can tell
  ss -ltnpH "sport = :$1" 2>/dev/null | sed -n 's/.*users:((\("[^"]*"\),pid=\([0-9]*\).*/\1 (pid \2)/p' | head -n1
}

wait_for() { # description timeout-seconds command...
  local what=$1 limit=$2; shift 2
  local deadline=$((SECONDS + limit))
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $deadline ] || return 1
    sleep 0.3
  done
}

probe() { "$PY" "$ROOT/stack/probe.py" "$@"; }
export -f pid_alive

# ---------------------------------------------------------------------------------------------
# Installation of what is missing

PG_BIN=""
find_pg_bin() {
  local d
  for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
    if [ -x "$d/postgres" ] && [ -x "$d/initdb" ]; then PG_BIN=$d; return 0; fi
  done
  return 1
}

apt_install() {
  log "installing Debian packages: $*"
  # Keep the packages' own init scripts from starting system-wide servers on our ports.
  local policy=/usr/sbin/policy-rc.d created=0
  if [ ! -e $policy ]; then
    printf '#!/bin/sh\nexit 101\n' | as_root tee $policy >/dev/null
    as_root chmod +x $policy
    created=1
  fi
  if [ -z "$(find /var/lib/apt/lists -maxdepth 1 -name '*Packages*' -mmin -1440 2>/dev/null | head -n1)" ]; then
    as_root apt-get update -qq
  fi
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
  [ $created = 0 ] || as_root rm -f $policy
}

install_missing() {
  local pkgs=()
  find_pg_bin || pkgs+=(postgresql)
  command -v redis-server >/dev/null || pkgs+=(redis-server)
  command -v redis-cli >/dev/null || pkgs+=(redis-tools)
  local jv=0
  if command -v java >/dev/null; then
    jv=$(java -version 2>&1 | sed -n 's/.*version "\([0-9]*\).*/\1/p' | head -n1)
  fi
  [ "${jv:-0}" -ge 17 ] || pkgs+=(openjdk-17-jre-headless)
  command -v mvn >/dev/null || pkgs+=(maven)
  command -v ss >/dev/null || pkgs+=(iproute2)
  if [ ${#pkgs[@]} -gt 0 ]; then apt_install "${pkgs[@]}"; fi
  find_pg_bin || die "PostgreSQL binaries not found under /usr/lib/postgresql after installing"
}

kafka_libs() {
  # The broker's jars, resolved by Maven from the committed pom.xml; re-copied when it changes.
  local stamp=$KAFKA_LIBS/.pom.sha256 want
  want=$(sha256sum "$ROOT/stack/pom.xml" | cut -d' ' -f1)
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then return 0; fi
  log "fetching the Kafka broker from Maven Central (stack/pom.xml)"
  rm -rf "$KAFKA_LIBS"; mkdir -p "$KAFKA_LIBS"
  mvn -q -B -f "$ROOT/stack/pom.xml" dependency:copy-dependencies \
      -DincludeScope=runtime -DoutputDirectory="$KAFKA_LIBS" >"$CACHE/mvn.log" 2>&1 \
    || die "mvn could not fetch the Kafka jars; see $CACHE/mvn.log"
  echo "$want" >"$stamp"
}

kafka_version() {
  ls "$KAFKA_LIBS" | sed -n 's/^kafka_2\.13-\(.*\)\.jar$/\1/p' | head -n1
}

# ---------------------------------------------------------------------------------------------
# PostgreSQL

PG_RUN=()   # prefix that runs a command as the database's OS user
pg_user_setup() {
  if [ "$(id -u)" = 0 ]; then
    id postgres >/dev/null 2>&1 || die "the 'postgres' OS user is missing (it comes with the postgresql package)"
    PG_RUN=(runuser -u postgres --)
  fi
}

pg_datadir() {
  # PostgreSQL refuses to run as root, so as root the server runs as 'postgres', which must be able
  # to reach its data directory. When the checkout lies below a folder it cannot enter, the data
  # lives under /var/lib/postgresql and .stack/pg links to it.
  local dir=$STATE/pg
  if [ -L "$dir" ] || [ ${#PG_RUN[@]} = 0 ]; then echo "$dir"; return; fi
  mkdir -p "$dir"
  chown postgres "$dir"
  if "${PG_RUN[@]}" test -w "$dir"; then echo "$dir"; return; fi
  rmdir "$dir"
  local alt
  alt=/var/lib/postgresql/datalayer-$(printf '%s' "$STATE" | sha256sum | cut -c1-12)
  mkdir -p "$alt"; chown postgres "$alt"
  ln -s "$alt" "$dir"
  echo "$dir"
}

pg_up() {
  pg_user_setup
  local base data
  base=$(pg_datadir)
  data=$base/data
  if "${PG_RUN[@]}" "$PG_BIN/pg_ctl" -D "$data" status >/dev/null 2>&1; then
    log "postgresql: running (port $PG_PORT)"
  else
    if port_open "$PG_PORT"; then
      if probe postgres "$PG_PORT" >/dev/null 2>&1; then
        log "postgresql: port $PG_PORT already serves a PostgreSQL that accepts the datalayer credentials; using it (not started here, not stopped by 'down')"
        return 0
      fi
      die "port $PG_PORT is taken by $(port_owner "$PG_PORT" || true), which is not a PostgreSQL that accepts user '$PG_USER'; stop it or set DATALAYER_PG_PORT"
    fi
    if [ ! -f "$data/PG_VERSION" ]; then
      log "postgresql: initialising $data"
      mkdir -p "$data"
      [ ${#PG_RUN[@]} = 0 ] || chown -R postgres "$base"
      chmod 700 "$data"
      local pw
      pw=$(mktemp); printf '%s\n' "$PG_PASSWORD" >"$pw"; chmod 644 "$pw"
      "${PG_RUN[@]}" "$PG_BIN/initdb" -D "$data" -U postgres --pwfile="$pw" --auth=scram-sha-256 \
        --encoding=UTF8 --locale=C.UTF-8 >"$LOGS/initdb.log" 2>&1 \
        || { rm -f "$pw"; die "initdb failed; see $LOGS/initdb.log"; }
      rm -f "$pw"
      cat >>"$data/postgresql.conf" <<EOF
# datalayer local stack
listen_addresses = '127.0.0.1'
port = $PG_PORT
unix_socket_directories = ''
max_connections = 200
shared_buffers = 256MB
fsync = on
synchronous_commit = on
log_min_duration_statement = -1
EOF
    fi
    [ ${#PG_RUN[@]} = 0 ] || chown postgres "$LOGS" 2>/dev/null || true
    touch "$LOGS/postgresql.log"; [ ${#PG_RUN[@]} = 0 ] || chown postgres "$LOGS/postgresql.log"
    log "postgresql: starting on 127.0.0.1:$PG_PORT"
    "${PG_RUN[@]}" "$PG_BIN/pg_ctl" -D "$data" -l "$LOGS/postgresql.log" -o "-p $PG_PORT" -w -t 60 start >/dev/null \
      || die "PostgreSQL did not start; see $LOGS/postgresql.log"
    echo started >"$PIDS/postgresql.started"
  fi
  wait_for postgresql 60 "$PG_BIN/pg_isready" -h 127.0.0.1 -p "$PG_PORT" -q || die "PostgreSQL does not accept connections; see $LOGS/postgresql.log"
  # The application role and database, created once; the superuser's password is the stack's.
  PGPASSWORD=$PG_PASSWORD psql -h 127.0.0.1 -p "$PG_PORT" -U postgres -d postgres -qAt -v ON_ERROR_STOP=1 >/dev/null <<EOF
SELECT 'CREATE ROLE $PG_USER LOGIN CREATEDB CREATEROLE PASSWORD ''$PG_PASSWORD'''
 WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '$PG_USER')\gexec
SELECT 'CREATE DATABASE $PG_DB OWNER $PG_USER'
 WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = '$PG_DB')\gexec
EOF
  wait_for postgresql 30 probe postgres "$PG_PORT" || die "PostgreSQL does not answer a query as '$PG_USER'"
}

pg_down() {
  pg_user_setup
  local data=$STATE/pg/data
  if [ -f "$PIDS/postgresql.started" ] && "${PG_RUN[@]}" "$PG_BIN/pg_ctl" -D "$data" status >/dev/null 2>&1; then
    "${PG_RUN[@]}" "$PG_BIN/pg_ctl" -D "$data" -m fast -w stop >/dev/null && log "postgresql: stopped"
  fi
  rm -f "$PIDS/postgresql.started"
}

# ---------------------------------------------------------------------------------------------
# Redis

redis_up() {
  local pidf=$PIDS/redis.pid
  if pid_alive "$pidf"; then
    log "redis: running (port $REDIS_PORT)"
  else
    if port_open "$REDIS_PORT"; then
      if probe redis "$REDIS_PORT" >/dev/null 2>&1; then
        log "redis: port $REDIS_PORT already serves Redis; using it (not started here, not stopped by 'down')"
        return 0
      fi
      die "port $REDIS_PORT is taken by $(port_owner "$REDIS_PORT" || true), which does not answer as Redis; stop it or set DATALAYER_REDIS_PORT"
    fi
    mkdir -p "$STATE/redis"
    cat >"$STATE/redis/redis.conf" <<EOF
bind 127.0.0.1
port $REDIS_PORT
protected-mode yes
daemonize yes
pidfile $pidf
logfile $LOGS/redis.log
dir $STATE/redis
appendonly yes
appendfsync everysec
save ""
EOF
    log "redis: starting on 127.0.0.1:$REDIS_PORT"
    redis-server "$STATE/redis/redis.conf" || die "Redis did not start; see $LOGS/redis.log"
  fi
  wait_for redis 30 probe redis "$REDIS_PORT" || die "Redis does not answer PING; see $LOGS/redis.log"
}

redis_down() {
  local pidf=$PIDS/redis.pid
  if pid_alive "$pidf"; then
    kill "$(cat "$pidf")"
    wait_for redis-stop 30 bash -c "! pid_alive $pidf" || kill -9 "$(cat "$pidf")" 2>/dev/null || true
    log "redis: stopped"
  fi
  rm -f "$pidf"
}

# ---------------------------------------------------------------------------------------------
# Kafka (KRaft, one node that is both broker and controller)

kafka_up() {
  local pidf=$PIDS/kafka.pid dir=$STATE/kafka
  if pid_alive "$pidf"; then
    log "kafka: running (port $KAFKA_PORT)"
  else
    local p
    for p in "$KAFKA_PORT" "$KAFKA_CONTROLLER_PORT"; do
      if port_open "$p"; then
        if [ "$p" = "$KAFKA_PORT" ] && probe kafka "$KAFKA_PORT" >/dev/null 2>&1; then
          log "kafka: port $KAFKA_PORT already serves a Kafka broker; using it (not started here, not stopped by 'down')"
          return 0
        fi
        die "port $p is taken by $(port_owner "$p" || true), which is not a Kafka broker; stop it or set DATALAYER_KAFKA_PORT / DATALAYER_KAFKA_CONTROLLER_PORT"
      fi
    done
    mkdir -p "$dir/data"
    sed -e "s#@DATA@#$dir/data#" -e "s#@PORT@#$KAFKA_PORT#g" -e "s#@CPORT@#$KAFKA_CONTROLLER_PORT#g" \
      "$ROOT/stack/kafka/server.properties" >"$dir/server.properties"
    local cp=("-cp" "$KAFKA_LIBS/*" "-Dlog4j2.configurationFile=$ROOT/stack/kafka/log4j2.properties" "-Dkafka.logs.dir=$LOGS")
    if [ ! -f "$dir/data/meta.properties" ]; then
      local cluster
      cluster=$(java "${cp[@]}" kafka.tools.StorageTool random-uuid 2>/dev/null | tail -n1)
      log "kafka: formatting KRaft storage (cluster $cluster)"
      java "${cp[@]}" kafka.tools.StorageTool format --standalone -t "$cluster" -c "$dir/server.properties" \
        >"$LOGS/kafka-format.log" 2>&1 || die "formatting Kafka storage failed; see $LOGS/kafka-format.log"
    fi
    log "kafka: starting on 127.0.0.1:$KAFKA_PORT (heap $KAFKA_HEAP)"
    nohup java -Xms"$KAFKA_HEAP" -Xmx"$KAFKA_HEAP" -XX:+UseG1GC -XX:MaxGCPauseMillis=20 \
      -Djava.awt.headless=true "${cp[@]}" kafka.Kafka "$dir/server.properties" \
      >"$LOGS/kafka.out" 2>&1 </dev/null &
    echo $! >"$pidf"
  fi
  wait_for kafka 120 probe kafka "$KAFKA_PORT" || {
    pid_alive "$pidf" || die "Kafka exited; see $LOGS/kafka.out and $LOGS/kafka.log"
    die "Kafka does not answer a metadata request; see $LOGS/kafka.log"
  }
}

kafka_down() {
  local pidf=$PIDS/kafka.pid
  if pid_alive "$pidf"; then
    local pid
    pid=$(cat "$pidf")
    kill "$pid"
    wait_for kafka-stop 60 bash -c "! pid_alive $pidf" || kill -9 "$pid" 2>/dev/null || true
    log "kafka: stopped"
  fi
  rm -f "$pidf"
}

# ---------------------------------------------------------------------------------------------

versions() {
  {
    echo "postgresql $("$PG_BIN/postgres" --version | awk '{print $3}')"
    echo "redis $(redis-server --version | sed -n 's/.*v=\([^ ]*\).*/\1/p')"
    echo "kafka $(kafka_version)"
    echo "java $(java -version 2>&1 | sed -n 's/.*version "\([^"]*\)".*/\1/p' | head -n1)"
  } >"$STATE/versions.txt"
  log "versions: $(tr '\n' ' ' <"$STATE/versions.txt")"
}

cmd_up() {
  local t0=$SECONDS
  mkdir -p "$STATE" "$LOGS" "$PIDS" "$CACHE"
  [ -x "$PY" ] || die "no Python environment at $PY (run 'make venv' first, or set DATALAYER_PYTHON)"
  install_missing
  kafka_libs
  pg_up
  redis_up
  kafka_up
  versions
  log "stack up in $((SECONDS - t0)) s: postgresql 127.0.0.1:$PG_PORT, redis 127.0.0.1:$REDIS_PORT, kafka 127.0.0.1:$KAFKA_PORT (logs in $LOGS)"
}

cmd_down() {
  find_pg_bin || true
  kafka_down
  redis_down
  [ -z "$PG_BIN" ] || pg_down
}

cmd_status() {
  local rc=0 name port
  find_pg_bin || true
  for name in postgres redis kafka; do
    case $name in postgres) port=$PG_PORT;; redis) port=$REDIS_PORT;; kafka) port=$KAFKA_PORT;; esac
    if [ -x "$PY" ] && probe "$name" "$port" 2>/dev/null; then :; else
      printf '%-10s down (127.0.0.1:%s)\n' "$name" "$port"; rc=1
    fi
  done
  return $rc
}

case "${1:-}" in
  up) cmd_up ;;
  down) cmd_down ;;
  status) cmd_status ;;
  *) die "usage: stack/stack.sh up|down|status" ;;
esac
