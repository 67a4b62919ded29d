#!/usr/bin/env bash
# Renders systemd/cloud-init/user-data.yaml for one guest: the agent's configuration and unit from systemd/, its TLS
# files, and where to download the binary. Prints the cloud-config on stdout.
#   scripts/render-user-data.sh --agent-url URL --agent-sha256 HEX --cert agent.crt --key agent.key \
#       --client-ca companion-ca.crt [--config agent.toml] > user-data
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)

usage() {
  cat <<'USAGE'
Usage: render-user-data.sh --agent-url URL --agent-sha256 HEX --cert FILE --key FILE --client-ca FILE
                           [--config FILE] > user-data

Renders the cloud-config that installs wukong-agent in a guest and prints it on stdout.

  --agent-url URL      where the guest downloads the wukong-agent binary
  --agent-sha256 HEX   SHA-256 of that binary (64 hex digits); the guest refuses any other
  --cert FILE          the agent's TLS certificate (PEM)
  --key FILE           the agent's private key (PEM)
  --client-ca FILE     CA (PEM) that signs the certificates of the agent's clients
  --config FILE        agent configuration (default: systemd/agent.toml)
  -h, --help           this text

The output holds the agent's private key: keep it secret. In KubeVirt, put it in a Secret and name that Secret in
the VM's cloudInitNoCloud volume as userDataSecretRef, not inline as userData.
USAGE
}

config="$here/systemd/agent.toml"
unit="$here/systemd/wukong-agent.service"
url="" sha="" cert="" key="" ca=""
while [ $# -gt 0 ]; do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --agent-url | --agent-sha256 | --cert | --key | --client-ca | --config)
      # A flag followed by nothing, or directly by another flag, has lost its value.
      if [ $# -lt 2 ] || [[ "$2" == --* ]]; then
        echo "render-user-data: $1 needs a value (see --help)" >&2
        exit 2
      fi
      case "$1" in
        --agent-url) url=$2 ;;
        --agent-sha256) sha=$2 ;;
        --cert) cert=$2 ;;
        --key) key=$2 ;;
        --client-ca) ca=$2 ;;
        --config) config=$2 ;;
      esac
      shift 2
      ;;
    *) echo "render-user-data: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
missing=()
[ -n "$url" ] || missing+=(--agent-url)
[ -n "$sha" ] || missing+=(--agent-sha256)
[ -n "$cert" ] || missing+=(--cert)
[ -n "$key" ] || missing+=(--key)
[ -n "$ca" ] || missing+=(--client-ca)
if [ ${#missing[@]} -eq 1 ]; then
  echo "render-user-data: ${missing[0]} is required (see --help)" >&2
  exit 2
elif [ ${#missing[@]} -gt 1 ]; then
  last=${missing[-1]}
  list=$(IFS=,; echo "${missing[*]:0:${#missing[@]}-1}")
  echo "render-user-data: ${list//,/, } and $last are required (see --help)" >&2
  exit 2
fi
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
