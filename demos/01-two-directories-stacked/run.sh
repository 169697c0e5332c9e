#!/bin/sh
# Two lower directories and an upper one, stacked: upper hides lower, directories merge.
. "$(dirname "$0")/../lib.sh"
mkdir -p "$D/lower2/etc" "$D/lower1/etc" "$D/upper" "$D/work" "$D/merged"
echo "from the bottom layer" > "$D/lower2/etc/motd"
echo "bottom only" > "$D/lower2/etc/issue"
echo "from the middle layer" > "$D/lower1/etc/motd"
pl mount -o "lowerdir=$D/lower1:$D/lower2,upperdir=$D/upper,workdir=$D/work" "$D/merged"
run ls "$D/merged/etc"
run cat "$D/merged/etc/motd"
run cat "$D/merged/etc/issue"
pl umount "$D/merged"
