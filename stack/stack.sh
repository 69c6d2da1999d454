#!/usr/bin/env bash
# The local stack without Docker: PostgreSQL and Redis from Debian packages, Apache Kafka (KRaft,
# single node) from Maven Central jars, all on loopback, state under .stack/ (git-ignored).
#
#   stack/stack.sh up [--tls] | down | status | env [--tls] | certs
#
# `up` installs what is missing, starts what is not running and waits until every server answers a
# real client round trip. It is idempotent: with everything running it only re-checks. `down` stops
# only the processes this script started (their pid files live in the state folder).
#
# Every server offers TLS beside plaintext, with a throwaway CA made once under $STATE/tls:
# PostgreSQL on its own port (ssl = on; the client chooses sslmode), Redis on a tls-port, Kafka on an
# SSL listener. A server already running with an older configuration is reloaded (PostgreSQL) or
# restarted (Redis, Kafka) by `up`, and only then. `up --tls` and `env --tls` print the DATALAYER_*
# exports that point every client at the TLS ports with verification.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
STATE=${DATALAYER_STATE_DIR:-$ROOT/.stack}
case $STATE in /*) ;; *) STATE=$PWD/$STATE ;; esac
CACHE=${DATALAYER_CACHE_DIR:-$ROOT/.cache}
PY=${DATALAYER_PYTHON:-$ROOT/.venv/bin/python}

PG_PORT=${DATALAYER_PG_PORT:-5432}
REDIS_PORT=${DATALAYER_REDIS_PORT:-6379}
KAFKA_PORT=${DATALAYER_KAFKA_PORT:-9092}
KAFKA_CONTROLLER_PORT=${DATALAYER_KAFKA_CONTROLLER_PORT:-9093}
REDIS_TLS_PORT=${DATALAYER_REDIS_TLS_PORT:-6380}
KAFKA_TLS_PORT=${DATALAYER_KAFKA_TLS_PORT:-9094}
KAFKA_HEAP=${DATALAYER_KAFKA_HEAP:-512m}
# The local stack's credentials; compose.yaml and the settings defaults use the same ones.
PG_USER=datalayer
PG_PASSWORD=datalayer
PG_DB=datalayer

KAFKA_LIBS=$CACHE/kafka-libs
LOGS=$STATE/logs
PIDS=$STATE/pids
TLS_DIR=$STATE/tls

log() { printf '%s\n' "$*"; }
die() { printf 'stack: %s\n' "$*" >&2; exit 1; }

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

pid_alive() { # pidfile -- running, not merely a zombie nobody reaped (PID 1 here may not reap)
  [ -f "$1" ] || return 1
  local state
  state=$(ps -o stat= -p "$(cat "$1")" 2>/dev/null) || return 1
  [ -n "$state" ] && [ "${state#Z}" = "$state" ]
}

pid_ours() { # pidfile redis|kafka -- alive, and the server of THIS state folder: a stale pid file
  # (after a reboot, say) may name a pid reused by anything, even another stack instance's server.
  pid_alive "$1" || return 1
  local pid
  pid=$(cat "$1")
  [ -d "/proc/$pid" ] || return 0 # no /proc to ask: trust the pid file
  case $2 in
    redis) [ "$(readlink "/proc/$pid/cwd" 2>/dev/null)" = "$(cd "$STATE/redis" 2>/dev/null && pwd -P)" ] ;;
    kafka) tr '\0' '\n' <"/proc/$pid/cmdline" 2>/dev/null | grep -qxF "$STATE/kafka/server.properties" ;;
    *) return 1 ;;
  esac
}

forget_stale_pid() { # pidfile kind -- drop a pid file whose process is gone or is not ours
  if [ -f "$1" ] && ! pid_ours "$1" "$2"; then
    pid_alive "$1" && log "$2: pid $(cat "$1") in $1 is not this stack's $2; ignoring the stale pid file"
    rm -f "$1"
  fi
  return 0
}

port_open() { # port
  (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

port_owner() { # port -> "name(pid)" of the listener, when ss can tell
  ss -ltnpH "sport = :$1" 2>/dev/null | sed -n 's/.*users:((\("[^"]*"\),pid=\([0-9]*\).*/\1 (pid \2)/p' | head -n1
}

