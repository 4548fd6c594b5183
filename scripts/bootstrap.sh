#!/usr/bin/env bash
# Sets up everything the daemon and its tests need on a fresh Debian 12 machine: the
# Debian packages that systemd-python needs to build from source (libsystemd-dev,
# pkg-config, a C compiler, the Python headers), venv support and the tools the tests
# call (curl, jq, groff), then the venv itself.
set -euo pipefail
venv=${1:-.venv}
python=${PYTHON:-python3}

installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }

need=()
# curl and jq: the README's sessions use them, and tests/test_readme.py runs those;
# groff-base renders the man pages in tests/test_docs.py.
for pkg in libsystemd-dev pkg-config curl jq groff-base; do
    installed "$pkg" || need+=("$pkg")
done
command -v cc >/dev/null 2>&1 || need+=(gcc)
# Debian's own python3 keeps venv support and its headers in separate packages.
if [ "$(command -v "$python")" = /usr/bin/python3 ] || [ "$python" = /usr/bin/python3 ]; then
    installed python3-venv || need+=(python3-venv)
    installed python3-dev || need+=(python3-dev)
fi
if ((${#need[@]})); then
    if [ "$(id -u)" = 0 ]; then
        echo "bootstrap: installing ${need[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
    else
        echo "bootstrap: missing ${need[*]}; run: sudo apt-get install ${need[*]}" >&2
        exit 1
    fi
fi

"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
    echo "bootstrap: Python 3.11 or newer is needed ($python is $("$python" --version))" >&2
    exit 1
}
"$python" -c 'import sysconfig, os, sys; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' || {
    echo "bootstrap: the Python headers (Python.h) of $python are missing" >&2
    exit 1
}
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip >/dev/null
"$venv/bin/python" -m pip install -q -e ".[dev]"

# promtool, Prometheus' own checker (the tests run `promtool check metrics` on /metrics):
# from Debian's prometheus package, unpacked into the venv without installing a server.
if [ ! -x "$venv/bin/promtool" ]; then
    tmp=$(mktemp -d)
    if (cd "$tmp" && { apt-get download -qq prometheus 2>/dev/null \
            || { apt-get update -qq && apt-get download -qq prometheus; }; }); then
        dpkg-deb --fsys-tarfile "$tmp"/prometheus_*.deb | tar -x -C "$tmp" ./usr/bin/promtool
        install -m 0755 "$tmp/usr/bin/promtool" "$venv/bin/promtool"
    else
        echo "bootstrap: could not download Debian's prometheus package (for promtool)" >&2
    fi
    rm -rf "$tmp"
fi
