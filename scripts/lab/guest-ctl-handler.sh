#!/bin/sh
# Test-only control channel: reads a script preceded by its length in bytes on a line of its own (the host cannot
# half-close a vsock connection to mark the end: the backend makes that a full shutdown), runs it, and returns
# combined output and the exit status on a last line, which ends the answer. Reachable only through the lab's
# loopback-bound hostfwd or the guest's vsock device.
script=$(mktemp /tmp/ctl.XXXXXX)
read -r length
head -c "$length" > "$script"
sh "$script" </dev/null 2>&1
echo "__WUKONG_RC=$?"
rm -f "$script"