refuse_orphan() { # kind port -- die when the port's server runs from a deleted directory
  # A stack left running by a checkout that was then deleted answers like a good server, but its
  # data (and its own 'down') are gone: using it would lose whatever is written next.
  local pid dir
  pid=$(ss -ltnpH "sport = :$2" 2>/dev/null | sed -n 's/.*pid=\([0-9]*\).*/\1/p' | head -n1)
  [ -n "$pid" ] || return 0
  dir=$(readlink "/proc/$pid/cwd" 2>/dev/null) || return 0
  case $dir in
    *" (deleted)") die "$1: port $2 is served by pid $pid, which runs from ${dir% (deleted)}, deleted since (the stack of a removed checkout?); stop it (kill $pid) and run again" ;;
  esac
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
  command -v openssl >/dev/null || pkgs+=(openssl)
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
# TLS: a throwaway CA, a server certificate for 127.0.0.1 and localhost, a client certificate for
# mutual TLS, and the Kafka broker's PKCS12 key and trust stores. Made once per state folder (all or
# nothing: built aside, then renamed); delete $STATE/tls and run `up` to get new ones.

keytool_bin() {
  local java_bin
  java_bin=$(dirname "$(readlink -f "$(command -v java)")")
  if [ -x "$java_bin/keytool" ]; then echo "$java_bin/keytool"; else command -v keytool; fi
}

tls_leaf() { # name subject extension-lines... -- a key and a certificate signed by the CA (in the cwd)
  local name=$1 subject=$2; shift 2
  printf '%s\n' "basicConstraints = critical, CA:FALSE" "subjectKeyIdentifier = hash" \
    "authorityKeyIdentifier = keyid, issuer" "$@" >"$name.ext"
  openssl req -new -newkey rsa:2048 -nodes -sha256 -subj "$subject" -keyout "$name.key" -out "$name.csr"
  openssl x509 -req -sha256 -days 825 -in "$name.csr" -CA ca.crt -CAkey ca.key -CAcreateserial \
    -extfile "$name.ext" -out "$name.crt"
  rm -f "$name.csr" "$name.ext"
}

tls_truststore() { # dir -- the broker's trust store, a PKCS12 file keytool writes (Java accepts it)
  "$(keytool_bin)" -importcert -noprompt -alias datalayer-ca -file "$1/ca.crt" -storetype PKCS12 \
    -keystore "$1/kafka.truststore.p12" -storepass "$(cat "$1/store.pass")"
}

tls_make() { # dir
  set -e
  cd "$1"
  umask 077
  printf '%s\n' "[req]" "distinguished_name = dn" "prompt = no" "[dn]" "CN = unused" "[ca]" \
    "basicConstraints = critical, CA:TRUE" "keyUsage = critical, keyCertSign, cRLSign" \
    "subjectKeyIdentifier = hash" "authorityKeyIdentifier = keyid:always" >ca.cnf
  openssl req -x509 -new -newkey rsa:2048 -nodes -sha256 -days 3650 -config ca.cnf -extensions ca \
    -subj "/O=datalayer local stack/CN=datalayer local stack CA $(openssl rand -hex 4)" \
    -keyout ca.key -out ca.crt
  tls_leaf server "/O=datalayer local stack/CN=localhost" \
    "keyUsage = critical, digitalSignature, keyEncipherment" "extendedKeyUsage = serverAuth" \
    "subjectAltName = IP:127.0.0.1, DNS:localhost"
  tls_leaf client "/O=datalayer local stack/CN=datalayer-client" \
    "keyUsage = critical, digitalSignature" "extendedKeyUsage = clientAuth"
  # The broker's stores: PKCS12 from openssl (key store) and keytool (a trust store Java accepts).
  openssl rand -hex 16 >store.pass
  local pass
  pass=$(cat store.pass)
  openssl pkcs12 -export -name broker -in server.crt -inkey server.key -certfile ca.crt \
    -passout "pass:$pass" -out kafka.keystore.p12
  # Without Java (`certs` for compose.tls.yaml, whose broker trusts ca.crt as PEM) there is no keytool:
  # `up` installs Java first and makes the trust store then (tls_up).
  if command -v java >/dev/null || command -v keytool >/dev/null; then tls_truststore .; fi
  rm -f ca.cnf ca.srl
  chmod 644 ca.crt server.crt client.crt
  openssl verify -CAfile ca.crt server.crt client.crt
}

