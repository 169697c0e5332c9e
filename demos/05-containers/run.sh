#!/bin/sh
# A container: size and virtual size, a write through exec, diff, commit.
. "$(dirname "$0")/../lib.sh"
pl base alpine
pl run -d --name web alpine sleep 600
pl ps -s
pl exec web sh -c "echo hello world > file.txt"
pl ps -s
pl diff web
pl commit -m "with file.txt" web with-file
pl run --rm with-file cat /file.txt
pl rm -f web
