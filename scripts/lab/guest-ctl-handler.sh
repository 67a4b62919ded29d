#!/bin/sh
# Test-only control channel: runs the script the host sends (until it half-closes), returns combined output and
# the exit status on a last line. Reachable only through the lab's loopback-bound hostfwd.
script=$(mktemp /tmp/ctl.XXXXXX)
cat > "$script"
sh "$script" </dev/null 2>&1
echo "__WUKONG_RC=$?"
rm -f "$script"
