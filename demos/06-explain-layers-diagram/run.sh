#!/bin/sh
# Where a file comes from, what each layer changed, and the stack as a picture.
. "$(dirname "$0")/../lib.sh"
mkdir -p "$D/ctx"
printf 'FROM alpine\nRUN head -c 1000 /dev/zero > /big\nRUN echo more >> /big\nRUN rm /etc/os-release\n' > "$D/ctx/Dockerfile"
pl base alpine
pl build -t demo "$D/ctx" > /dev/null
pl explain demo:/big
pl explain demo:/etc/os-release
pl layers demo
pl diagram demo
