#!/bin/sh
# The blog's Dockerfile built into layers, then history.
. "$(dirname "$0")/../lib.sh"
mkdir -p "$D/ctx"
printf '#!/bin/sh\necho "hello, layers!!"\n' > "$D/ctx/app.sh"
printf 'FROM alpine\nCOPY app.sh ./app.sh\nRUN chmod +x app.sh\nENTRYPOINT ["./app.sh"]\n' > "$D/ctx/Dockerfile"
pl base alpine
pl build -t bitphile/my-new-image "$D/ctx"
pl build -t bitphile/my-new-image "$D/ctx"
pl history bitphile/my-new-image