tls_up() {
  if [ -f "$TLS_DIR/ready" ]; then
    # Made by `certs` on a machine without Java: the trust store is the one file still missing.
    if [ ! -f "$TLS_DIR/kafka.truststore.p12" ] && { command -v java || command -v keytool; } >/dev/null; then
      (umask 077; tls_truststore "$TLS_DIR") >>"$LOGS/tls.log" 2>&1 || die "making the trust store failed; see $LOGS/tls.log"
    fi
    return 0
  fi
  log "tls: making a throwaway CA and certificates for 127.0.0.1/localhost in $TLS_DIR"
  local tmp=$TLS_DIR.new
  rm -rf "$tmp"; mkdir -p "$tmp"
  # Not `(...) || die`: errexit would be off inside the subshell, and a failed step go unnoticed.
  local rc=0
  set +e
  (tls_make "$tmp") >"$LOGS/tls.log" 2>&1
  rc=$?
  set -e
  [ $rc = 0 ] || die "making the certificates failed; see $LOGS/tls.log"
  date -u +%FT%TZ >"$tmp/ready"
  rm -rf "$TLS_DIR"; mv "$tmp" "$TLS_DIR"
  chmod 755 "$TLS_DIR"
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

pg_put() { # source destination mode -- copy for the server's OS user; prints "changed" if it did
  if ! cmp -s "$1" "$2"; then
    cp "$1" "$2"
    echo changed
  fi
  chmod "$3" "$2"
  [ ${#PG_RUN[@]} = 0 ] || chown postgres "$2"
}

pg_tls() { # data-dir -- TLS on the server's one port, beside plaintext; prints "changed" if it did
  # The certificate, key (PostgreSQL wants it private to the server's OS user) and CA live in the
  # data directory; datalayer_tls.conf, included from postgresql.conf, turns TLS on. The CA is
  # also the one client certificates are checked against, when a client presents one.
  local data=$1 conf
  pg_put "$TLS_DIR/server.crt" "$data/datalayer_server.crt" 644
  pg_put "$TLS_DIR/server.key" "$data/datalayer_server.key" 600
  pg_put "$TLS_DIR/ca.crt" "$data/datalayer_ca.crt" 644
  conf=$(mktemp)
  cat >"$conf" <<EOF
# datalayer local stack: TLS beside plaintext on port $PG_PORT (the client chooses its sslmode).
# Written by stack/stack.sh; it is overwritten on 'up'.
ssl = on
ssl_cert_file = 'datalayer_server.crt'
ssl_key_file = 'datalayer_server.key'
ssl_ca_file = 'datalayer_ca.crt'
ssl_min_protocol_version = 'TLSv1.2'
EOF
  pg_put "$conf" "$data/datalayer_tls.conf" 644
  rm -f "$conf"
  if ! grep -qxF "include_if_exists = 'datalayer_tls.conf'" "$data/postgresql.conf"; then
    printf '%s\n' "include_if_exists = 'datalayer_tls.conf'" >>"$data/postgresql.conf"
    echo changed
  fi
  # hostssl: TLS connections authenticate by password, as plaintext ones do under the 'host' rules
  # below it. Rewritten in place, so the file keeps its owner.
  if ! grep -q '^hostssl' "$data/pg_hba.conf"; then
    local hba
    hba=$(mktemp)
    { printf '%s\n' "# datalayer local stack: TLS connections from loopback (plaintext ones match the host rules)" \
        "hostssl all all 127.0.0.1/32 scram-sha-256"; cat "$data/pg_hba.conf"; } >"$hba"
    cat "$hba" >"$data/pg_hba.conf"
    rm -f "$hba"
    echo changed
  fi
}

pg_up() {
  pg_user_setup
  local base data
  base=$(pg_datadir)
  data=$base/data
  if "${PG_RUN[@]}" "$PG_BIN/pg_ctl" -D "$data" status >/dev/null 2>&1; then
    log "postgresql: running (port $PG_PORT)"
    if [ -n "$(pg_tls "$data")" ]; then
      # ssl and pg_hba.conf take effect on a reload: no connection is cut.
      "${PG_RUN[@]}" "$PG_BIN/pg_ctl" -D "$data" reload >/dev/null || die "reloading PostgreSQL failed"
      log "postgresql: TLS configuration written; reloaded"
    fi
  else
    if port_open "$PG_PORT"; then
      if probe postgres "$PG_PORT" >/dev/null 2>&1; then
        refuse_orphan postgresql "$PG_PORT"
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
    pg_tls "$data" >/dev/null
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
  wait_for postgresql-tls 30 probe postgres-tls "$PG_PORT" "$TLS_DIR/ca.crt" \
    || die "PostgreSQL does not answer over verified TLS; see $LOGS/postgresql.log"
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

redis_conf() { # the configuration this script wants, on stdout
  cat <<EOF
bind 127.0.0.1
port $REDIS_PORT
protected-mode yes
daemonize yes
pidfile $PIDS/redis.pid
logfile $LOGS/redis.log
dir $STATE/redis
appendonly yes
appendfsync everysec
save ""
# TLS beside plaintext; a client certificate is checked when one is presented, not required.
tls-port $REDIS_TLS_PORT
tls-cert-file $TLS_DIR/server.crt
tls-key-file $TLS_DIR/server.key
tls-ca-cert-file $TLS_DIR/ca.crt
tls-auth-clients optional
EOF
}

redis_stop() {
  local pidf=$PIDS/redis.pid
  kill "$(cat "$pidf")"
  wait_for redis-stop 30 bash -c "! pid_alive $pidf" || kill -9 "$(cat "$pidf")" 2>/dev/null || true
  rm -f "$pidf"
}

redis_up() {
  local pidf=$PIDS/redis.pid conf=$STATE/redis/redis.conf want
  want=$(redis_conf)
  forget_stale_pid "$pidf" redis
  if pid_alive "$pidf" && [ "$want" != "$(cat "$conf" 2>/dev/null)" ]; then
    # Started with an older configuration (before TLS, say): restart it with this one.
    log "redis: configuration changed ($conf); restarting"
    redis_stop
  fi
  if pid_alive "$pidf"; then
    log "redis: running (port $REDIS_PORT, TLS $REDIS_TLS_PORT)"
  else
    if port_open "$REDIS_PORT"; then
      if probe redis "$REDIS_PORT" >/dev/null 2>&1; then
        refuse_orphan redis "$REDIS_PORT"
        log "redis: port $REDIS_PORT already serves Redis; using it (not started here, not stopped by 'down'; no TLS set up)"
        return 0
      fi
      die "port $REDIS_PORT is taken by $(port_owner "$REDIS_PORT" || true), which does not answer as Redis; stop it or set DATALAYER_REDIS_PORT"
    fi
    if port_open "$REDIS_TLS_PORT"; then
      die "port $REDIS_TLS_PORT is taken by $(port_owner "$REDIS_TLS_PORT" || true); stop it or set DATALAYER_REDIS_TLS_PORT"
    fi
    mkdir -p "$STATE/redis"
    printf '%s\n' "$want" >"$conf"
    log "redis: starting on 127.0.0.1:$REDIS_PORT (TLS $REDIS_TLS_PORT)"
    redis-server "$conf" || die "Redis did not start; see $LOGS/redis.log"
  fi
  wait_for redis 30 probe redis "$REDIS_PORT" || die "Redis does not answer PING; see $LOGS/redis.log"
  wait_for redis-tls 30 probe redis-tls "$REDIS_TLS_PORT" "$TLS_DIR/ca.crt" \
    || die "Redis does not answer PING over verified TLS on port $REDIS_TLS_PORT; see $LOGS/redis.log"
}

redis_down() {
  local pidf=$PIDS/redis.pid
  forget_stale_pid "$pidf" redis
  if pid_alive "$pidf"; then
    redis_stop
    log "redis: stopped"
  fi
  rm -f "$pidf"
}

# ---------------------------------------------------------------------------------------------
# Kafka (KRaft, one node that is both broker and controller)

kafka_conf() { # the broker configuration this script wants, on stdout
  sed -e "s#@DATA@#$STATE/kafka/data#" -e "s#@PORT@#$KAFKA_PORT#g" -e "s#@CPORT@#$KAFKA_CONTROLLER_PORT#g" \
    -e "s#@TLSPORT@#$KAFKA_TLS_PORT#g" -e "s#@TLS@#$TLS_DIR#g" -e "s#@STOREPASS@#$(cat "$TLS_DIR/store.pass")#g" \
    "$ROOT/stack/kafka/server.properties"
}

kafka_stop() {
  local pidf=$PIDS/kafka.pid pid
  pid=$(cat "$pidf")
  kill "$pid"
  wait_for kafka-stop 60 bash -c "! pid_alive $pidf" || kill -9 "$pid" 2>/dev/null || true
  rm -f "$pidf"
}

kafka_up() {
  local pidf=$PIDS/kafka.pid dir=$STATE/kafka want
  want=$(kafka_conf)
  forget_stale_pid "$pidf" kafka
  if pid_alive "$pidf" && [ "$want" != "$(cat "$dir/server.properties" 2>/dev/null)" ]; then
    # Started with an older configuration (before the SSL listener, say): restart it with this one.
    log "kafka: configuration changed ($dir/server.properties); restarting"
    kafka_stop
  fi
  if pid_alive "$pidf"; then
    log "kafka: running (port $KAFKA_PORT, SSL $KAFKA_TLS_PORT)"
  else
    local p
    for p in "$KAFKA_PORT" "$KAFKA_CONTROLLER_PORT" "$KAFKA_TLS_PORT"; do
      if port_open "$p"; then
        if [ "$p" = "$KAFKA_PORT" ] && probe kafka "$KAFKA_PORT" >/dev/null 2>&1; then
          refuse_orphan kafka "$KAFKA_PORT"
          log "kafka: port $KAFKA_PORT already serves a Kafka broker; using it (not started here, not stopped by 'down'; no TLS set up)"
          return 0
        fi
        die "port $p is taken by $(port_owner "$p" || true), which is not a Kafka broker; stop it or set DATALAYER_KAFKA_PORT / DATALAYER_KAFKA_CONTROLLER_PORT / DATALAYER_KAFKA_TLS_PORT"
      fi
    done
    mkdir -p "$dir/data"
    printf '%s\n' "$want" >"$dir/server.properties"
    chmod 600 "$dir/server.properties" # it holds the key store's password
    local cp=("-cp" "$KAFKA_LIBS/*" "-Dlog4j2.configurationFile=$ROOT/stack/kafka/log4j2.properties" "-Dkafka.logs.dir=$LOGS")
    if [ ! -f "$dir/data/meta.properties" ]; then
      local cluster
      cluster=$(java "${cp[@]}" kafka.tools.StorageTool random-uuid 2>/dev/null | tail -n1)
      log "kafka: formatting KRaft storage (cluster $cluster)"
      java "${cp[@]}" kafka.tools.StorageTool format --standalone -t "$cluster" -c "$dir/server.properties" \
        >"$LOGS/kafka-format.log" 2>&1 || die "formatting Kafka storage failed; see $LOGS/kafka-format.log"
    fi
    log "kafka: starting on 127.0.0.1:$KAFKA_PORT, SSL $KAFKA_TLS_PORT (heap $KAFKA_HEAP)"
    nohup java -Xms"$KAFKA_HEAP" -Xmx"$KAFKA_HEAP" -XX:+UseG1GC -XX:MaxGCPauseMillis=20 \
      -Djava.awt.headless=true "${cp[@]}" kafka.Kafka "$dir/server.properties" \
      >"$LOGS/kafka.out" 2>&1 </dev/null &
    echo $! >"$pidf"
  fi
  wait_for kafka 120 probe kafka "$KAFKA_PORT" || {
    pid_alive "$pidf" || die "Kafka exited; see $LOGS/kafka.out and $LOGS/kafka.log"
    die "Kafka does not answer a metadata request; see $LOGS/kafka.log"
  }
  wait_for kafka-tls 60 probe kafka-tls "$KAFKA_TLS_PORT" "$TLS_DIR/ca.crt" \
    || die "Kafka does not answer a metadata request over verified TLS on port $KAFKA_TLS_PORT; see $LOGS/kafka.log"
}

kafka_down() {
  local pidf=$PIDS/kafka.pid
  forget_stale_pid "$pidf" kafka
  if pid_alive "$pidf"; then
    kafka_stop
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
  local t0=$SECONDS show_tls=0
  case "${1:-}" in --tls) show_tls=1 ;; "") ;; *) die "usage: stack/stack.sh up [--tls]" ;; esac
  mkdir -p "$STATE" "$LOGS" "$PIDS" "$CACHE"
  [ -x "$PY" ] || die "no Python environment at $PY (run 'make venv' first, or set DATALAYER_PYTHON)"
  install_missing
  kafka_libs
  tls_up
  pg_up
  redis_up
  kafka_up
  versions
  log "stack up in $((SECONDS - t0)) s: postgresql 127.0.0.1:$PG_PORT (TLS on the same port), redis 127.0.0.1:$REDIS_PORT (TLS $REDIS_TLS_PORT), kafka 127.0.0.1:$KAFKA_PORT (SSL $KAFKA_TLS_PORT) (logs in $LOGS, CA $TLS_DIR/ca.crt)"
  if [ $show_tls = 1 ]; then
    log "clients over TLS, verified against the stack's CA (eval \"\$(stack/stack.sh env --tls)\" sets them):"
    cmd_env --tls
  fi
}

cmd_env() { # [--tls] -- exports for this stack instance's clients (and the tests), for eval
  local tls=0 ca=$TLS_DIR/ca.crt v
  case "${1:-}" in --tls) tls=1 ;; "") ;; *) die "usage: stack/stack.sh env [--tls]" ;; esac
  echo "# this stack instance (stack/stack.sh and tests/test_security.py read these)"
  for v in "STATE_DIR=$STATE" "PG_PORT=$PG_PORT" "REDIS_PORT=$REDIS_PORT" "REDIS_TLS_PORT=$REDIS_TLS_PORT" \
    "KAFKA_PORT=$KAFKA_PORT" "KAFKA_CONTROLLER_PORT=$KAFKA_CONTROLLER_PORT" "KAFKA_TLS_PORT=$KAFKA_TLS_PORT"; do
    printf 'export DATALAYER_%s=%q\n' "${v%%=*}" "${v#*=}"
  done
  echo "# clients"
  printf 'export DATALAYER_DATABASE_URL=%q\n' "postgresql://$PG_USER:$PG_PASSWORD@127.0.0.1:$PG_PORT/$PG_DB"
  if [ $tls = 1 ]; then
    printf 'export DATALAYER_DATABASE_SSLMODE=verify-full\n'
    printf 'export DATALAYER_DATABASE_TLS_CA_FILE=%q\n' "$ca"
    printf 'export DATALAYER_KAFKA_BOOTSTRAP=127.0.0.1:%s\n' "$KAFKA_TLS_PORT"
    printf 'export DATALAYER_KAFKA_SECURITY_PROTOCOL=SSL\n'
    printf 'export DATALAYER_KAFKA_TLS_CA_FILE=%q\n' "$ca"
    printf 'export DATALAYER_REDIS_URL=rediss://127.0.0.1:%s/0\n' "$REDIS_TLS_PORT"
    printf 'export DATALAYER_REDIS_TLS_CA_FILE=%q\n' "$ca"
    echo "# mutual TLS too: every server checks a client certificate it is shown against the same CA"
    for v in DATABASE KAFKA REDIS; do
      printf '# export DATALAYER_%s_TLS_CERT_FILE=%q DATALAYER_%s_TLS_KEY_FILE=%q\n' \
        "$v" "$TLS_DIR/client.crt" "$v" "$TLS_DIR/client.key"
    done
  else
    printf 'export DATALAYER_KAFKA_BOOTSTRAP=127.0.0.1:%s\n' "$KAFKA_PORT"
    printf 'export DATALAYER_REDIS_URL=redis://127.0.0.1:%s/0\n' "$REDIS_PORT"
    echo "unset DATALAYER_DATABASE_SSLMODE DATALAYER_KAFKA_SECURITY_PROTOCOL"
    for v in DATABASE KAFKA REDIS; do
      echo "unset DATALAYER_${v}_TLS_CA_FILE DATALAYER_${v}_TLS_CERT_FILE DATALAYER_${v}_TLS_KEY_FILE"
    done
  fi
}

