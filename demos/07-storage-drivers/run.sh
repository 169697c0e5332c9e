#!/bin/sh
# The same image and containers under the overlay drivers (layers shared) and vfs (full copies);
# then metacopy: the blog's chmod layer stored as metadata only.
. "$(dirname "$0")/../lib.sh"
mkdir -p "$D/ctx"
printf '#!/bin/sh\necho "hello, layers!!"\n' > "$D/ctx/app.sh"
printf 'FROM alpine\nCOPY app.sh ./app.sh\nRUN chmod +x app.sh\nENTRYPOINT ["./app.sh"]\n' > "$D/ctx/Dockerfile"
pl base alpine >/dev/null
say "pylayerfs build --storage-driver vfs -t bitphile/my-new-image $D/ctx | tail -n 1"
$PYLAYERFS build --storage-driver vfs -t bitphile/my-new-image "$D/ctx" | tail -n 1
for driver in fuse overlay vfs vfs; do
    pl create --storage-driver $driver bitphile/my-new-image >/dev/null
done
pl ps -a -s
pl system df
run du -sh "$PYLAYERFS_ROOT/overlay2" "$PYLAYERFS_ROOT/vfs/dir"

export PYLAYERFS_ROOT="$D/metacopy-store"
pl base alpine >/dev/null
say "pylayerfs build --metacopy -t bitphile/my-new-image $D/ctx | tail -n 1"
$PYLAYERFS build --metacopy -t bitphile/my-new-image "$D/ctx" | tail -n 1
pl history bitphile/my-new-image
pl explain bitphile/my-new-image:/app.sh
pl run --rm bitphile/my-new-image
