#!/usr/bin/env bash
# Sets up everything the daemon and its tests need on a fresh Debian 12 machine:
# libsystemd-dev and pkg-config (systemd-python builds from source), then the venv.
set -euo pipefail
venv=${1:-.venv}
python=${PYTHON:-python3}

need=()
for pkg in libsystemd-dev pkg-config; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need+=("$pkg")
done
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
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip >/dev/null
"$venv/bin/python" -m pip install -q -e ".[dev]"
