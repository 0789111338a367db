#!/usr/bin/env python3
"""wal2delta benchmark harness: every figure next to a baseline measured in the same run.

    python3 bench/harness.py [--full] [--only a,b] [--batch-age-ms N] [--binary PATH]
                             [--json OUT] [--svg-dir D]

Starts a disposable Postgres (testcontainers/pg.sh) and, per scenario, a fresh lake and a
wal2delta daemon (a release build: cargo build --release). Scenarios (quick mode / full):

  streaming   N changes (200k / 1M; inserts, updates, deletes in transactions of 1-500
              changes) into the WAL with two identical pgoutput slots; one drained by
              pg_recvlogical, the other by wal2delta into raw + curated. changes/s, ratio.
  snapshot    the initial snapshot of the four demo tables (about 300k / 1.2M rows) into
              curated, against COPY … TO STDOUT of the same tables over one connection.
  queries     point lookup by key and a grouped aggregate over transacoes, through the SQL
              endpoint and directly on Postgres (bench/sql_endpoint.py measures the same).
  memory      the daemon's peak RSS (VmHWM) in each scenario.

  freshness   a fixed insert rate (5,000 rows/s for 10 s; full: 5,000 and 20,000 for 30 s);
              for one transaction every 100 ms, commit to visible through the SQL endpoint:
              p50/p95/p99/max, and an SVG chart with --svg-dir.

  merge       10,000 updates in one transaction into a curated table of 100k and 1M rows
              (full: also 10M), at uniformly random keys and at consecutive keys: merge
              time and bytes rewritten, from the daemon's metrics. On the largest table
              (full: 10M), 18 more uniform merges, then point lookups and the grouped
              aggregate through each daemon's endpoint; then both lakes served at once by
              `wal2delta serve` and the aggregate run on them in turn, 15 rounds
              (merge_aggregate: deletion vectors against copy-on-write).
  verify      `wal2delta verify` of transacoes (300k / 1.2M rows) while the daemon runs,
              against COPY … TO STDOUT of the same table (what a naive compare exports);
              then `wal2delta resync` of it, against the same COPY.
  neighbour   the source's own query latency (pgbench -S, 4 clients) alone, during an
              unthrottled snapshot of transacoes, and during one capped at
              source.snapshot_max_mb_per_sec = 10.
  sql_load    freshness at 5,000 rows/s (10 s; full: 30 s) with no SQL clients and with 16
              clients running the grouped aggregate of `queries` on the endpoint: commit to
              durable in the lake and commit to visible through the endpoint.
  object_store
              the lake on moto's S3 server (PyPI moto[server], started on a free loopback
              port) against a local lake in the same run: the initial snapshot of the four
              demo tables into each, then N changes (300k / 1M) drained from two identical
              slots into each; changes/s, the S3/local ratio, and Delta commit latency per
              layer (p50/p95 from the daemon's histogram buckets, and the mean).
  large_transaction
              one 2,000,000-row source transaction, drained from identical slots by
              pg_recvlogical and by wal2delta into raw + curated: time, ratio, peak RSS.

--only picks scenarios (snapshot, queries, streaming, merge, verify, neighbour,
large_transaction, freshness, sql_load, object_store);
--batch-age-ms sets apply.max_batch_age_ms for every daemon. Needs psycopg and deltalake.

Micro-benchmarks of the decoder and the batch builder: cargo bench (benches/).
"""
import argparse
import contextlib
import json
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import psycopg

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNNING = []  # every daemon started, killed when the harness exits early
APPLY = ""  # extra [apply] settings for every daemon (--batch-age-ms)


