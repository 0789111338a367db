#!/usr/bin/env bash
# The Debian package, installed for real: bash tests/package.sh [--binary PATH]
#
# Builds the package around the test build's binary (target/debug/wal2delta; the release
# package is the same files around the release binary), installs it with dpkg -i, checks
# the files, the user, the permissions, `systemd-analyze verify` on the installed units,
# `wal2delta --version` and `validate` as the service user, then removes and purges it and
# checks what stays (the lake directory and the user) and what goes. Needs root (dpkg).
set -euo pipefail
cd "$(dirname "$0")/.."
target="${CARGO_TARGET_DIR:-$(pwd)/target}"
binary="$target/debug/wal2delta"
[ "${1:-}" = --binary ] && binary="$2"
fail() { echo "package test FAILED: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || fail "dpkg -i needs root: run it as root (CI does) or with sudo"
[ -x "$binary" ] || fail "no binary at $binary: run cargo build --locked first"
for tool in dpkg-deb systemd-analyze; do
  command -v "$tool" >/dev/null || fail "$tool is missing: apt-get install -y dpkg systemd"
done
if dpkg -s wal2delta >/dev/null 2>&1; then
  fail "a wal2delta package is already installed here; remove it first (dpkg -P wal2delta)"
fi

out=$(mktemp -d)
trap 'dpkg -P wal2delta >/dev/null 2>&1 || true; rm -rf "$out"' EXIT
deb=$(bash packaging/deb/build.sh --binary "$binary" --out "$out" --fast)
echo "package: $deb ($(du -h "$deb" | cut -f1))"
# Output is captured before grep reads it: `cmd | grep -q` fails under pipefail whenever
# grep's early exit kills cmd with SIGPIPE.
info=$(dpkg-deb --info "$deb") || fail "dpkg-deb --info $deb"
grep -q "Package: wal2delta" <<<"$info" || fail "no control file in $deb: $info"
user_existed=$(getent passwd wal2delta >/dev/null && echo yes || echo no)

dpkg -i "$deb" >/dev/null || fail "dpkg -i $deb"
for f in /usr/bin/wal2delta /lib/systemd/system/wal2delta.service \
         /lib/systemd/system/wal2delta@.service /etc/wal2delta/wal2delta.toml \
         /usr/share/wal2delta/refined/saldo_em_atraso.sql /usr/share/wal2delta/sql/setup.sql \
         /usr/share/doc/wal2delta/copyright; do
  [ -e "$f" ] || fail "$f is not installed"
done
grep -q ":/var/lib/wal2delta:/usr/sbin/nologin$" <<<"$(getent passwd wal2delta)" \
  || fail "no wal2delta system user: $(getent passwd wal2delta)"
[ "$(stat -c '%U:%G %a' /var/lib/wal2delta)" = "wal2delta:wal2delta 750" ] \
  || fail "/var/lib/wal2delta is $(stat -c '%U:%G %a' /var/lib/wal2delta)"
[ "$(stat -c '%U:%G %a' /etc/wal2delta/wal2delta.toml)" = "root:wal2delta 640" ] \
  || fail "/etc/wal2delta/wal2delta.toml is $(stat -c '%U:%G %a' /etc/wal2delta/wal2delta.toml)"
grep -q /etc/wal2delta/wal2delta.toml <<<"$(dpkg-query -W -f='${Conffiles}\n' wal2delta)" \
  || fail "the configuration is not a conffile"
grep -q "ExecStart=/usr/bin/wal2delta run" /lib/systemd/system/wal2delta.service \
  || fail "the unit does not run /usr/bin/wal2delta"
for unit in wal2delta.service wal2delta@sales.service; do
  src=/lib/systemd/system/${unit/@sales/@}
  tmp="$out/$unit"; cp "$src" "$tmp"
  text=$(systemd-analyze verify --man=no "$tmp" 2>&1) || fail "systemd-analyze verify $unit: $text"
  ! grep -q Unknown <<<"$text" || fail "systemd-analyze verify $unit: $text"
done
if [ -d /run/systemd/system ]; then
  state=$(systemctl is-enabled wal2delta.service 2>/dev/null || true)
  [ "$state" != enabled ] || fail "the package enabled the service"
fi
version=$(/usr/bin/wal2delta --version) || fail "wal2delta --version"
grep -q "^wal2delta $(awk -F'"' '/^version = /{print $2; exit}' Cargo.toml)$" <<<"$version" \
  || fail "wal2delta --version says $version"
# The service user reads the packaged configuration and a password file written as the
# docs say; validate then names what is not there yet (the example's database), not a
# permission problem.
printf '%s\n' 'not-a-real-password' > /etc/wal2delta/password
chgrp wal2delta /etc/wal2delta/password && chmod 0640 /etc/wal2delta/password
text=$(runuser -u wal2delta -- /usr/bin/wal2delta validate --config /etc/wal2delta/wal2delta.toml 2>&1) \
  && fail "validate passed against a database that is not there: $text"
! grep -qi "permission denied" <<<"$text" || fail "validate as wal2delta: $text"
grep -q "problem(s) found" <<<"$text" || fail "validate as wal2delta: $text"
echo "validate as the service user: $(grep -m1 '  - ' <<<"$text")"

# Remove: the files go, the conffile and the state stay; purge: the configuration goes,
# the lake directory and the user stay.
touch /var/lib/wal2delta/keep-me
dpkg -r wal2delta >/dev/null || fail "dpkg -r"
[ ! -e /usr/bin/wal2delta ] && [ ! -e /lib/systemd/system/wal2delta.service ] \
  || fail "dpkg -r left the binary or the unit"
[ -e /etc/wal2delta/wal2delta.toml ] || fail "dpkg -r deleted the configuration"
dpkg -P wal2delta >/dev/null || fail "dpkg -P"
[ ! -e /etc/wal2delta ] || fail "purge left /etc/wal2delta: $(ls -la /etc/wal2delta)"
[ -e /var/lib/wal2delta/keep-me ] || fail "purge deleted /var/lib/wal2delta (the lake)"
rm -rf /var/lib/wal2delta
[ "$user_existed" = yes ] || userdel wal2delta 2>/dev/null || true
echo "package test passed: install, files, user, units, --version, validate, remove, purge"
