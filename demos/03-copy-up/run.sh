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
