#!/usr/bin/env bash
# Disposable PostgreSQL for tests and the quickstart: real server binaries, a temporary
# directory, wal_level=logical, a free loopback port. No container engine needed.
#
#   testcontainers/pg.sh start DIR [PORT]     init (if needed) and start; prints PGPORT=, PGHOST=, DSN=
#   testcontainers/pg.sh stop DIR [MODE]      stop (MODE: smart|fast|immediate, default fast)
#   testcontainers/pg.sh restart DIR [MODE]   stop and start again on the same port
#   testcontainers/pg.sh psql DIR [ARGS…]     psql as the superuser `postgres`
#
# PG_WAL_LEVEL overrides wal_level (default logical; tests use replica to see it refused);
# PG_MAX_CONNECTIONS overrides max_connections (default 100).
# Server binaries: $PG_BINDIR if set; else with W2D_PG_VERSION=N (a major version)
# /usr/lib/postgresql/N/bin or what `python3 testcontainers/pg-fetch.py N` unpacked; else the
# directory of `initdb` on PATH, else the newest /usr/lib/postgresql/*/bin. psql comes from
# the same directory when it has one (npm's server packages do not), else from PATH or
# /usr/lib/postgresql. Run as root, the server runs as the `postgres` user (or `nobody`),
# because PostgreSQL refuses to run as root.
set -euo pipefail

die() { echo "testcontainers/pg.sh: $*" >&2; exit 1; }

find_bindir() {
  if [ -n "${PG_BINDIR:-}" ]; then
    [ -x "$PG_BINDIR/initdb" ] || die "PG_BINDIR=$PG_BINDIR has no initdb"
    echo "$PG_BINDIR"; return
  fi
  if [ -n "${W2D_PG_VERSION:-}" ]; then
    local fetched
    for fetched in "/usr/lib/postgresql/$W2D_PG_VERSION/bin" \
        "${PG_CACHE:-/var/cache/wal2delta-pg}/$W2D_PG_VERSION/native/bin" \
        "${HOME:-/root}/.cache/wal2delta-pg/$W2D_PG_VERSION/native/bin"; do
      if [ -x "$fetched/initdb" ]; then echo "$fetched"; return; fi
    done
    die "no PostgreSQL $W2D_PG_VERSION server binaries found; fetch them with 'python3 $(dirname "$0")/pg-fetch.py $W2D_PG_VERSION' (or apt-get install -y postgresql-$W2D_PG_VERSION)"
  fi
  if command -v initdb >/dev/null 2>&1; then
    dirname "$(readlink -f "$(command -v initdb)")"; return
  fi
  local best
  best=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
  if [ -n "$best" ] && [ -x "$best/initdb" ]; then echo "$best"; return; fi
  die "no PostgreSQL server binaries found (initdb, pg_ctl, postgres). Install them, e.g. 'apt-get install -y postgresql', or set PG_BINDIR to their directory."
}

BINDIR=$(find_bindir)
for b in initdb pg_ctl postgres; do
  [ -x "$BINDIR/$b" ] || die "$BINDIR/$b is missing; install the PostgreSQL server package"
done

