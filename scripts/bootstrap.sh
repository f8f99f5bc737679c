#!/usr/bin/env bash
# Set up a Debian 12 machine (as root) to build, test and demo pyoverlay; safe to re-run.
#
# What it does, each step only when needed:
#   1. apt-get installs the system packages the tests and the demo use (checked with dpkg -s);
#   2. makes sure /dev/fuse exists and kernel overlayfs is available;
#   3. creates a venv, installs the project into it with its test extras (editable);
#   4. builds the C helper pyoverlay._native in place and checks that it imports.
#
# Environment:
#   PYOVERLAY_VENV=DIR     venv location (default: REPO/.venv)
#   PYTHON=EXE             interpreter that creates the venv (default: python3)
#   PYOVERLAY_LINK_BIN=1   also symlink the venv's `pyoverlay` to /usr/local/bin/pyoverlay.
#                          `mount -t fuse.pyoverlay` and fstab entries need it: mount.fuse3
#                          runs the program named after the subtype from root's PATH.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=$(realpath -m "${PYOVERLAY_VENV:-$REPO/.venv}")
PYTHON=${PYTHON:-python3}
VPY=$VENV/bin/python
STAMP=$VENV/.pyoverlay-install-stamp
# Added to the venv's site-packages while native/lookup.c does not exist yet (see install_shim).
SYSTEM_PACKAGES=(fuse3 libfuse3-dev pkg-config attr gcc fuse-overlayfs containerd runc
    busybox-static e2fsprogs util-linux psmisc make)

LOG=$(mktemp -t pyoverlay-bootstrap.XXXXXX)
TMPDIRS=()
cleanup() { rm -rf "$LOG" "${TMPDIRS[@]}"; }
trap cleanup EXIT

say() { printf 'bootstrap: %s\n' "$*"; }
warn() { printf 'bootstrap: WARNING: %s\n' "$*" >&2; }
die() {
    printf 'bootstrap: ERROR: %s\n' "$*" >&2
    exit 1
}

# Run a command with its output kept out of sight unless it fails.
quiet() {
    if ! "$@" >"$LOG" 2>&1; then
        tail -n 40 "$LOG" >&2
        die "command failed: $*"
    fi
}

is_installed() {
    # sed, not grep -q: with pipefail an early exit would fail dpkg with SIGPIPE.
    [[ $(dpkg -s "$1" 2>/dev/null | sed -n 's/^Status: //p') == "install ok installed" ]]
}

have_filesystem() {
    awk -v fs="$1" '$NF == fs { found = 1 } END { exit !found }' /proc/filesystems
}

python_has_venv() {
    "$PYTHON" -c 'import ensurepip, venv' >/dev/null 2>&1
}

python_has_headers() {
    "$PYTHON" -c 'import os, sys, sysconfig
sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
        >/dev/null 2>&1
}

# Everything apt must install, printed one per line.
missing_packages() {
    local pkg
    for pkg in "${SYSTEM_PACKAGES[@]}"; do
        is_installed "$pkg" || echo "$pkg"
    done
    if ! command -v "$PYTHON" >/dev/null 2>&1; then
        echo python3
        echo python3-venv
        echo python3-dev
    else
        python_has_venv || is_installed python3-venv || echo python3-venv
        python_has_headers || is_installed python3-dev || echo python3-dev
    fi
    # modprobe is needed only when the fuse device node is not there yet.
    if [[ ! -e /dev/fuse ]] && ! command -v modprobe >/dev/null 2>&1; then
        is_installed kmod || echo kmod
    fi
}

