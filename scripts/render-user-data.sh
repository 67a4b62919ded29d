#!/usr/bin/env bash
# Renders systemd/cloud-init/user-data.yaml for one guest: the agent's configuration and unit from systemd/, its TLS
# files, and where to download the binary. Prints the cloud-config on stdout.
#   scripts/render-user-data.sh --agent-url URL --agent-sha256 HEX --cert agent.crt --key agent.key \
#       --client-ca companion-ca.crt [--config agent.toml] > user-data
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
config="$here/systemd/agent.toml"
unit="$here/systemd/wukong-agent.service"
url="" sha="" cert="" key="" ca=""
while [ $# -gt 0 ]; do
  case "$1" in
    --agent-url) url=$2 ;;
    --agent-sha256) sha=$2 ;;
    --cert) cert=$2 ;;
    --key) key=$2 ;;
    --client-ca) ca=$2 ;;
    --config) config=$2 ;;
    *) echo "render-user-data: unknown argument $1" >&2; exit 2 ;;
  esac
  shift 2
done
for v in url sha cert key ca; do
  [ -n "${!v}" ] || { echo "render-user-data: --${v/sha/agent-sha256} is required" >&2; exit 2; }
done
[[ "$sha" =~ ^[0-9a-f]{64}$ ]] || { echo "render-user-data: --agent-sha256 must be 64 hex digits" >&2; exit 2; }
for f in "$config" "$unit" "$cert" "$key" "$ca"; do
  [ -r "$f" ] || { echo "render-user-data: cannot read $f" >&2; exit 2; }
done
AGENT_TOML=$config SERVICE_UNIT=$unit AGENT_CERT=$cert AGENT_KEY=$key CLIENT_CA=$ca URL=$url SHA=$sha \
awk '
  $0 ~ /^ *@[A-Z_]+@$/ {
    i = index($0, "@"); indent = substr($0, 1, i - 1); name = substr($0, i + 1, length($0) - i - 1)
    if (name in ENVIRON) {
      while ((getline line < ENVIRON[name]) > 0) print indent line
      close(ENVIRON[name]); next
    }
  }
  { gsub(/@AGENT_URL@/, ENVIRON["URL"]); gsub(/@AGENT_SHA256@/, ENVIRON["SHA"]); print }
' "$here/systemd/cloud-init/user-data.yaml"
