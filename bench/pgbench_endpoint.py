#!/usr/bin/env python3
"""Concurrency benchmark: pgbench's custom read-only scripts against the SQL endpoint and
against the source Postgres, in the same run, while the daemon streams.

Starts a disposable Postgres (testcontainers/pg.sh), loads the demo schema plus --rows
`transacoes` rows, runs the wal2delta daemon until its snapshot is served, starts a writer
that updates random `transacoes` rows (--write-rate per second, so the daemon streams and
the endpoint's lake position moves), then runs, for each client count and each server:

  * lookup:    \\set id random(1, --ids)  /  SELECT * FROM transacoes WHERE id = :id
  * aggregate: SELECT status, count(*), sum(valor) FROM transacoes GROUP BY status

with `pgbench -n -T --seconds -c C -j min(C, 2)` in both the simple and the prepared
protocol, and reports TPS, latency p50/p95/p99 (from pgbench's per-transaction log), the
failed transactions, and the daemon's peak RSS.

Usage: python3 bench/pgbench_endpoint.py [--clients 1,8,32] [--seconds 5]
Needs: PostgreSQL server binaries with pgbench, psycopg 3, a built wal2delta.
"""
import argparse
import glob
import json
import os
import random
import subprocess
import sys
import threading
import time

import psycopg

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import (Daemon, add_binary_argument, bindir_tool, disposable_postgres,  # noqa: E402
                     load_demo, require_binary)



def scripts(work, ids):
    out = {}
    for name, text in (
            ("lookup", f"\\set id random(1, {ids})\nSELECT * FROM transacoes WHERE id = :id;\n"),
            ("aggregate", "SELECT status, count(*), sum(valor) FROM transacoes GROUP BY status;\n")):
        path = os.path.join(work, f"{name}.sql")
        with open(path, "w") as f:
            f.write(text)
        out[name] = path
    return out


def pgbench(dsn, script, clients, seconds, protocol, work):
    """One pgbench run: {'tps', 'p50_ms', 'p95_ms', 'p99_ms', 'failed'}."""
    parts = dict(p.split("=", 1) for p in dsn.split())
    logdir = os.path.join(work, f"log-{time.time_ns()}")
    os.makedirs(logdir)
    proc = subprocess.run(
        [bindir_tool("pgbench"), "-n", "-h", parts["host"], "-p", parts["port"], "-U", parts["user"],
         "-f", script, "-c", str(clients), "-j", str(min(clients, 2)), "-T", str(seconds),
         "-M", protocol, "-l", "--log-prefix", os.path.join(logdir, "tx"), parts["dbname"]],
        capture_output=True, text=True, cwd=logdir)
    out = proc.stdout + proc.stderr
    tps = failed = None
    for line in out.splitlines():
        if line.startswith("tps = "):
            tps = float(line.split()[2])
        if line.startswith("number of failed transactions:"):
            failed = int(line.split(":")[1].split()[0])
    if proc.returncode != 0 or tps is None:
        sys.exit(f"pgbench failed ({proc.returncode}):\n{out}")
    lat = []
    for path in glob.glob(os.path.join(logdir, "tx*")):
        with open(path) as f:
            for line in f:
                fields = line.split()
                if len(fields) >= 3:
                    lat.append(int(fields[2]) / 1000)
    lat.sort()

    def pct(p):
        return round(lat[min(len(lat) - 1, int(len(lat) * p))], 2) if lat else None

    return {"tps": round(tps), "p50_ms": pct(0.5), "p95_ms": pct(0.95), "p99_ms": pct(0.99),
            "failed": failed or 0}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=0, help="extra transacoes rows beyond the demo data")
    ap.add_argument("--ids", type=int, default=600, help="lookups pick ids in 1..N")
    ap.add_argument("--clients", default="1,8,32")
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--protocols", default="simple,prepared")
    ap.add_argument("--scripts", default="lookup,aggregate")
    ap.add_argument("--write-rate", type=int, default=100, help="source updates per second")
    add_binary_argument(ap)
    args = ap.parse_args()
    require_binary(args.binary)

    with disposable_postgres("w2d-pgbench") as (work, src_dsn):
        with psycopg.connect(src_dsn, autocommit=True) as c:
            load_demo(c, args.rows)
            c.execute("CREATE PUBLICATION w2d_pub FOR TABLE condominios, imoveis, moradores, transacoes")
            total = c.execute("SELECT count(*) FROM transacoes").fetchone()[0]
            top = c.execute("SELECT max(id) FROM transacoes").fetchone()[0]
        daemon = Daemon(args.binary, work, src_dsn, "w2d_pgbench", name="daemon")
        daemon.wait_served(total)
        paths = scripts(work, args.ids)

        stop = threading.Event()
        written = [0]

        def writer():
            with psycopg.connect(src_dsn, autocommit=True) as c:
                while not stop.is_set():
                    t = time.perf_counter()
                    c.execute("UPDATE transacoes SET valor = valor + 1 WHERE id = %s",
                              (random.randint(1, top),))
                    written[0] += 1
                    time.sleep(max(0.0, 1 / args.write_rate - (time.perf_counter() - t)))

        def sampler():
            while not stop.is_set():
                daemon.sample_rss()
                time.sleep(0.2)

        threads = [threading.Thread(target=sampler)]
        if args.write_rate > 0:
            threads.append(threading.Thread(target=writer))
        for t in threads:
            t.start()
        results = {"rows": total, "write_rate_per_s": args.write_rate, "runs": []}
        try:
            for script in args.scripts.split(","):
                for protocol in args.protocols.split(","):
                    for clients in [int(c) for c in args.clients.split(",")]:
                        for server, dsn in (("postgres", src_dsn), ("wal2delta", daemon.lake_dsn())):
                            r = pgbench(dsn, paths[script], clients, args.seconds, protocol, work)
                            r.update(script=script, protocol=protocol, clients=clients, server=server)
                            print(json.dumps(r), file=sys.stderr, flush=True)
                            results["runs"].append(r)
        finally:
            stop.set()
            for t in threads:
                t.join()
        results["source_updates_written"] = written[0]
        results["daemon_peak_rss_mb"] = daemon.stop()
        print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