def add_binary_argument(ap):
    """`--binary`: the wal2delta to run (default: the release build in the target directory)."""
    ap.add_argument("--binary", default=os.path.join(
        os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target")), "release", "wal2delta"))


def require_binary(path):
    if not os.path.exists(path):
        sys.exit(f"no wal2delta binary at {path}; build it (cargo build --release) or pass --binary")
SCENARIOS = ["snapshot", "queries", "streaming", "merge", "merge_aggregate", "verify", "neighbour", "large_transaction",
             "freshness", "sql_load", "object_store"]
TABLES = ["public.condominios", "public.imoveis", "public.moradores", "public.transacoes"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pg_script(cmd, d, *args):
    return subprocess.run(["bash", f"{ROOT}/testcontainers/pg.sh", cmd, d, *args],
                          check=True, capture_output=True, text=True).stdout


def bindir_tool(name):
    for d in [os.environ.get("PG_BINDIR", "")] + sorted(
            [f"/usr/lib/postgresql/{v}/bin" for v in os.listdir("/usr/lib/postgresql")]
            if os.path.isdir("/usr/lib/postgresql") else [], reverse=True):
        if d and os.path.exists(os.path.join(d, name)):
            return os.path.join(d, name)
    found = shutil.which(name)
    if not found:
        sys.exit(f"{name} not found: install the PostgreSQL client and server binaries")
    return found


class Daemon:
    """A wal2delta daemon on its own lake, with its peak RSS read at stop."""

    def __init__(self, binary, work, dsn, slot, extra_source="", name="d", tables=TABLES,
                 publication="w2d_pub", lake=None, lake_extra=""):
        self.work = work
        self.lake = lake or os.path.join(work, f"lake-{name}")
        self.serve_port = free_port()
        self.metrics_port = free_port()
        self.config = os.path.join(work, f"{name}.toml")
        with open(self.config, "w") as f:
            f.write(f"""[source]
dsn = "{dsn} sslmode=disable"
slot = "{slot}"
publication = "{publication}"
tables = {json.dumps(tables)}
{extra_source}
[lake]
path = "{self.lake}"
[metrics]
listen = "127.0.0.1:{self.metrics_port}"
{APPLY}[serve]
listen = "127.0.0.1:{self.serve_port}"
refined_dir = "{ROOT}/sql/refined"
{lake_extra}""")
        self.log = open(os.path.join(work, f"{name}.log"), "w")
        self.proc = subprocess.Popen([binary, "run", "--config", self.config],
                                     stdout=self.log, stderr=self.log)
        self.hwm_kb = 0
        RUNNING.append(self.proc)

    def sample_rss(self):
        try:
            with open(f"/proc/{self.proc.pid}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        self.hwm_kb = max(self.hwm_kb, int(line.split()[1]))
        except OSError:
            pass

    def alive(self):
        if self.proc.poll() is not None:
            sys.exit(f"the daemon exited; see {self.log.name}")

    def wait_streaming(self):
        """Waits until the initial snapshot is done and the daemon streams."""
        while True:
            self.alive()
            self.sample_rss()
            log = open(self.log.name).read()
            if "initial snapshot" in log and "streaming" in log:
                return
            # Polled often: the wait is part of the time measured against COPY.
            time.sleep(0.005)

    def wait_confirmed(self, conn, slot, lsn):
        """Waits until the daemon has confirmed `lsn` as flushed on `slot`."""
        while not lsn_ge(conn, confirmed(conn, slot), lsn):
            self.alive()
            self.sample_rss()
            time.sleep(0.02)

    def metrics(self):
        """The daemon's Prometheus samples: {'name{labels}': value}."""
        import urllib.request
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics").read().decode()
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out

    def lake_dsn(self):
        return f"host=127.0.0.1 port={self.serve_port} user=bench dbname=wal2delta"

    def wait_served(self, rows):
        """Waits until the SQL endpoint serves at least `rows` rows of transacoes."""
        while True:
            self.alive()
            self.sample_rss()
            try:
                with psycopg.connect(self.lake_dsn(), autocommit=True) as c:
                    if c.execute("SELECT count(*) FROM transacoes").fetchone()[0] >= rows:
                        return
            except psycopg.Error:
                pass
            time.sleep(0.2)

    def stop(self):
        self.sample_rss()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        return round(self.hwm_kb / 1024, 1)


def confirmed(conn, slot):
    return conn.execute("SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = %s",
                        (slot,)).fetchone()[0]


def lsn_ge(conn, a, b):
    return conn.execute("SELECT %s::pg_lsn >= %s::pg_lsn", (str(a), str(b))).fetchone()[0]


def recvlogical_seconds(conn, slot, end_lsn):
    """The baseline reader: pg_recvlogical drains `slot` (pgoutput, w2d_pub) up to
    `end_lsn` into /dev/null. Returns the seconds it took."""
    start = time.perf_counter()
    subprocess.run([bindir_tool("pg_recvlogical"), "-h", "127.0.0.1", "-p", str(conn.info.port), "-U", "postgres",
                    "-d", "postgres", "--slot", slot, "--start", "--endpos", str(end_lsn),
                    "-o", "proto_version=1", "-o", "publication_names=w2d_pub", "-f", "/dev/null"],
                   check=True, capture_output=True)
    return time.perf_counter() - start


def metric_total(samples, name, *labels):
    """Sum of the samples of `name` (e.g. `x_sum`) whose labels include every one of `labels`."""
    return sum(v for k, v in samples.items()
               if k.split("{")[0] == name and all(l in k for l in labels))


@contextlib.contextmanager
def disposable_postgres(prefix):
    """A work directory and a Postgres started by testcontainers/pg.sh: yields (work, dsn).
    On exit, kills the daemons still running, stops Postgres and (unless KEEP is set)
    deletes both directories."""
    work = tempfile.mkdtemp(prefix=f"{prefix}-")
    # Its own top-level directory: pg.sh hands it to the server's (unprivileged) user.
    pgdir = tempfile.mkdtemp(prefix=f"{prefix}-pg-")
    try:
        port = int([l for l in pg_script("start", pgdir).splitlines() if l.startswith("PGPORT=")][0][7:])
        yield work, f"host=127.0.0.1 port={port} user=postgres dbname=postgres"
    finally:
        for proc in RUNNING:
            if proc.poll() is None:
                proc.kill()
        try:
            pg_script("stop", pgdir)
        except Exception:
            pass
        if not os.environ.get("KEEP"):
            shutil.rmtree(work, ignore_errors=True)
            shutil.rmtree(pgdir, ignore_errors=True)


def load_demo(conn, transacoes):
    conn.execute(open(f"{ROOT}/sql/schema.sql").read())
    conn.execute(open(f"{ROOT}/sql/sample_data.sql").read().replace("\\gset", ";"))
    conn.execute(f"""
        INSERT INTO transacoes (imovel_id, tipo, status, valor, competencia, vencimento, detalhes)
        SELECT 1 + g % 400,
               (ARRAY['taxa_condominial','multa','fundo_reserva','acordo','pagamento'])[1 + g % 5],
               (ARRAY['aberta','paga','atrasada','cancelada'])[1 + g % 4],
               (g % 100000) / 100.0 + 1, '2025-' || lpad((1 + g % 12)::text, 2, '0'),
               date '2025-01-10' + (g % 365), jsonb_build_object('lote', g)
        FROM generate_series(1, {transacoes}) g""")
    conn.execute("VACUUM ANALYZE")


def scenario_snapshot(args, work, dsn, conn):
    rows = sum(conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in TABLES)
    # Baseline: COPY of the same tables over one connection, rows read and discarded.
    start = time.perf_counter()
    with psycopg.connect(dsn) as c, c.cursor() as cur:
        for t in TABLES:
            with cur.copy(f"COPY {t} TO STDOUT") as copy:
                for _ in copy:
                    pass
    copy_s = time.perf_counter() - start
    # The bytes of that COPY text, counted in a second pass (outside the timed one).
    copy_bytes = 0
    with psycopg.connect(dsn) as c, c.cursor() as cur:
        for t in TABLES:
            with cur.copy(f"COPY {t} TO STDOUT") as copy:
                for data in copy:
                    copy_bytes += len(data)
    start = time.perf_counter()
    d = Daemon(args.binary, work, dsn, "bench_snap", os.environ.get("SNAP_EXTRA", ""), name="snapshot")
    lake_dsn = d.lake_dsn()
    want = conn.execute("SELECT count(*) FROM transacoes").fetchone()[0]
    d.wait_streaming()
    snap_s = time.perf_counter() - start
    with psycopg.connect(lake_dsn, autocommit=True) as c:
        got = c.execute("SELECT count(*) FROM transacoes").fetchone()[0]
    assert got == want, f"curated transacoes has {got} rows, source {want}"
    rss = d.stop()
    conn.execute("SELECT pg_drop_replication_slot('bench_snap')")
    # The same tables copied in chunks while streaming (source.snapshot_method = "watermark"):
    # from the start until every table's copy is durable.
    start = time.perf_counter()
    d = Daemon(args.binary, work, dsn, "bench_snap_wm", 'snapshot_method = "watermark"', name="snapshot_watermark")
    lake_dsn = d.lake_dsn()
    while True:
        d.alive()
        d.sample_rss()
        if open(d.log.name).read().count("chunked copy complete") >= len(TABLES):
            break
        time.sleep(0.05)
    # Durable with the batch that holds the last chunk: the endpoint shows it then.
    while True:
        d.alive()
        try:
            with psycopg.connect(lake_dsn, autocommit=True) as c:
                got = c.execute("SELECT count(*) FROM transacoes").fetchone()[0]
        except psycopg.Error:
            got = -1
        if got == want:
            break
        time.sleep(0.05)
    wm_s = time.perf_counter() - start
    wm_rss = d.stop()
    conn.execute("SELECT pg_drop_replication_slot('bench_snap_wm')")
    return {"rows": rows, "wal2delta_s": round(snap_s, 2), "copy_one_connection_s": round(copy_s, 2),
            "ratio_vs_copy": round(copy_s / snap_s, 2), "peak_rss_mb": rss,
            # Rates over the whole run (start-up included), MB as COPY's text output.
            "rows_per_s": round(rows / snap_s), "mb_per_s": round(copy_bytes / 1e6 / snap_s, 1),
            "copy_rows_per_s": round(rows / copy_s), "copy_mb_per_s": round(copy_bytes / 1e6 / copy_s, 1),
            "watermark_s": round(wm_s, 2), "watermark_ratio_vs_copy": round(copy_s / wm_s, 2),
            "watermark_peak_rss_mb": wm_rss}


def write_changes(conn, dsn, n):
    """N changes to transacoes (inserts, updates, deletes in transactions of 1-500 changes,
    the same sequence every run). Returns (changes made, WAL position after them)."""
    made = 0
    rng = random.Random(42)
    base = conn.execute("SELECT max(id) FROM transacoes").fetchone()[0]
    next_id = base + 1
    with psycopg.connect(dsn, autocommit=True) as w:
        while made < n:
            size = min(n - made, rng.choice([1, 5, 20, 100, 500]))
            kind = rng.random()
            if kind < 0.5:
                w.execute(f"""INSERT INTO transacoes (id, imovel_id, tipo, status, valor, competencia, vencimento)
                    SELECT g, 1 + g % 400, 'multa', 'aberta', 10.5, '2025-02', date '2025-02-10'
                    FROM generate_series({next_id}, {next_id + size - 1}) g""")
                next_id += size
            elif kind < 0.85:
                lo = rng.randint(1, base - size)
                w.execute(f"UPDATE transacoes SET valor = valor + 1 WHERE id BETWEEN {lo} AND {lo + size - 1}")
            else:
                lo = rng.randint(base + 1, max(base + 2, next_id - size))
                r = w.execute(f"DELETE FROM transacoes WHERE id BETWEEN {lo} AND {lo + size - 1}")
                size = r.rowcount
            made += size
    return made, conn.execute("SELECT pg_current_wal_lsn()").fetchone()[0]


def scenario_streaming(args, work, dsn, conn):
    """The same changes drained from three slots: by pg_recvlogical, and by wal2delta
    into raw + curated with deletion vectors on (the default) and off (copy-on-write)."""
    conn.execute("SELECT pg_create_logical_replication_slot('bench_recv', 'pgoutput')")
    conn.execute("SELECT pg_create_logical_replication_slot('bench_w2d', 'pgoutput')")
    conn.execute("SELECT pg_create_logical_replication_slot('bench_w2d_cow', 'pgoutput')")
    start_lsn = conn.execute("SELECT pg_current_wal_lsn()").fetchone()[0]
    made, end_lsn = write_changes(conn, dsn, args.changes)
    recv_s = recvlogical_seconds(conn, "bench_recv", end_lsn)
    # wal2delta drains the other slots into raw + curated (no snapshot: the tables are
    # not copied, only the changes streamed).
    out = {"changes": made, "wal_bytes": int(conn.execute("SELECT %s::pg_lsn - %s::pg_lsn",
                                                          (str(end_lsn), str(start_lsn))).fetchone()[0]),
           "pg_recvlogical_changes_per_s": round(made / recv_s),
           "note": "wal2delta time includes start-up, writing raw + curated Delta tables and the checkpoint"}
    for slot, name, extra, suffix in (("bench_w2d", "stream", "", ""),
                                      ("bench_w2d_cow", "stream_cow", "[curated]\ndeletion_vectors = false\n", "_cow")):
        start = time.perf_counter()
        d = Daemon(args.binary, work, dsn, slot, 'snapshot = "never"\ncreate_slot = false', name=name,
                   lake_extra=extra)
        d.wait_confirmed(conn, slot, end_lsn)
        w2d_s = time.perf_counter() - start
        out[f"wal2delta{suffix}_changes_per_s"] = round(made / w2d_s)
        out[f"ratio{suffix}_vs_pg_recvlogical"] = round(recv_s / w2d_s, 2)
        out[f"peak_rss{suffix}_mb"] = d.stop()
    for s in ("bench_recv", "bench_w2d", "bench_w2d_cow"):
        conn.execute(f"SELECT pg_drop_replication_slot('{s}')")
    return out


def dir_bytes(path):
    """Bytes of every file under `path`."""
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def scenario_merge(args, work, dsn, conn, size, dv):
    """10,000 updates, in one transaction, into a curated table of `size` rows: twice at
    keys drawn uniformly from the whole table (the first merge after the snapshot reads
    every file's key column and fills the key index, the second finds its rows in the
    index), once at 10,000 consecutive keys; with deletion vectors on (`dv`) or off
    (files rewritten). The merge time and the bytes rewritten come from the daemon's
    metrics, the bytes written from the table's directory; `durable_s` is commit to
    confirmed_flush (it includes the batch's max_batch_age_ms wait). On the largest
    table, 18 more uniform merges follow (20 in all), then point lookups and a grouped
    aggregate through the SQL endpoint."""
    t = f"merge_{size}_{'dv' if dv else 'cow'}"
    conn.execute(f"DROP TABLE IF EXISTS {t}")
    conn.execute(f"""CREATE TABLE {t} (id bigint PRIMARY KEY, account int NOT NULL,
        amount numeric(12,2) NOT NULL, status text NOT NULL, note text,
        updated_at timestamptz NOT NULL DEFAULT now())""")
    conn.execute(f"""INSERT INTO {t} SELECT g, g % 1000, (g % 100000) / 100.0,
        (ARRAY['open','paid','late'])[1 + g % 3], 'row ' || g, now()
        FROM generate_series(1, {size}) g""")
    conn.execute(f"VACUUM ANALYZE {t}")
    conn.execute(f"CREATE PUBLICATION {t}_pub FOR TABLE {t}")
    slot = f"bench_{t}"
    d = Daemon(args.binary, work, dsn, slot, name=t, tables=[f"public.{t}"], publication=f"{t}_pub",
               lake_extra=f"[curated]\ndeletion_vectors = {'true' if dv else 'false'}\n")
    start = time.perf_counter()
    d.wait_streaming()
    snapshot_s = time.perf_counter() - start
    rng = random.Random(size)
    label = f'table="public.{t}"'
    out = {"rows": size, "deletion_vectors": dv, "snapshot_s": round(snapshot_s, 1)}
    def update(ids):
        conn.execute(f"UPDATE {t} SET amount = amount + 1, updated_at = now() WHERE id = ANY(%s)", (ids,))
        lsn = conn.execute("SELECT pg_current_wal_lsn()").fetchone()[0]
        d.wait_confirmed(conn, slot, lsn)

    for pattern in MERGE_PATTERNS:
        if pattern.startswith("random"):
            ids = rng.sample(range(1, size + 1), 10_000)
        else:
            lo = rng.randint(1, size - 10_000)
            ids = list(range(lo, lo + 10_000))
        before = d.metrics()
        table_dir = os.path.join(d.lake, "curated", "public", t)
        bytes_before = dir_bytes(table_dir)
        committed = time.perf_counter()
        update(ids)
        durable_s = time.perf_counter() - committed
        after = d.metrics()

        def delta(name, *labels):
            return metric_total(after, name, label, *labels) - metric_total(before, name, label, *labels)
        from deltalake import DeltaTable
        files = [u.removeprefix("file://") for u in DeltaTable(table_dir).file_uris()]
        table_bytes = sum(os.path.getsize(f) for f in files)
        out[pattern] = {
            "merge_s": round(delta("wal2delta_merge_seconds_sum"), 3),
            "commit_s": round(delta("wal2delta_delta_commit_duration_seconds_sum", 'layer="curated"'), 3),
            "durable_s": round(durable_s, 2),
            "files_scanned": int(delta("wal2delta_merge_scanned_files_total")),
            "files_rewritten": int(delta("wal2delta_merge_rewritten_files_total")),
            "bytes_rewritten": int(delta("wal2delta_merge_rewritten_bytes_total")),
            "bytes_written": dir_bytes(table_dir) - bytes_before,
            "rows_marked": int(delta("wal2delta_merge_marked_rows_total")),
            "table_files": len(files),
            "table_bytes": table_bytes,
        }
    if size == args.merge_sizes[-1]:
        before = d.metrics()
        for _ in range(18):
            update(rng.sample(range(1, size + 1), 10_000))
        after = d.metrics()
        out["absorbed"] = {"merges": 20, "merge_mean_s": round(
            (metric_total(after, "wal2delta_merge_seconds_sum", label)
             - metric_total(before, "wal2delta_merge_seconds_sum", label)) / 18, 3)}
        lookup = f"SELECT id, account, amount, status FROM {t} WHERE id = %s"
        aggregate = MERGE_AGGREGATE.format(table=t)
        with psycopg.connect(d.lake_dsn(), autocommit=True) as c:
            def timed(sql, params=None, prepare=None):
                t0 = time.perf_counter()
                c.execute(sql, params, prepare=prepare).fetchall()
                return time.perf_counter() - t0
            ids = [rng.randint(1, size) for _ in range(args.lookups)]
            for i in ids[:50]:
                timed(lookup, (i,), True)
            lat = sorted(timed(lookup, (i,), True) for i in ids)
            timed(aggregate)
            aggs = [timed(aggregate) for _ in range(5)]
            if os.environ.get("BENCH_EXPLAIN"):
                plan = c.execute(f"EXPLAIN ANALYZE SELECT id, account, amount, status FROM {t} WHERE id = {ids[0]}").fetchall()
                print("\n".join(str(r[-1]) for r in plan), file=sys.stderr)
        out["absorbed"].update({"lookup_p50_ms": round(lat[len(lat) // 2] * 1e3, 2),
                                "lookup_p99_ms": round(lat[int(len(lat) * 0.99)] * 1e3, 2),
                                "aggregate_median_ms": round(statistics.median(aggs) * 1e3, 1)})
        out["served"] = {"config": d.config, "port": d.serve_port, "table": t}
    out["peak_rss_mb"] = d.stop()
    conn.execute(f"SELECT pg_drop_replication_slot('{slot}')")
    conn.execute(f"DROP PUBLICATION {t}_pub")
    conn.execute(f"DROP TABLE {t}")
    return out


def compare_aggregates(args, merges, rounds=15):
    """The grouped aggregate on the largest merge table, copy-on-write against deletion
    vectors, both lakes served at once by `wal2delta serve` and the query run on them in
    turn (which one goes first alternates): the VM's speed moves by up to 30% within
    minutes, more than the 10% this compares, so the two daemons' own figures, minutes
    apart, cannot settle it. Returns medians and the median of the per-round ratios."""
    served = {m["deletion_vectors"]: m.pop("served") for m in merges if "served" in m}
    if len(served) != 2:
        return None
    procs = {}
    try:
        for dv, s in served.items():
            log = open(s["config"] + ".serve.log", "w")
            procs[dv] = subprocess.Popen([args.binary, "serve", "--config", s["config"]], stdout=log, stderr=log)
            RUNNING.append(procs[dv])
        conns = {}
        for dv, s in served.items():
            deadline = time.time() + 120
            while dv not in conns:
                if procs[dv].poll() is not None:
                    sys.exit(f"wal2delta serve exited; see {s['config']}.serve.log")
                try:
                    conns[dv] = psycopg.connect(f"host=127.0.0.1 port={s['port']} user=bench dbname=wal2delta",
                                                autocommit=True)
                except psycopg.Error:
                    if time.time() > deadline:
                        raise
                    time.sleep(0.2)
        sql = {dv: MERGE_AGGREGATE.format(table=s["table"]) for dv, s in served.items()}
        answers = {dv: conns[dv].execute(sql[dv]).fetchall() for dv in served}  # warms each
        times = {False: [], True: []}
        for i in range(rounds):
            for dv in ((False, True) if i % 2 == 0 else (True, False)):
                t0 = time.perf_counter()
                conns[dv].execute(sql[dv]).fetchall()
                times[dv].append(time.perf_counter() - t0)
        if os.environ.get("BENCH_EXPLAIN"):
            for dv in served:
                plan = conns[dv].execute("EXPLAIN ANALYZE " + sql[dv]).fetchall()
                print(f"-- {'deletion vectors' if dv else 'copy-on-write'}", file=sys.stderr)
                print("\n".join(str(r[-1]) for r in plan), file=sys.stderr)
        for c in conns.values():
            c.close()
    finally:
        for p in procs.values():
            p.send_signal(signal.SIGTERM)
            p.wait(timeout=60)
    ratios = [d / c for c, d in zip(times[False], times[True])]
    return {"rounds": rounds, "same_answer": answers[False] == answers[True],
            "cow_median_ms": round(statistics.median(times[False]) * 1e3, 1),
            "dv_median_ms": round(statistics.median(times[True]) * 1e3, 1),
            "dv_over_cow_median_of_rounds": round(statistics.median(ratios), 3),
            "dv_over_cow_per_round": [round(r, 3) for r in ratios]}


MERGE_PATTERNS = ("random", "random_again", "clustered")
# The grouped aggregate the merge scenario runs on its largest table after 20 merges.
MERGE_AGGREGATE = ("SELECT status, account % 10, count(*), sum(amount), avg(amount) FROM {table} "
                   "GROUP BY 1, 2 ORDER BY 1, 2")


def copy_seconds(dsn, table):
    """Baseline: COPY of `table` over one connection, rows read and discarded."""
    start = time.perf_counter()
    with psycopg.connect(dsn) as c, c.cursor() as cur:
        with cur.copy(f"COPY {table} TO STDOUT") as copy:
            for _ in copy:
                pass
    return time.perf_counter() - start


def timed_resync(args, d):
    """Seconds `wal2delta resync` of transacoes takes on daemon `d`, until it answers."""
    start = time.perf_counter()
    res = subprocess.run([args.binary, "resync", "--config", d.config, "--table", "public.transacoes", "--json"],
                         capture_output=True, text=True)
    assert res.returncode == 0, f"resync exited {res.returncode}: {res.stdout}{res.stderr}"
    return time.perf_counter() - start


def scenario_verify(args, work, dsn, conn):
    rows = conn.execute("SELECT count(*) FROM transacoes").fetchone()[0]
    d = Daemon(args.binary, work, dsn, "bench_verify", name="verify", tables=["public.transacoes"])
    d.wait_streaming()
    copy_s = copy_seconds(dsn, "transacoes")
    start = time.perf_counter()
    out = subprocess.run([args.binary, "verify", "--config", d.config, "--json"], capture_output=True, text=True)
    verify_s = time.perf_counter() - start
    assert out.returncode == 0, f"verify exited {out.returncode}: {out.stdout}{out.stderr}"
    table = json.loads(out.stdout)["tables"][0]
    resync_s = timed_resync(args, d)
    rss = d.stop()
    conn.execute("SELECT pg_drop_replication_slot('bench_verify')")
    # The same resync in chunks into the live tables (snapshot_method = "watermark"), once
    # that daemon's own first copy is complete.
    d = Daemon(args.binary, work, dsn, "bench_verify_wm", 'snapshot_method = "watermark"', name="verify_watermark",
               tables=["public.transacoes"])
    while "chunked copy complete" not in open(d.log.name).read():
        d.alive()
        d.sample_rss()
        time.sleep(0.05)
    chunks_s = timed_resync(args, d)
    chunks_rss = d.stop()
    conn.execute("SELECT pg_drop_replication_slot('bench_verify_wm')")
    return {"rows": rows, "verify_s": round(verify_s, 2), "verify_source_read_s": table["source_read_ms"] / 1000,
            "verify_lake_read_s": table["lake_read_ms"] / 1000, "key_ranges": table["ranges"],
            "copy_one_connection_s": round(copy_s, 2), "verify_vs_copy": round(verify_s / copy_s, 2),
            "resync_s": round(resync_s, 2), "resync_vs_copy": round(resync_s / copy_s, 2), "peak_rss_mb": rss,
            "resync_in_chunks_s": round(chunks_s, 2), "resync_in_chunks_vs_copy": round(chunks_s / copy_s, 2),
            "resync_in_chunks_peak_rss_mb": chunks_rss}


def pgbench_during(dsn, until):
    """Runs pgbench -S (4 clients) with per-second progress until `until()` is true (at
    least 3 s); returns (mean latency ms, mean tps) over those seconds."""
    port = [p.split("=")[1] for p in dsn.split() if p.startswith("port=")][0]
    proc = subprocess.Popen([bindir_tool("pgbench"), "-h", "127.0.0.1", "-p", port, "-U", "postgres", "-S",
                             "-c", "4", "-j", "2", "-T", "600", "--progress=1", "postgres"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    start = time.perf_counter()
    while not until() or time.perf_counter() - start < 3:
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=30)[1]
    lat, tps = [], []
    for line in err.splitlines():
        if line.startswith("progress:") and " lat " in line:
            parts = line.replace(",", "").split()
            tps.append(float(parts[parts.index("tps") - 1]))
            lat.append(float(parts[parts.index("lat") + 1]))
    return round(statistics.mean(lat), 3), round(statistics.mean(tps))


def scenario_neighbour(args, work, dsn, conn):
    subprocess.run([bindir_tool("pgbench"), "-h", "127.0.0.1", "-p",
                    [p.split("=")[1] for p in dsn.split() if p.startswith("port=")][0],
                    "-U", "postgres", "-i", "-s", "10", "-q", "postgres"], check=True, capture_output=True)
    t0 = time.perf_counter()
    alone = pgbench_during(dsn, lambda: time.perf_counter() - t0 > 5)
    out = {"alone": {"lat_ms": alone[0], "tps": alone[1]}}
    for label, extra in (("unthrottled", ""), ("throttled_10_mb_s", "snapshot_max_mb_per_sec = 10")):
        slot = f"bench_nb_{label[:5]}"
        d = Daemon(args.binary, work, dsn, slot, extra, name=f"neighbour-{label}", tables=["public.transacoes"])
        started = time.perf_counter()
        log = d.log.name
        done = lambda: "table snapshot committed" in open(log).read()
        lat, tps = pgbench_during(dsn, done)
        snap_s = time.perf_counter() - started
        d.stop()
        conn.execute(f"SELECT pg_drop_replication_slot('{slot}')")
        out[label] = {"lat_ms": lat, "tps": tps, "snapshot_s": round(snap_s, 2)}
    for label in ("unthrottled", "throttled_10_mb_s"):
        out[label]["lat_vs_alone"] = round(out[label]["lat_ms"] / out["alone"]["lat_ms"], 2)
    return out


def scenario_large_transaction(args, work, dsn, conn):
    """One source transaction of `rows` inserts into transacoes while the daemon runs
    (streaming running transactions, the default on PostgreSQL 14+): the time from its
    commit to durable in raw and curated, the daemon's peak RSS, and what Postgres
    spilled to pg_replslot or streamed for it (pg_stat_replication_slots). Next to it,
    from slots made at the same position and drained after the commit: the daemon with
    stream_in_progress = false (protocol 1: Postgres decodes the transaction only after
    its commit) and pg_recvlogical (protocol 1). BENCH_SOURCE_EXTRA: lines added to the
    streaming daemon's [source] section (e.g. `decoding_work_mem_mb = 0`)."""
    import threading
    rows = args.large_txn
    slots = ("bench_big", "bench_big_v1", "bench_big_recv")
    for s in slots:
        conn.execute(f"SELECT pg_create_logical_replication_slot('{s}', 'pgoutput')")
    conn.execute("SELECT pg_stat_reset_replication_slot(NULL)")
    base = conn.execute("SELECT max(id) FROM transacoes").fetchone()[0] + 10_000_000
    d = Daemon(args.binary, work, dsn, "bench_big", 'snapshot = "never"\ncreate_slot = false\n'
               + os.environ.get("BENCH_SOURCE_EXTRA", ""), name="big")
    while "streaming" not in open(d.log.name).read():
        d.alive()
        time.sleep(0.05)
    running = [True]
    def sample():
        while running[0]:
            d.sample_rss()
            time.sleep(0.1)
    sampler = threading.Thread(target=sample)
    sampler.start()
    start = time.perf_counter()
    conn.execute(f"""INSERT INTO transacoes (id, imovel_id, tipo, status, valor, competencia, vencimento, detalhes)
        SELECT g, 1 + g % 400, 'multa', 'aberta', 10.5, '2025-04', date '2025-04-10', jsonb_build_object('lote', g)
        FROM generate_series({base + 1}, {base + rows}) g""")
    committed = time.perf_counter()
    insert_s = committed - start
    # BENCH_PERF=FILE: a `perf record` profile of the daemon from the commit to durable
    # (BENCH_PERF_ARGS: perf's options, `-g` unless set).
    perf = os.environ.get("BENCH_PERF") and subprocess.Popen(
        ["perf", "record", *os.environ.get("BENCH_PERF_ARGS", "-g").split(), "-p", str(d.proc.pid),
         "-o", os.environ["BENCH_PERF"]],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    lsn = conn.execute("SELECT pg_current_wal_lsn()").fetchone()[0]
    d.wait_confirmed(conn, "bench_big", lsn)
    streamed_s = time.perf_counter() - committed
    if perf:
        perf.send_signal(signal.SIGINT)
        perf.wait()
    running[0] = False
    sampler.join()
    rss = d.stop()
    start = time.perf_counter()
    d1 = Daemon(args.binary, work, dsn, "bench_big_v1",
                'snapshot = "never"\ncreate_slot = false\nstream_in_progress = false', name="big_v1")
    d1.wait_confirmed(conn, "bench_big_v1", lsn)
    v1_s = time.perf_counter() - start
    rss_v1 = d1.stop()
    recv_s = recvlogical_seconds(conn, "bench_big_recv", lsn)
    stats = {r[0]: {"spill_txns": r[1], "spill_mb": round(r[2] / 2**20, 1), "stream_txns": r[3],
                    "stream_mb": round(r[4] / 2**20, 1)}
             for r in conn.execute("""SELECT slot_name, spill_txns, spill_bytes, stream_txns, stream_bytes
                                      FROM pg_stat_replication_slots WHERE slot_name LIKE 'bench_big%'""")}
    for s in slots:
        conn.execute(f"SELECT pg_drop_replication_slot('{s}')")
    conn.execute(f"DELETE FROM transacoes WHERE id > {base}")
    return {"rows": rows, "source_insert_s": round(insert_s, 1),
            "commit_to_durable_s": round(streamed_s, 1), "peak_rss_mb": rss, "postgres": stats["bench_big"],
            "protocol_1_drain_s": round(v1_s, 1), "protocol_1_peak_rss_mb": rss_v1,
            "protocol_1_postgres": stats["bench_big_v1"],
            "pg_recvlogical_s": round(recv_s, 1), "pg_recvlogical_postgres": stats["bench_big_recv"],
            "note": "commit_to_durable_s: the daemon ran during the transaction; the protocol 1 drain and "
                    "pg_recvlogical read the committed transaction from their slots (the drain includes start-up)"}


def scenario_queries(args, work, dsn, conn):
    d = Daemon(args.binary, work, dsn, "bench_q", name="queries")
    lake_dsn = d.lake_dsn()
    want = conn.execute("SELECT count(*) FROM transacoes").fetchone()[0]
    d.wait_served(want)
    agg = AGGREGATE
    lookup = "SELECT id, imovel_id, tipo, status, valor, vencimento FROM transacoes WHERE id = %s"
    ids = [random.randint(1, want) for _ in range(args.lookups)]
    out = {}
    for name, target in (("postgres", dsn), ("wal2delta", lake_dsn)):
        with psycopg.connect(target, autocommit=True) as c:
            def timed(sql, params=None, prepare=None):
                t = time.perf_counter()
                c.execute(sql, params, prepare=prepare).fetchall()
                return time.perf_counter() - t
            for i in ids[:50]:
                timed(lookup, (i,), True)
            lat = sorted(timed(lookup, (i,), True) for i in ids)
            timed(agg)
            aggs = [timed(agg) for _ in range(5)]
        out[name] = {"lookup_p50_ms": round(lat[len(lat) // 2] * 1e3, 2),
                     "lookup_p99_ms": round(lat[int(len(lat) * 0.99)] * 1e3, 2),
                     "aggregate_median_ms": round(statistics.median(aggs) * 1e3, 1)}
    d.sample_rss()
    out["peak_rss_mb"] = d.stop()
    out["aggregate_speedup_vs_postgres"] = round(out["postgres"]["aggregate_median_ms"] / out["wal2delta"]["aggregate_median_ms"], 2)
    conn.execute("SELECT pg_drop_replication_slot('bench_q')")
    return out


AGGREGATE = """SELECT i.condominio_id, t.tipo, t.status, count(*), sum(t.valor), avg(t.valor)
             FROM transacoes t JOIN imoveis i ON i.id = t.imovel_id GROUP BY 1, 2, 3 ORDER BY 1, 2, 3"""


def scenario_freshness(args, work, dsn, conn, rate, seconds, svg, load=0):
    """Inserts `rate` rows/s into transacoes for `seconds`; for one transaction every
    100 ms, the time from its commit to the row being visible through the SQL endpoint,
    and to its position being durable in the lake (the daemon's wal2delta_flushed_lsn).
    With `load`, that many clients run the heavy aggregate on the endpoint meanwhile."""
    import threading
    d = Daemon(args.binary, work, dsn, f"bench_f{rate}_{load}", name=f"fresh{rate}_{load}")
    lake_dsn = d.lake_dsn()
    d.wait_served(conn.execute("SELECT count(*) FROM transacoes").fetchone()[0])
    first = conn.execute("SELECT max(id) FROM transacoes").fetchone()[0] + 1_000_000
    samples = []  # (id, commit time)
    lsns = {}  # id -> WAL position after its commit
    seen = {}
    durable = {}  # id -> when the daemon reported it flushed
    done = threading.Event()

    def writer():
        with psycopg.connect(dsn, autocommit=True) as w:
            per_tick = max(1, rate // 100)
            next_id, tick, start = first, 0, time.perf_counter()
            while time.perf_counter() - start < seconds:
                w.execute(f"""INSERT INTO transacoes (id, imovel_id, tipo, status, valor, competencia, vencimento)
                    SELECT g, 1 + g % 400, 'multa', 'aberta', 1.0, '2025-03', date '2025-03-10'
                    FROM generate_series({next_id}, {next_id + per_tick - 1}) g""")
                committed = time.perf_counter()
                if tick % 10 == 0:
                    lsns[next_id + per_tick - 1] = w.execute(
                        "SELECT pg_current_wal_lsn() - '0/0'::pg_lsn").fetchone()[0]
                    samples.append((next_id + per_tick - 1, committed))
                next_id += per_tick
                tick += 1
                delay = start + tick * 0.01 - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
        done_at[0] = time.perf_counter()
        done.set()

    def poller():
        if os.environ.get("BENCH_NO_POLL"):  # experiment: the daemon without SQL readers
            done.wait()
            return
        with psycopg.connect(lake_dsn, autocommit=True) as r:
            while True:
                asked = time.perf_counter()
                top = r.execute("SELECT max(id) FROM transacoes WHERE id >= %s", (first,)).fetchone()[0]
                now = time.perf_counter()
                polls.append(now - asked)
                if top is not None:
                    for sid, _ in list(samples):
                        if sid <= top and sid not in seen:
                            seen[sid] = now
                if done.is_set() and all(sid in seen for sid, _ in samples):
                    return
                if done.is_set() and time.perf_counter() - done_at[0] > 30:
                    return
                time.sleep(0.005)

    def flushed():
        while True:
            try:
                top = metric_total(d.metrics(), "wal2delta_flushed_lsn")
            except Exception:
                top = 0
            now = time.perf_counter()
            for sid, _ in list(samples):
                if sid not in durable and lsns.get(sid, float("inf")) <= top:
                    durable[sid] = now
            if done.is_set() and (all(sid in durable for sid, _ in samples)
                                  or time.perf_counter() - done_at[0] > 30):
                return
            time.sleep(0.005)

    aggregates = []  # duration of each aggregate run by the load clients

    def load_client():
        with psycopg.connect(lake_dsn, autocommit=True) as c:
            while not done.is_set():
                t = time.perf_counter()
                c.execute(AGGREGATE).fetchall()
                aggregates.append(time.perf_counter() - t)

    done_at = [0.0]
    polls = []  # duration of each endpoint query
    t_w = threading.Thread(target=writer)
    t_r = threading.Thread(target=poller)
    t_f = threading.Thread(target=flushed)
    loaders = [threading.Thread(target=load_client) for _ in range(load)]
    for t in loaders:
        t.start()
    if load:
        time.sleep(2)  # the load is running before the first sample
    m0 = d.metrics()
    t0 = time.perf_counter()
    t_w.start(); t_r.start(); t_f.start()
    while t_w.is_alive():
        d.sample_rss(); time.sleep(0.2)
    t_r.join(); t_f.join()
    for t in loaders:
        t.join()
    m1 = d.metrics()
    lat = [(c - t0, seen[i] - c) for i, c in samples if i in seen]
    values = sorted(v for _, v in lat)
    lake = sorted(durable[i] - c for i, c in samples if i in durable)
    rss = d.stop()

    def delta(name, *labels):
        return metric_total(m1, name, *labels) - metric_total(m0, name, *labels)

    def mean_ms(name, *labels):
        """Mean of histogram `name` over the run, for the series with `labels`."""
        n = delta(name + "_count", *labels)
        return round(delta(name + "_sum", *labels) / n * 1e3, 1) if n else None
    table = 'table="public.transacoes"'
    where = {"batches": int(delta("wal2delta_batch_rows_count")),
             "raw_commit_mean_ms": mean_ms("wal2delta_delta_commit_duration_seconds", table, 'layer="raw"'),
             "curated_merge_mean_ms": mean_ms("wal2delta_merge_seconds", table),
             "curated_commit_mean_ms": mean_ms("wal2delta_delta_commit_duration_seconds", table, 'layer="curated"'),
             "endpoint_query_p50_ms": round(statistics.median(polls) * 1e3, 1) if polls else None,
             "endpoint_query_max_ms": round(max(polls) * 1e3, 1) if polls else None}
    conn.execute(f"SELECT pg_drop_replication_slot('bench_f{rate}_{load}')")
    if svg and lat:
        w, h, top = 600, 240, max(values) * 1.1
        pts = " ".join(f"{40 + x / seconds * (w - 50):.1f},{h - 20 - y / top * (h - 40):.1f}" for x, y in lat)
        open(svg, "w").write(
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="11">'
            f'<text x="40" y="14">wal2delta freshness at {rate:,} rows/s: commit to visible through the SQL endpoint (s)</text>'
            f'<line x1="40" y1="{h-20}" x2="{w-10}" y2="{h-20}" stroke="#888"/><line x1="40" y1="20" x2="40" y2="{h-20}" stroke="#888"/>'
            f'<text x="4" y="24">{top:.2f}</text><text x="4" y="{h-20}">0</text><text x="{w-60}" y="{h-6}">{seconds} s</text>'
            f'<polyline fill="none" stroke="#1f77b4" points="{pts}"/></svg>')
    return {"rate_rows_per_s": rate, "seconds": seconds, "samples": len(samples), "seen": len(lat),
            "p50_s": round(values[len(values) // 2], 3) if values else None,
            "p95_s": round(values[int(len(values) * 0.95)], 3) if values else None,
            "p99_s": round(values[min(len(values) - 1, int(len(values) * 0.99))], 3) if values else None,
            "max_s": round(values[-1], 3) if values else None, "peak_rss_mb": rss,
            "lake_p50_s": round(lake[len(lake) // 2], 3) if lake else None,
            "lake_p95_s": round(lake[int(len(lake) * 0.95)], 3) if lake else None,
            "lake_max_s": round(lake[-1], 3) if lake else None,
            "sql_clients": load, "aggregates_run": len(aggregates),
            "aggregate_median_s": round(statistics.median(aggregates), 3) if aggregates else None,
            "per_batch": where}


@contextlib.contextmanager
def s3_server(work):
    """moto's standalone S3 server on a free loopback port with one bucket: yields the
    `[lake.storage]` table reaching it."""
    import urllib.request
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    RUNNING.append(proc)
    try:
        deadline = time.time() + 60
        while True:
            try:
                urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/bench", method="PUT"))
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    sys.exit("moto's S3 server did not start: python3 -m pip install 'moto[server]'")
                time.sleep(0.2)
        secret = os.path.join(work, "s3-secret")
        open(secret, "w").write("bench-secret\n")
        yield (f'[lake.storage]\nendpoint = "http://127.0.0.1:{port}"\nallow_http = true\n'
               f'region = "us-east-1"\naccess_key_id = "bench"\nsecret_access_key_file = "{secret}"\n')
    finally:
        proc.kill()


def commit_latency(samples):
    """Delta commit latency per layer from the daemon's histogram: p50/p95 as the upper
    bound of the bucket they fall in, and the mean."""
    out = {}
    for layer in ("raw", "curated"):
        buckets = {}
        for k, v in samples.items():
            if k.startswith("wal2delta_delta_commit_duration_seconds_bucket") and f'layer="{layer}"' in k:
                le = re.search(r'[{,]le="([^"]+)"', k).group(1)
                buckets[float(le)] = buckets.get(float(le), 0) + v
        count = metric_total(samples, "wal2delta_delta_commit_duration_seconds_count", f'layer="{layer}"')
        total = metric_total(samples, "wal2delta_delta_commit_duration_seconds_sum", f'layer="{layer}"')
        if not count:
            continue
        ordered = sorted(buckets.items())

        def quantile(q):
            return next((le for le, n in ordered if n >= q * count), None)
        out[layer] = {"commits": int(count), "p50_le_s": quantile(0.5), "p95_le_s": quantile(0.95),
                      "mean_ms": round(1000 * total / count, 1)}
    return out


def scenario_object_store(args, work, dsn, conn):
    """The same snapshot and the same changes into a local lake and into an S3 lake."""
    result = {}
    with s3_server(work) as storage:
        lakes = {"local": (None, ""), "s3": ("s3://bench/lake", storage)}
        for kind, (lake, extra) in lakes.items():
            start = time.perf_counter()
            d = Daemon(args.binary, work, dsn, f"bench_os_snap_{kind}", name=f"os-snap-{kind}",
                       lake=lake and f"{lake}-snapshot", lake_extra=extra)
            d.wait_streaming()
            snap_s = time.perf_counter() - start
            d.stop()
            conn.execute(f"SELECT pg_drop_replication_slot('bench_os_snap_{kind}')")
            result[kind] = {"snapshot_s": round(snap_s, 2)}
        for kind in lakes:
            conn.execute(f"SELECT pg_create_logical_replication_slot('bench_os_{kind}', 'pgoutput')")
        made, end_lsn = write_changes(conn, dsn, args.os_changes)
        for kind, (lake, extra) in lakes.items():
            start = time.perf_counter()
            d = Daemon(args.binary, work, dsn, f"bench_os_{kind}", 'snapshot = "never"\ncreate_slot = false',
                       name=f"os-{kind}", lake=lake, lake_extra=extra)
            d.wait_confirmed(conn, f"bench_os_{kind}", end_lsn)
            took = time.perf_counter() - start
            result[kind].update({"changes": made, "changes_per_s": round(made / took),
                                 "commit_latency": commit_latency(d.metrics()), "peak_rss_mb": d.stop()})
            conn.execute(f"SELECT pg_drop_replication_slot('bench_os_{kind}')")
    result["streaming_ratio_s3_vs_local"] = round(result["s3"]["changes_per_s"] / result["local"]["changes_per_s"], 2)
    result["snapshot_ratio_s3_vs_local"] = round(result["local"]["snapshot_s"] / result["s3"]["snapshot_s"], 2)
    result["note"] = "the S3 server is moto (Python, in-memory) on the same 2 cores, not AWS"
    return result


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--full", action="store_true")
    add_binary_argument(ap)
    ap.add_argument("--json", default=None)
    ap.add_argument("--merge-sizes", dest="merge_sizes_override", default=None,
                    help="table sizes for the merge scenario, comma-separated (default: by mode)")
    ap.add_argument("--svg-dir", default=None, help="write freshness-<rate>.svg charts here")
    ap.add_argument("--only", default=",".join(SCENARIOS),
                    help=f"comma-separated scenarios to run (default all: {','.join(SCENARIOS)})")
    ap.add_argument("--batch-age-ms", type=int, default=None,
                    help="apply.max_batch_age_ms for every daemon (default: the daemon's default)")
    ap.add_argument("--min-batch-age-ms", type=int, default=None,
                    help="apply.min_batch_age_ms for every daemon (default: the daemon's default)")
    args = ap.parse_args()
    global APPLY
    if args.batch_age_ms is not None:
        APPLY += f"max_batch_age_ms = {args.batch_age_ms}\n"
    if args.min_batch_age_ms is not None:
        APPLY += f"min_batch_age_ms = {args.min_batch_age_ms}\n"
    if APPLY:
        APPLY = "[apply]\n" + APPLY
    only = args.only.split(",")
    if "merge" in only:
        only.append("merge_aggregate")
    unknown = set(only) - set(SCENARIOS)
    if unknown:
        sys.exit(f"unknown scenario(s) {', '.join(sorted(unknown))}; choose from {', '.join(SCENARIOS)}")
    args.changes = 1_000_000 if args.full else 200_000
    args.transacoes = 1_200_000 if args.full else 300_000
    args.lookups = 2000 if args.full else 500
    args.merge_sizes = (100_000, 1_000_000, 10_000_000) if args.full else (100_000, 1_000_000)
    if args.merge_sizes_override:
        args.merge_sizes = tuple(int(n) for n in args.merge_sizes_override.split(","))
    args.large_txn = 2_000_000
    args.os_changes = 1_000_000 if args.full else 300_000
    if args.svg_dir:
        os.makedirs(args.svg_dir, exist_ok=True)
    require_binary(args.binary)
    results = {"mode": "full" if args.full else "quick", "cores": os.cpu_count(),
               "max_batch_age_ms": args.batch_age_ms}
    with disposable_postgres("w2d-harness") as (work, dsn):
        with psycopg.connect(dsn, autocommit=True) as conn:
            load_demo(conn, args.transacoes)
            conn.execute("CREATE PUBLICATION w2d_pub FOR TABLE condominios, imoveis, moradores, transacoes")
            runs = {
                "snapshot": lambda: scenario_snapshot(args, work, dsn, conn),
                "queries": lambda: scenario_queries(args, work, dsn, conn),
                "streaming": lambda: scenario_streaming(args, work, dsn, conn),
                "merge": lambda: [scenario_merge(args, work, dsn, conn, n, dv)
                                  for dv in (False, True) for n in args.merge_sizes],
                "merge_aggregate": lambda: compare_aggregates(args, results.get("merge", [])),
                "verify": lambda: scenario_verify(args, work, dsn, conn),
                "neighbour": lambda: scenario_neighbour(args, work, dsn, conn),
                "large_transaction": lambda: scenario_large_transaction(args, work, dsn, conn),
                "freshness": lambda: [
                    scenario_freshness(args, work, dsn, conn, rate, 30 if args.full else 10,
                                       os.path.join(args.svg_dir, f"freshness-{rate}.svg") if args.svg_dir else None)
                    for rate in ((5000, 20000) if args.full else (5000,))],
                "sql_load": lambda: [
                    scenario_freshness(args, work, dsn, conn, 5000, 30 if args.full else 10, None, load)
                    for load in (0, 16)],
                "object_store": lambda: scenario_object_store(args, work, dsn, conn),
            }
            for name in SCENARIOS:
                if name in only:
                    print(f"running {name}", file=sys.stderr, flush=True)
                    results[name] = runs[name]()
    print(f"{'scenario':<12} {'wal2delta':>22} {'baseline':>26} {'ratio':>8} {'peak RSS':>10}")
    if "streaming" in results:
        st = results["streaming"]
        print(f"{'streaming':<12} {st['wal2delta_changes_per_s']:>14,} changes/s {st['pg_recvlogical_changes_per_s']:>12,} ch/s recvlogical {st['ratio_vs_pg_recvlogical']:>7}x {st['peak_rss_mb']:>7} MB")
        print(f"{'  (CoW)':<12} {st['wal2delta_cow_changes_per_s']:>14,} changes/s {st['pg_recvlogical_changes_per_s']:>12,} ch/s recvlogical {st['ratio_cow_vs_pg_recvlogical']:>7}x {st['peak_rss_cow_mb']:>7} MB")
    if "snapshot" in results:
        s = results["snapshot"]
        print(f"{'snapshot':<12} {s['wal2delta_s']:>20} s {s['copy_one_connection_s']:>19} s COPY {s['ratio_vs_copy']:>7}x {s['peak_rss_mb']:>7} MB")
        print(f"{'':<12} {s['rows_per_s']:>14} rows/s {s['copy_rows_per_s']:>12} rows/s COPY; "
              f"{s['mb_per_s']} MB/s, {s['copy_mb_per_s']} MB/s COPY (text bytes)")
        print(f"{'snapshot wm':<12} {s['watermark_s']:>20} s {s['copy_one_connection_s']:>19} s COPY {s['watermark_ratio_vs_copy']:>7}x {s['watermark_peak_rss_mb']:>7} MB")
    if "queries" in results:
        q = results["queries"]
        print(f"{'lookup p50':<12} {q['wal2delta']['lookup_p50_ms']:>19} ms {q['postgres']['lookup_p50_ms']:>16} ms Postgres")
        print(f"{'aggregate':<12} {q['wal2delta']['aggregate_median_ms']:>19} ms {q['postgres']['aggregate_median_ms']:>16} ms Postgres {q['aggregate_speedup_vs_postgres']:>4}x {q['peak_rss_mb']:>7} MB")
    for m in results.get("merge", []):
        for pattern in MERGE_PATTERNS:
            r = m[pattern]
            mode = "DV" if m["deletion_vectors"] else "CoW"
            print(f"{'merge ' + mode:<12} 10k {pattern:<9} keys into {m['rows']:>10,} rows: {r['merge_s']:>7} s "
                  f"(+commit {r['commit_s']} s), {r['bytes_written'] / 2**20:>6.1f} MB written of {r['table_bytes'] / 2**20:.1f} MB, "
                  f"{r['files_rewritten']}/{r['table_files']} files rewritten, {r['files_scanned']} read, "
                  f"{r['rows_marked']} rows marked {m['peak_rss_mb']:>7} MB")
        if "absorbed" in m:
            a = m["absorbed"]
            print(f"{'merge ' + mode:<12} after 20 uniform merges into {m['rows']:,} rows: merge mean {a['merge_mean_s']} s, "
                  f"lookup p50 {a['lookup_p50_ms']} ms (p99 {a['lookup_p99_ms']} ms), aggregate {a['aggregate_median_ms']} ms")
    if results.get("merge_aggregate"):
        g = results["merge_aggregate"]
        print(f"{'aggregate':<12} after 20 merges, both lakes served at once, {g['rounds']} rounds in turn: "
              f"deletion vectors {g['dv_median_ms']} ms, copy-on-write {g['cow_median_ms']} ms, "
              f"ratio {g['dv_over_cow_median_of_rounds']}x (median of rounds), same answer: {g['same_answer']}")
    for dv in (False, True):
        runs_dv = [m for m in results.get("merge", []) if m["deletion_vectors"] == dv]
        if len(runs_dv) > 1:
            for pattern in MERGE_PATTERNS:
                small, large = runs_dv[0][pattern], runs_dv[-1][pattern]
                if small["merge_s"]:
                    print(f"{'merge ratio':<12} {'DV' if dv else 'CoW'} {pattern}: {runs_dv[-1]['rows']:,} rows vs {runs_dv[0]['rows']:,} rows: "
                          f"{large['merge_s'] / small['merge_s']:.2f}x the time")
    if "verify" in results:
        v = results["verify"]
        print(f"{'verify':<12} {v['rows']:,} rows: {v['verify_s']} s (source {v['verify_source_read_s']} s, lake {v['verify_lake_read_s']} s) "
              f"vs COPY {v['copy_one_connection_s']} s: {v['verify_vs_copy']}x; resync {v['resync_s']} s: {v['resync_vs_copy']}x COPY {v['peak_rss_mb']:>7} MB")
    if "neighbour" in results:
        n = results["neighbour"]
        for label in ("alone", "unthrottled", "throttled_10_mb_s"):
            r = n[label]
            print(f"{'pgbench -S':<12} {label:<18} latency {r['lat_ms']} ms, {r['tps']:,} tps"
                  + (f", {r['lat_vs_alone']}x alone, snapshot {r['snapshot_s']} s" if label != "alone" else ""))
    if "large_transaction" in results:
        lt = results["large_transaction"]
        print(f"{'large txn':<12} {lt['rows']:,} rows in one transaction ({lt['source_insert_s']} s at the source): "
              f"commit to durable {lt['commit_to_durable_s']} s streamed ({lt['peak_rss_mb']} MB; Postgres {lt['postgres']}); "
              f"protocol 1 drain {lt['protocol_1_drain_s']} s ({lt['protocol_1_peak_rss_mb']} MB; Postgres {lt['protocol_1_postgres']}); "
              f"pg_recvlogical {lt['pg_recvlogical_s']} s")
    for f in results.get("freshness", []):
        print(f"{'freshness':<12} {f['rate_rows_per_s']:>8,} rows/s: p50 {f['p50_s']} s, p95 {f['p95_s']} s, p99 {f['p99_s']} s, max {f['max_s']} s ({f['seen']}/{f['samples']} samples) {f['peak_rss_mb']:>7} MB")
    for f in results.get("sql_load", []):
        print(f"{'sql load':<12} {f['sql_clients']:>2} clients running the aggregate ({f['aggregates_run']} runs, median {f['aggregate_median_s']} s): "
              f"commit to durable p50 {f['lake_p50_s']} s, p95 {f['lake_p95_s']} s, max {f['lake_max_s']} s; "
              f"to visible p50 {f['p50_s']} s, p95 {f['p95_s']} s, max {f['max_s']} s {f['peak_rss_mb']:>7} MB")
        b = f["per_batch"]
        print(f"{'':<12} {b['batches']} batches; mean per batch: raw commit {b['raw_commit_mean_ms']} ms, "
              f"curated merge {b['curated_merge_mean_ms']} ms, curated commit {b['curated_commit_mean_ms']} ms; "
              f"the polling query p50 {b['endpoint_query_p50_ms']} ms, max {b['endpoint_query_max_ms']} ms")
    if "object_store" in results:
        o = results["object_store"]
        for kind in ("local", "s3"):
            r = o[kind]
            lat = ", ".join(f"{layer} commit p50 <= {v['p50_le_s']} s, p95 <= {v['p95_le_s']} s, mean {v['mean_ms']} ms"
                            for layer, v in r["commit_latency"].items())
            print(f"{'lake ' + kind:<12} snapshot {r['snapshot_s']} s; {r['changes_per_s']:,} changes/s; {lat} {r['peak_rss_mb']:>7} MB")
        print(f"{'S3 / local':<12} streaming {o['streaming_ratio_s3_vs_local']}x, snapshot {o['snapshot_ratio_s3_vs_local']}x ({o['note']})")
    text = json.dumps(results, indent=2)
    if args.json:
        open(args.json, "w").write(text)
    print(text)


if __name__ == "__main__":
    main()