install_system_packages() {
    if ! command -v dpkg >/dev/null 2>&1; then
        warn "not a Debian system: install yourself: ${SYSTEM_PACKAGES[*]} python3-venv python3-dev"
        return
    fi
    local missing
    mapfile -t missing < <(missing_packages)
    ((${#missing[@]})) || return 0
    [[ $EUID -eq 0 ]] || die "run as root to install the missing packages: ${missing[*]}"
    say "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    quiet apt-get update -qq
    quiet apt-get install -y -qq --no-install-recommends "${missing[@]}"
}

check_python() {
    command -v "$PYTHON" >/dev/null 2>&1 || die "no $PYTHON on PATH"
    python_has_venv || die "$PYTHON cannot create venvs (no ensurepip); on Debian: python3-venv"
    python_has_headers || die "$PYTHON has no C headers (Python.h); on Debian: python3-dev"
    "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
        die "$PYTHON is older than 3.11, which pyoverlay needs"
}

ensure_fuse_device() {
    [[ -c /dev/fuse ]] && return 0
    if command -v modprobe >/dev/null 2>&1; then
        modprobe fuse >/dev/null 2>&1 || true
    fi
    # Without udev (containers, chroots) nobody creates the node even once fuse is loaded.
    if [[ ! -e /dev/fuse ]] && have_filesystem fuse; then
        mknod -m 0666 /dev/fuse c 10 229 2>/dev/null || true
    fi
    [[ -c /dev/fuse ]] || die "/dev/fuse is missing and 'modprobe fuse' did not create it"
}

ensure_overlay_module() {
    have_filesystem overlay && return 0
    if command -v modprobe >/dev/null 2>&1; then
        modprobe overlay >/dev/null 2>&1 || true
    fi
    have_filesystem overlay ||
        warn "kernel overlayfs is not available: tests that compare with it will fail"
}

ensure_venv() {
    if [[ -f $VENV/pyvenv.cfg ]] && ! "$VPY" -c '' >/dev/null 2>&1; then
        # Its interpreter is gone (e.g. the python it was made from was removed): remake it.
        say "recreating broken venv at $VENV"
        rm -rf "$VENV"
    fi
    if [[ ! -x $VPY ]]; then
        say "creating venv at $VENV"
        quiet "$PYTHON" -m venv "$VENV"
    fi
}

# Whatever changes what gets installed; a matching stamp means the install is current.
install_key() {
    {
        echo "repo=$REPO mode=$1"
        cat "$REPO/pyproject.toml" "$REPO/setup.py"
        "$VPY" -c 'import sys; print(sys.version)'
    } | sha256sum | cut -d' ' -f1
}

install_editable() {
    quiet "$VPY" -m pip install -q -e "${REPO}[test]"
}

install_project() {
    local key
    key=$(install_key editable)
    if [[ -f $STAMP && $(cat "$STAMP") == "$key" ]] &&
        "$VPY" -c 'import importlib.metadata as m; m.version("pyoverlay")' >/dev/null 2>&1; then
        return 0
    fi
    say "installing pyoverlay and its test tools into $VENV"
    rm -f "$STAMP"
    quiet "$VPY" -m pip install -q --upgrade 'setuptools>=68' wheel
    install_editable
    printf '%s\n' "$key" >"$STAMP"
}

build_native() {
    # In place, so the editable install imports the fresh build; temp files stay in the venv.
    (cd "$REPO" && quiet "$VPY" setup.py -q build_ext --inplace --build-temp "$VENV/build-temp")
    # From / so the import goes through the installed package, not the current directory.
    (cd / && quiet "$VPY" -c 'import pyoverlay._native')
}

check_install() {
    (cd / && quiet "$VENV/bin/pyoverlay" --version)
}

link_bin() {
    [[ ${PYOVERLAY_LINK_BIN:-0} == 1 ]] || return 0
    ln -sfn "$VENV/bin/pyoverlay" /usr/local/bin/pyoverlay
    say "linked /usr/local/bin/pyoverlay -> $VENV/bin/pyoverlay"
}

main() {
    install_system_packages
    check_python
    if [[ $EUID -eq 0 ]]; then
        ensure_fuse_device
        ensure_overlay_module
    else
        [[ -c /dev/fuse ]] || warn "/dev/fuse is missing; run as root to load fuse"
    fi
    ensure_venv
    install_project
    build_native
    check_install
    link_bin
    local native=no
    (cd / && "$VPY" -c 'import pyoverlay._native' >/dev/null 2>&1) && native=yes
    say "ready: $VENV ($("$VPY" -V), native helper: $native)"
}

main "$@"
