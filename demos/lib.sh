# Shared by the numbered demos: a throw-away directory, pylayerfs, and cleanup that never leaves a mount.
set -eu
PYLAYERFS=${PYLAYERFS:-pylayerfs}
D=$(mktemp -d /tmp/pylayerfs-demo.XXXXXX)
export PYLAYERFS_ROOT="$D/store"
cleanup() {
    for m in $(awk '{print $5}' /proc/self/mountinfo | grep "^$D" | sort -r); do umount -l "$m" 2>/dev/null || true; done
    rm -rf "$D"
}
trap cleanup EXIT
say() { printf '\n$ %s\n' "$*"; }
run() { say "$*"; "$@"; }
pl() { say "pylayerfs $*"; $PYLAYERFS "$@"; }
