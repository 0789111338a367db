#!/usr/bin/env bash
# Builds the Debian package: bash packaging/deb/build.sh [--binary PATH] [--out DIR] [--fast]
#
# Without --binary it builds the release binary first (cargo build --release --locked);
# --fast compresses with gzip -1 instead of xz (for tests).
# dpkg-deb, which every Debian and Ubuntu system has, assembles the package from:
#   /usr/bin/wal2delta                          the binary
#   /lib/systemd/system/wal2delta{,@}.service   both units (nothing enabled or started)
#   /etc/wal2delta/wal2delta.toml               the example configuration (a conffile)
#   /usr/share/wal2delta/refined/*.sql          the refined views of the sample schema
#   /usr/share/wal2delta/sql/setup.sql          the hand-written source set-up (see `init`)
#   /usr/share/doc/wal2delta/                   copyright, the README and docs/
# The maintainer scripts beside this file create the `wal2delta` system user on install,
# stop the service on removal, and delete /etc/wal2delta on purge (never the lake).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
binary=""
compress="-Zxz"
out="${CARGO_TARGET_DIR:-$root/target}/debian"
while [ $# -gt 0 ]; do
  case "$1" in
    --binary) binary="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    --fast) compress="-Zgzip -z1"; shift ;;
    *) echo "usage: $0 [--binary PATH] [--out DIR] [--fast]" >&2; exit 2 ;;
  esac
done
command -v dpkg-deb >/dev/null || { echo "dpkg-deb is missing: apt-get install -y dpkg" >&2; exit 1; }
if [ -z "$binary" ]; then
  (cd "$root" && cargo build --release --locked)
  binary="${CARGO_TARGET_DIR:-$root/target}/release/wal2delta"
fi
[ -x "$binary" ] || { echo "no wal2delta binary at $binary" >&2; exit 1; }

version=$(awk -F'"' '/^version = /{print $2; exit}' "$root/Cargo.toml")
arch=$(dpkg --print-architecture)
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
pkg="$stage/wal2delta"

install -D -m 0755 "$binary" "$pkg/usr/bin/wal2delta"
strip --strip-debug "$pkg/usr/bin/wal2delta" 2>/dev/null || true
for unit in wal2delta.service wal2delta@.service; do
  install -D -m 0644 "$root/systemd/$unit" "$pkg/lib/systemd/system/$unit"
  sed -i 's#/usr/local/bin/wal2delta#/usr/bin/wal2delta#g' "$pkg/lib/systemd/system/$unit"
done
install -D -m 0640 "$root/systemd/wal2delta.toml" "$pkg/etc/wal2delta/wal2delta.toml"
install -d -m 0755 "$pkg/usr/share/wal2delta/refined" "$pkg/usr/share/wal2delta/sql"
install -m 0644 "$root"/sql/refined/*.sql "$pkg/usr/share/wal2delta/refined/"
install -m 0644 "$root/sql/setup.sql" "$root/sql/schema.sql" "$pkg/usr/share/wal2delta/sql/"
install -D -m 0644 "$root/README.md" "$pkg/usr/share/doc/wal2delta/README.md"
install -D -m 0644 "$root"/docs/*.md "$root/docs/grafana-dashboard.json" -t "$pkg/usr/share/doc/wal2delta/docs/"
cat > "$pkg/usr/share/doc/wal2delta/copyright" <<TEXT
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: wal2delta

Files: *
License: Apache-2.0
 On Debian systems the full text is in /usr/share/common-licenses/Apache-2.0.
TEXT

install -d "$pkg/DEBIAN"
for script in postinst prerm postrm; do
  install -m 0755 "$here/$script" "$pkg/DEBIAN/$script"
done
echo /etc/wal2delta/wal2delta.toml > "$pkg/DEBIAN/conffiles"
size=$(du -sk --exclude=DEBIAN "$pkg" | cut -f1)
cat > "$pkg/DEBIAN/control" <<TEXT
Package: wal2delta
Version: $version-1
Architecture: $arch
Maintainer: wal2delta developers <wal2delta@localhost>
Installed-Size: $size
Depends: libc6, passwd
Recommends: systemd
Section: database
Priority: optional
Homepage: https://github.com/wal2delta/wal2delta
Description: Postgres change data capture into Delta Lake tables, exactly once
 wal2delta subscribes to a logical replication slot (pgoutput), appends every
 change to raw Delta change-log tables, merges it exactly once into curated
 Delta tables that mirror the source, and serves them over the Postgres wire
 protocol. Start with: wal2delta init --help
TEXT

mkdir -p "$out"
file="$out/wal2delta_${version}-1_${arch}.deb"
dpkg-deb --root-owner-group $compress --build "$pkg" "$file" >/dev/null
echo "$file"
