#!/usr/bin/env python3
"""SQL endpoint benchmark: wal2delta's endpoint against the source Postgres, side by side.

Starts a disposable Postgres (testcontainers/pg.sh), loads the demo schema plus N
`transacoes` rows (default 1,000,000), runs the wal2delta daemon until its initial snapshot
is served, then measures with psycopg 3 on both servers in the same run:

  * primary-key point lookups (`SELECT … FROM transacoes WHERE id = %s`, server-side
    parameters, random ids): p50 / p95 / p99 over --lookups queries;
  * a grouped aggregate over all rows (per condominium, type and status): median of
    --repeats runs after one warm-up.

Usage: python3 bench/sql_endpoint.py [--rows N] [--binary target/release/wal2delta]
Needs: PostgreSQL server binaries, psycopg 3 (pip install 'psycopg[binary]'), a built
wal2delta (cargo build --release, or the debug binary).
"""
import argparse
import json
import os
import random
import statistics
import sys
import time

import psycopg

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import Daemon, add_binary_argument, disposable_postgres, require_binary  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AGGREGATE = """
SELECT i.condominio_id, t.tipo, t.status, count(*) AS n, sum(t.valor) AS total, avg(t.valor) AS media
FROM transacoes t JOIN imoveis i ON i.id = t.imovel_id
GROUP BY i.condominio_id, t.tipo, t.status
ORDER BY 1, 2, 3
"""


def timed(conn, sql, params=None, prepare=None):
    start = time.perf_counter()
    with conn.cursor() as cur:
        cur.execute(sql, params, prepare=prepare)
        cur.fetchall()
    return time.perf_counter() - start


def pct(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * p))]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--lookups", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=5)
    add_binary_argument(ap)
    args = ap.parse_args()
    require_binary(args.binary)

    with disposable_postgres("w2d-bench") as (work, src_dsn):
        with psycopg.connect(src_dsn, autocommit=True) as c:
            c.execute(open(f"{ROOT}/sql/schema.sql").read())
            c.execute(open(f"{ROOT}/sql/sample_data.sql").read().replace("\\gset", ";"))
            c.execute(f"""
                INSERT INTO transacoes (imovel_id, morador_id, tipo, status, valor, competencia, vencimento)
                SELECT 1 + g % 400, NULL,
                       (ARRAY['taxa_condominial','multa','fundo_reserva','acordo','pagamento'])[1 + g % 5],
                       (ARRAY['aberta','paga','atrasada','cancelada'])[1 + g % 4],
                       (g % 100000) / 100.0 + 1, '2025-' || lpad((1 + g % 12)::text, 2, '0'),
                       date '2025-01-10' + (g % 365)
                FROM generate_series(1, {args.rows}) g""")
            c.execute("VACUUM ANALYZE")
            c.execute("CREATE PUBLICATION w2d_pub FOR TABLE condominios, imoveis, moradores, transacoes")
            total = c.execute("SELECT count(*) FROM transacoes").fetchone()[0]
        started = time.time()
        daemon = Daemon(args.binary, work, src_dsn, "w2d_bench", name="daemon")
        lake_dsn = daemon.lake_dsn()
        daemon.wait_served(total)
        snapshot_secs = time.time() - started

        results = {"rows": total, "snapshot_served_after_s": round(snapshot_secs, 1)}
        ids = [random.randint(1, total) for _ in range(args.lookups)]
        lookup = "SELECT id, imovel_id, tipo, status, valor, vencimento FROM transacoes WHERE id = %s"
        for name, dsn in (("postgres", src_dsn), ("wal2delta", lake_dsn)):
            with psycopg.connect(dsn, autocommit=True) as c:
                for i in ids[:50]:
                    timed(c, lookup, (i,), prepare=True)
                lat = [timed(c, lookup, (i,), prepare=True) for i in ids]
                trivial = [timed(c, "SELECT 1") for _ in range(200)]
                if name == "wal2delta" and os.environ.get("EXPLAIN"):
                    plan = c.execute("EXPLAIN ANALYZE " + lookup.replace("%s", str(ids[0]))).fetchall()
                    print("\n".join(str(r) for r in plan), file=sys.stderr)
                timed(c, AGGREGATE)
                agg = [timed(c, AGGREGATE) for _ in range(args.repeats)]
            results[name] = {
                "point_lookup_ms": {"p50": round(pct(lat, 0.50) * 1e3, 2),
                                    "p95": round(pct(lat, 0.95) * 1e3, 2),
                                    "p99": round(pct(lat, 0.99) * 1e3, 2)},
                "aggregate_ms_median": round(statistics.median(agg) * 1e3, 1),
                "select_1_ms_p50": round(pct(trivial, 0.50) * 1e3, 2),
            }
        results["aggregate_speedup_vs_postgres"] = round(
            results["postgres"]["aggregate_ms_median"] / results["wal2delta"]["aggregate_ms_median"], 2)
        print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
