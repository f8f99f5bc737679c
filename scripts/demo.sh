#!/usr/bin/env bash
# The built-in example: a lower and an upper layer, one pyoverlay mount, the merged view.
#
# Needs the venv made by scripts/bootstrap.sh (PYOVERLAY_VENV, default REPO/.venv) and
# root (FUSE mounts with other users' files). Exits non-zero if anything fails, and never
# leaves a mount or its temp directory behind.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=$(realpath -m "${PYOVERLAY_VENV:-$REPO/.venv}")
PYOVERLAY=$VENV/bin/pyoverlay
LOWER_TEXT="I am from lower"
UPPER_TEXT="I am from upper"

say() { printf 'demo: %s\n' "$*"; }
fail() {
    printf 'demo: FAILED: %s\n' "$*" >&2
    exit 1
}

[[ -x $PYOVERLAY ]] || fail "$PYOVERLAY not found; run scripts/bootstrap.sh (or make demo)"

DEMO_DIR=$(mktemp -d -t pyoverlay-demo.XXXXXX)
MERGED=$DEMO_DIR/merged
PID_FILE=$DEMO_DIR/pyoverlay.pid

daemon_pid() {
    [[ -s $PID_FILE ]] && cat "$PID_FILE"
}

unmount_merged() {
    "$PYOVERLAY" umount "$MERGED" && return 0
    printf 'demo: warning: pyoverlay umount failed, trying fusermount3 -u\n' >&2
    fusermount3 -u "$MERGED"
}

# After an unmount the daemon exits by itself; give it a moment before checking.
wait_daemon_exit() {
    local pid
    pid=$(daemon_pid) || return 0
    for _ in $(seq 50); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.1
    done
    return 1
}

cleanup() {
    local rc=$? pid
    cd /
    if mountpoint -q "$MERGED" 2>/dev/null; then
        unmount_merged >/dev/null 2>&1 || true
    fi
    if ! wait_daemon_exit && pid=$(daemon_pid); then
        # Only the daemon this script started, found through its own pid file.
        kill "$pid" 2>/dev/null || true
    fi
    if mountpoint -q "$MERGED" 2>/dev/null; then
        printf 'demo: %s is still mounted; left %s in place\n' "$MERGED" "$DEMO_DIR" >&2
        rc=1
    else
        rm -rf --one-file-system "$DEMO_DIR"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

make_layers() {
    mkdir lower upper work merged
    echo "$LOWER_TEXT" >lower/both.txt
    echo "$LOWER_TEXT" >lower/in_lower.txt
    echo "$UPPER_TEXT" >upper/both.txt
    echo "$UPPER_TEXT" >upper/in_upper.txt
}

show_merged() {
    say "merged tree:"
    find merged | sort
    ls -la merged
    local f
    for f in merged/both.txt merged/in_lower.txt merged/in_upper.txt; do
        printf '==> %s <==\n' "$f"
        cat "$f"
    done
}

# The overlay rules the demo is about: upper hides lower, both sides show through.
check_merged() {
    local expected actual
    expected=$(printf '%s\n' merged merged/both.txt merged/in_lower.txt merged/in_upper.txt)
    actual=$(find merged | sort)
    [[ $actual == "$expected" ]] || fail "merged tree is not lower+upper: ${actual//$'\n'/ }"
    [[ $(cat merged/both.txt) == "$UPPER_TEXT" ]] || fail "merged/both.txt does not come from upper"
    [[ $(cat merged/in_lower.txt) == "$LOWER_TEXT" ]] || fail "merged/in_lower.txt is wrong"
    [[ $(cat merged/in_upper.txt) == "$UPPER_TEXT" ]] || fail "merged/in_upper.txt is wrong"
}

main() {
    cd "$DEMO_DIR"
    make_layers
    say "in $DEMO_DIR: pyoverlay mount lower upper work merged"
    timeout 60 "$PYOVERLAY" mount --pid-file "$PID_FILE" lower upper work merged ||
        fail "pyoverlay mount exited with status $?"
    mountpoint -q merged || fail "pyoverlay mount returned but merged is not a mount point"
    findmnt -n -o TARGET,FSTYPE,SOURCE "$MERGED" || true
    show_merged
    check_merged
    say "pyoverlay umount merged"
    unmount_merged || fail "could not unmount $MERGED"
    wait_daemon_exit || fail "the daemon (pid $(daemon_pid)) did not exit after the unmount"
    say "OK"
}

main "$@"