find_psql() {
  if [ -x "$BINDIR/psql" ]; then echo "$BINDIR/psql"; return; fi
  if command -v psql >/dev/null 2>&1; then command -v psql; return; fi
  local best
  best=$(ls -d /usr/lib/postgresql/*/bin/psql 2>/dev/null | sort -V | tail -n 1 || true)
  [ -n "$best" ] || die "no psql found next to $BINDIR, on PATH or under /usr/lib/postgresql; install it, e.g. 'apt-get install -y postgresql-client'"
  echo "$best"
}

os_user() {
  if id -u postgres >/dev/null 2>&1; then echo postgres; else echo nobody; fi
}

as_server_user() {
  if [ "$(id -u)" = 0 ]; then
    runuser -u "$(os_user)" -- "$@"
  else
    "$@"
  fi
}

cmd=${1:-}; dir=${2:-}
[ -n "$cmd" ] && [ -n "$dir" ] || die "usage: pg.sh start|stop|restart|psql DIR [ARG]"
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
data="$dir/data"

write_conf() {
  local port=$1
  cat > "$data/postgresql.auto.conf" <<CONF
listen_addresses = '127.0.0.1'
port = $port
unix_socket_directories = '$dir'
wal_level = ${PG_WAL_LEVEL:-logical}
max_replication_slots = 20
max_wal_senders = 20
max_connections = ${PG_MAX_CONNECTIONS:-100}
fsync = off
full_page_writes = off
wal_sender_timeout = '60s'
log_min_messages = warning
logging_collector = off
CONF
  cat > "$data/pg_hba.conf" <<HBA
local all all trust
host all +w2d_scram 127.0.0.1/32 scram-sha-256
host replication +w2d_scram 127.0.0.1/32 scram-sha-256
host all +w2d_md5 127.0.0.1/32 md5
host replication +w2d_md5 127.0.0.1/32 md5
host all all 127.0.0.1/32 trust
host replication all 127.0.0.1/32 trust
HBA
  echo "$port" > "$dir/port"
}

start_server() {
  as_server_user "$BINDIR/pg_ctl" -D "$data" -l "$dir/server.log" -w -t 60 start >/dev/null
}

case "$cmd" in
  start)
    PSQL=$(find_psql)
    if [ "$(id -u)" = 0 ]; then chown "$(os_user)" "$dir"; fi
    if [ ! -f "$data/PG_VERSION" ]; then
      as_server_user "$BINDIR/initdb" -D "$data" -U postgres --auth=trust -E UTF8 --locale=C >"$dir/initdb.log" 2>&1 \
        || die "initdb failed; see $dir/initdb.log"
    fi
    port=${3:-}
    tries=0
    while :; do
      tries=$((tries + 1))
      p=${port:-$((20000 + RANDOM % 40000))}
      write_conf "$p"
      if start_server; then break; fi
      [ -z "$port" ] && [ $tries -lt 20 ] || die "the server did not start; see $dir/server.log"
    done
    as_server_user "$PSQL" -h "$dir" -p "$p" -U postgres -d postgres -qAt -v ON_ERROR_STOP=1 \
      -c "DO \$\$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'w2d_scram') THEN CREATE ROLE w2d_scram NOLOGIN; CREATE ROLE w2d_md5 NOLOGIN; END IF; END \$\$" >/dev/null
    if [ -n "${W2D_PG_VERSION:-}" ]; then
      running=$(as_server_user "$PSQL" -h "$dir" -p "$p" -U postgres -d postgres -qAt -c "SELECT current_setting('server_version_num')::int / 10000")
      [ "$running" = "$W2D_PG_VERSION" ] || die "W2D_PG_VERSION=$W2D_PG_VERSION asked for, but the server in $dir is PostgreSQL $running (a data directory from another version?)"
    fi
    echo "PGHOST=127.0.0.1"
    echo "PGPORT=$p"
    echo "DSN=postgresql://postgres@127.0.0.1:$p/postgres"
    ;;
  stop)
    mode=${3:-fast}
    if [ -f "$data/postmaster.pid" ]; then
      as_server_user "$BINDIR/pg_ctl" -D "$data" -m "$mode" -w -t 60 stop >/dev/null || true
    fi
    ;;
  restart)
    mode=${3:-fast}
    as_server_user "$BINDIR/pg_ctl" -D "$data" -m "$mode" -w -t 60 stop >/dev/null
    start_server || die "the server did not restart; see $dir/server.log"
    ;;
  psql)
    PSQL=$(find_psql)
    shift 2
    as_server_user "$PSQL" -h "$dir" -p "$(cat "$dir/port")" -U postgres -d postgres "$@"
    ;;
  *) die "unknown command $cmd; use start, stop, restart or psql" ;;
esac
