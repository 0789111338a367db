"""What a long `_delta_log` costs each commit on a local disk.

Makes a Delta table with 120 commits (delta-rs writes a checkpoint at version 99), times
20 appends, then adds empty files named below that checkpoint — as old commit files are —
until the log holds 100,000 and then 400,000 entries, timing 20 appends each time. The
appends use wal2delta's commit settings (no per-commit log cleanup). Every append opens
the table and moves it forward, and both list the log directory.

    python3 bench/log_listing.py [directory]     # about 2 minutes; needs `deltalake`
"""
import os
import shutil
import sys
import tempfile
import time

import pyarrow as pa
import deltalake
from deltalake import PostCommitHookProperties, write_deltalake

root = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="w2d-log-")
path = os.path.join(root, "t")
rows = pa.table({"a": [1, 2, 3]})
hook = PostCommitHookProperties(cleanup_expired_logs=False, create_checkpoint=True)
write_deltalake(path, rows)
for _ in range(120):
    write_deltalake(path, rows, mode="append", post_commithook_properties=hook)
log = os.path.join(path, "_delta_log")


def append_median(n=20):
    took = []
    for _ in range(n):
        t0 = time.perf_counter()
        write_deltalake(path, rows, mode="append", post_commithook_properties=hook)
        took.append(time.perf_counter() - t0)
    return sorted(took)[n // 2]


print(f"deltalake {deltalake.__version__}")
print(f"{len(os.listdir(log)):>8} log entries: append median {append_median():.3f} s")
for total in (100_000, 400_000):
    have = sum(1 for f in os.listdir(log) if ".old" in f)
    for i in range(have, total):
        open(os.path.join(log, f"00000000000000000001.old{i:07d}"), "w").close()
    print(f"{len(os.listdir(log)):>8} log entries: append median {append_median():.3f} s")
shutil.rmtree(root, ignore_errors=True)
os._exit(0)  # deltalake's runtime threads can hold the interpreter at exit
