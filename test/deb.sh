#!/usr/bin/env bash
# Build the Debian package postgresql-15-voutbox from debian/ (pg_buildext,
# as the PostgreSQL packaging team does), install it into the machine's
# PostgreSQL 15 in place of a `make install`, run the demo against it, then
# put the normal build back:
#   bash test/deb.sh
# The package is left in $VOUTBOX_DEB_OUT if set.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$here"
. test/setup.sh
bash test/install-deps.sh
sudo=
[ "$(id -u)" -eq 0 ] || sudo=sudo

# Build from the tracked files only (no build products of the tree).
work=$(mktemp -d /tmp/voutbox-deb.XXXXXX)
trap 'rm -rf "$work"' EXIT
mkdir "$work/voutbox"
git ls-files -z | xargs -0 cp --parents -t "$work/voutbox"
(cd "$work/voutbox" && dpkg-buildpackage -us -uc -b >"$work/build.log" 2>&1) ||
	{ tail -40 "$work/build.log" >&2; exit 1; }
deb=$(ls "$work"/postgresql-15-voutbox_*.deb)
echo "built $(basename "$deb")"
dpkg-deb --contents "$deb" | awk '{print $6}' | grep -E 'voutbox(\.so|\.control|--0\.1\.0\.sql)$'

# A PostgreSQL without voutbox, then the package.
$sudo make -s PG_CONFIG=$PG_CONFIG uninstall
[ ! -e "$($PG_CONFIG --pkglibdir)/voutbox.so" ]
$sudo dpkg -i "$deb" >/dev/null
dpkg -S "$($PG_CONFIG --pkglibdir)/voutbox.so" "$($PG_CONFIG --sharedir)/extension/voutbox.control"
[ -z "${VOUTBOX_DEB_OUT:-}" ] || cp "$deb" "$VOUTBOX_DEB_OUT/"

# The demo against the package's files (it builds nothing).
status=0
VOUTBOX_PREINSTALLED=1 bash test/demo.sh || status=$?

$sudo dpkg -r postgresql-15-voutbox >/dev/null
$sudo make -s PG_CONFIG=$PG_CONFIG install
exit $status
