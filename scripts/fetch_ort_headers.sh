#!/usr/bin/env bash
# ONNX Runtime's C/C++ headers, needed to build wina's native kernels. No PyPI package ships them and Debian 12
# has none; Debian 13 (trixie) has libonnxruntime-dev. This downloads that one package with a private apt state
# (no root, nothing installed) and unpacks its headers. Usage: fetch_ort_headers.sh DEST_DIR
set -euo pipefail
dest="$1"
[ -f "$dest/onnxruntime_cxx_api.h" ] && exit 0
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/lists/partial" "$tmp/cache/archives/partial" "$tmp/deb"
cat > "$tmp/trixie.sources" <<SRC
Types: deb
URIs: http://deb.debian.org/debian
Suites: trixie
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
opts=(-o "Dir::Etc::SourceList=$tmp/none.list" -o "Dir::Etc::SourceParts=$tmp/parts"
      -o "Dir::State::Lists=$tmp/lists" -o "Dir::Cache=$tmp/cache" -o "Debug::NoLocking=1" -o "APT::Sandbox::User=root")
mkdir -p "$tmp/parts" && cp "$tmp/trixie.sources" "$tmp/parts/"
: > "$tmp/none.list"
apt-get "${opts[@]}" update -qq >/dev/null
(cd "$tmp/deb" && apt-get "${opts[@]}" download libonnxruntime-dev >/dev/null)
dpkg-deb -x "$tmp"/deb/libonnxruntime-dev_*.deb "$tmp/x"
src=$(dirname "$(find "$tmp/x" -name onnxruntime_cxx_api.h | head -1)")
mkdir -p "$dest.part"
cp "$src"/*.h "$dest.part/"
rm -rf "$dest" && mv "$dest.part" "$dest"
