#!/bin/sh
# Installs the Prometheus server binary from Debian's `prometheus` package into .venv/bin/prometheus,
# without installing the package or starting a service: tests/serving/test_prometheus.py runs it
# to evaluate every query the chart ships. Where it cannot be had (no apt-get, no network), it says so
# and exits 0: that test is then skipped.
set -eu
VENV="${VENV:-.venv}"
DEST="$VENV/bin/prometheus"
if [ -x "$DEST" ]; then exit 0; fi
skip() { echo "install-prometheus: $1; tests/serving/test_prometheus.py will be skipped" >&2; exit 0; }
command -v apt-get >/dev/null 2>&1 || skip "no apt-get (not Debian or Ubuntu)"
command -v dpkg-deb >/dev/null 2>&1 || skip "no dpkg-deb"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
(cd "$TMP" && apt-get download prometheus >/dev/null 2>&1) || skip "apt-get download prometheus failed"
dpkg-deb -x "$TMP"/prometheus_*.deb "$TMP/root"
cp "$TMP/root/usr/bin/prometheus" "$DEST.tmp"
chmod 755 "$DEST.tmp"
mv "$DEST.tmp" "$DEST"
"$DEST" --version 2>&1 | head -1
