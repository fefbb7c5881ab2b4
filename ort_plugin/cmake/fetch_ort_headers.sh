#!/usr/bin/env bash
# Fetches the official ONNX Runtime C API headers (they are not in the onnxruntime wheel) from Debian's
# libonnxruntime-dev package, using a temporary sources list built from this machine's configured Debian
# mirror. The .deb is sha256-pinned; the headers are extracted to a cache and never committed.
# Usage: fetch_ort_headers.sh CACHE_DIR [ep]   -> prints the include directory on success.
#   default: 1.21 (API 21, trixie): the custom-op library, which then loads in any ONNX Runtime >= 1.21;
#   ep:      1.27.1 (API 27, experimental): the plugin execution provider (the EP API needs >= 1.23).
set -euo pipefail
if [ "${2:-}" = "ep" ]; then
  PKG_VERSION="1.27.1+dfsg-1"
  PKG_SUITE="experimental"
  PKG_SHA256="521b439b4674dbd71da1d0bc3016f29075c6ad572f4a1c13beb011dee893f8f3"
else
  PKG_VERSION="1.21.0+dfsg-1"
  PKG_SUITE="trixie"
  PKG_SHA256="14f7d959d5deacbcf1504830d4189f91fc67382b399ed9ae9d3aa9c4050ced08"
fi
cache="${1:?cache dir}"
inc="$cache/ort-headers-$PKG_VERSION/usr/include/onnxruntime"
if [ -f "$inc/onnxruntime_c_api.h" ]; then echo "$inc"; exit 0; fi

die() { echo "qie: cannot fetch ONNX Runtime headers: $*" >&2
        echo "qie: set ORT_INCLUDE_DIR to a directory holding onnxruntime_c_api.h (API >= 21)" >&2; exit 1; }
command -v apt-get >/dev/null || die "apt-get not found (not a Debian-like system)"
mirror=""
for f in /etc/apt/sources.list.d/*.sources; do
  [ -f "$f" ] || continue
  mirror=$(awk '/^URIs:/{print $2; exit}' "$f"); [ -n "$mirror" ] && break
done
if [ -z "$mirror" ] && [ -f /etc/apt/sources.list ]; then
  mirror=$(awk '$1=="deb" {for(i=2;i<=NF;i++) if ($i ~ /^(https?|ftp):/) {print $i; exit}}' /etc/apt/sources.list)
fi
case "$mirror" in *security*) mirror="${mirror%-security}";; esac
[ -n "$mirror" ] || die "no Debian mirror configured in /etc/apt"
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
mkdir -p "$work/lists/partial" "$work/cache/archives/partial"
echo "deb [trusted=yes] $mirror $PKG_SUITE main" > "$work/sources.list"
opts=(-o "Dir::Etc::SourceList=$work/sources.list" -o Dir::Etc::SourceParts=/dev/null
      -o "Dir::State::Lists=$work/lists" -o "Dir::Cache=$work/cache" -o Acquire::Languages=none
      -o Debug::NoLocking=1 -o APT::Sandbox::User=root -q)
apt-get "${opts[@]}" update >"$work/log" 2>&1 || die "apt-get update against $PKG_SUITE failed: $(tail -2 "$work/log")"
(cd "$work" && apt-get "${opts[@]}" download "libonnxruntime-dev=$PKG_VERSION" >>"$work/log" 2>&1) \
  || die "apt-get download libonnxruntime-dev=$PKG_VERSION failed: $(tail -2 "$work/log")"
deb=$(ls "$work"/libonnxruntime-dev_*.deb 2>/dev/null | head -1)
[ -n "$deb" ] || die "no .deb downloaded"
got=$(sha256sum "$deb" | cut -d' ' -f1)
[ "$got" = "$PKG_SHA256" ] || die "sha256 mismatch for $(basename "$deb"): got $got, want $PKG_SHA256"
mkdir -p "$cache"
tmpx="$cache/.x.$$"; rm -rf "$tmpx"; dpkg-deb -x "$deb" "$tmpx"
rm -rf "$cache/ort-headers-$PKG_VERSION"; mv "$tmpx" "$cache/ort-headers-$PKG_VERSION"
[ -f "$inc/onnxruntime_c_api.h" ] || die "package did not contain onnxruntime_c_api.h"
echo "$inc"
