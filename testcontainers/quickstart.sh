#!/usr/bin/env bash
# Quickstart: a disposable Postgres loaded from sql/, and wal2delta replicating it into a
# local lake, in one command:
#
#   bash testcontainers/quickstart.sh
#
# It builds wal2delta (first build: several minutes), starts Postgres in .tmp/quickstart/pg, creates the schema, the
# least-privilege role and the publication (sql/setup.sql), starts the daemon, then loads
# the sample data (sql/sample_data.sql) so the changes stream into .tmp/quickstart/lake.
# The daemon keeps running in the foreground; Ctrl-C stops it and the disposable Postgres.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
work="$root/.tmp/quickstart"
pgdir="$work/pg"
mkdir -p "$work"

# The dev profile (dependencies optimised, see Cargo.toml) shares the test suite's build;
# a release build of the DataFusion stack takes far longer on small machines.
echo "==> building wal2delta"
cargo build --locked --quiet
bin="${CARGO_TARGET_DIR:-$root/target}/debug/wal2delta"

echo "==> starting a disposable PostgreSQL"
eval "$(bash testcontainers/pg.sh start "$pgdir" | grep '^PG')"
cleanup() { bash testcontainers/pg.sh stop "$pgdir" fast || true; }
trap cleanup EXIT
psql_() { bash testcontainers/pg.sh psql "$pgdir" -q -v ON_ERROR_STOP=1 "$@"; }
psql_ -f sql/schema.sql
psql_ -v password=quickstart -f sql/setup.sql

# The SQL endpoint and the metrics listen on loopback; override the ports if taken.
sql_port="${QUICKSTART_SQL_PORT:-5480}"
metrics_port="${QUICKSTART_METRICS_PORT:-9734}"
cat > "$work/wal2delta.toml" <<TOML
[source]
dsn = "host=127.0.0.1 port=$PGPORT user=wal2delta dbname=postgres sslmode=disable"
password_env = "WAL2DELTA_PASSWORD"
slot = "wal2delta"
publication = "wal2delta"
tables = ["public.condominios", "public.imoveis", "public.moradores", "public.transacoes"]

[lake]
path = "$work/lake"

[metrics]
listen = "127.0.0.1:$metrics_port"

[serve]
listen = "127.0.0.1:$sql_port"
# The shipped gold-layer views over the sample schema, served as refined.<name>.
refined_dir = "$root/sql/refined"
TOML

export WAL2DELTA_PASSWORD=quickstart
"$bin" validate --config "$work/wal2delta.toml"
echo "==> starting wal2delta; loading sample data once it streams"
"$bin" run --config "$work/wal2delta.toml" &
daemon=$!
trap 'kill -TERM $daemon 2>/dev/null; wait $daemon 2>/dev/null; cleanup' EXIT INT TERM
for _ in $(seq 1 100); do
  active=$(psql_ -At -c "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'wal2delta' AND active")
  [ "$active" = 1 ] && break
  sleep 0.2
done
psql_ -f sql/sample_data.sql
echo "==> sample data committed; change logs in $work/lake/raw/public/, current rows in $work/lake/curated/public/"
# The rows are in the lake once the slot confirms the position the sample data ended at.
target=$(psql_ -At -c "SELECT pg_current_wal_lsn()")
for _ in $(seq 1 300); do
  done_=$(psql_ -At -c "SELECT confirmed_flush_lsn >= '$target' FROM pg_replication_slots WHERE slot_name = 'wal2delta'")
  [ "$done_" = t ] && break
  sleep 0.2
done
cat <<TEXT

==> wal2delta is replicating. Query the lake over the Postgres protocol (any user name on
    loopback; see docs/sql-endpoint.md for users, passwords and TLS):

    psql "host=127.0.0.1 port=$sql_port dbname=wal2delta user=analyst"

      SELECT status, count(*), sum(valor) FROM transacoes GROUP BY status;  -- current rows
      SELECT _op, count(*) FROM raw.transacoes GROUP BY _op;              -- the change log
      SELECT * FROM refined.saldo_em_atraso LIMIT 5;                      -- a refined view
      \dt  and  \dn                                                  -- tables, schemas

    Metrics:  curl -s http://127.0.0.1:$metrics_port/metrics | grep '^wal2delta_'
    Status:   WAL2DELTA_PASSWORD=quickstart $bin status --config $work/wal2delta.toml
    Config:   $work/wal2delta.toml   (Ctrl-C stops the daemon and the disposable Postgres)
TEXT
wait $daemon
