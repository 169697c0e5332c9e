#!/bin/sh
# Changing a lower file copies the whole file up first, even for a chmod.
. "$(dirname "$0")/../lib.sh"
mkdir -p "$D/lower" "$D/upper" "$D/work" "$D/merged"
printf '#!/bin/sh\necho "hello, layers!!"\n' > "$D/lower/app.sh"
pl mount -o "lowerdir=$D/lower,upperdir=$D/upper,workdir=$D/work" "$D/merged"
run ls -l "$D/upper"
run chmod +x "$D/merged/app.sh"
run ls -l "$D/upper"
pl umount "$D/merged"
# The kernel's metacopy=on, which pylayerfs implements: the chmod copies the metadata only.
mkdir -p "$D/upper2" "$D/work2"
pl mount -o "lowerdir=$D/lower,upperdir=$D/upper2,workdir=$D/work2,metacopy=on" "$D/merged"
run chmod +x "$D/merged/app.sh"
run stat -c '%n: %s bytes, %b blocks, %A' "$D/upper2/app.sh"
run getfattr --absolute-names -d -m trusted.overlay.metacopy "$D/upper2/app.sh"
run cat "$D/merged/app.sh"
pl umount "$D/merged"