cmd_certs() { # the throwaway CA and certificates only, e.g. for compose.tls.yaml (needs openssl)
  mkdir -p "$STATE" "$LOGS"
  command -v openssl >/dev/null || die "openssl is needed to make the certificates"
  tls_up
  log "tls: CA and certificates in $TLS_DIR (CA $TLS_DIR/ca.crt)"
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
  local names=(postgres redis kafka)
  # TLS endpoints exist once `up` made the certificates (an older state folder has none yet).
  [ ! -f "$TLS_DIR/ready" ] || names+=(postgres-tls redis-tls kafka-tls)
  for name in "${names[@]}"; do
    case $name in
      postgres | postgres-tls) port=$PG_PORT ;;
      redis) port=$REDIS_PORT ;;
      redis-tls) port=$REDIS_TLS_PORT ;;
      kafka) port=$KAFKA_PORT ;;
      kafka-tls) port=$KAFKA_TLS_PORT ;;
    esac
    local args=("$name" "$port")
    case $name in *-tls) args+=("$TLS_DIR/ca.crt") ;; esac
    if [ -x "$PY" ] && probe "${args[@]}" 2>/dev/null; then :; else
      printf '%-14s down (127.0.0.1:%s)\n' "$name" "$port"; rc=1
    fi
  done
  return $rc
}

case "${1:-}" in
  up) shift; cmd_up "$@" ;;
  down) cmd_down ;;
  status) cmd_status ;;
  env) shift; cmd_env "$@" ;;
  certs) cmd_certs ;;
  *) die "usage: stack/stack.sh up [--tls] | down | status | env [--tls] | certs" ;;
esac
