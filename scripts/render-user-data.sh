#!/usr/bin/env bash
# Renders systemd/cloud-init/user-data.yaml for one guest: the agent's configuration, unit and tmpfiles.d entry from
# systemd/, its TLS files, and what to install: the bare binary, the .deb or the .rpm (scripts/package-agent.sh).
# Prints the cloud-config on stdout.
#   scripts/render-user-data.sh (--agent-url | --agent-deb | --agent-rpm) URL --agent-sha256 HEX --cert agent.crt \
#       --key agent.key --client-ca companion-ca.crt [--config agent.toml] > user-data
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)

usage() {
  cat <<'USAGE'
Usage: render-user-data.sh (--agent-url | --agent-deb | --agent-rpm) URL --agent-sha256 HEX
                           --cert FILE --key FILE --client-ca FILE [--config FILE] > user-data

Renders the cloud-config that installs wukong-agent in a guest and prints it on stdout.

  --agent-url URL      install the bare wukong-agent binary downloaded from URL (as /usr/sbin/wukong-agent, with
                       the unit and tmpfiles.d entry from systemd/)
  --agent-deb URL      install the .deb downloaded from URL with dpkg (Debian, Ubuntu)
  --agent-rpm URL      install the .rpm downloaded from URL with rpm (RHEL, Rocky, Alma, SLES, Amazon Linux)
  --agent-sha256 HEX   SHA-256 of what URL serves (64 hex digits); the guest refuses anything else
  --cert FILE          the agent's TLS certificate (PEM)
  --key FILE           the agent's private key (PEM)
  --client-ca FILE     CA (PEM) that signs the certificates of the agent's clients
  --config FILE        agent configuration (default: systemd/agent.toml); a package keeps it as its conffile
  -h, --help           this text

Give exactly one of --agent-url, --agent-deb and --agent-rpm. URL is passed to the guest's curl byte for byte
(presigned URLs with &, =, %, quotes are fine); it must be one line. It must serve the build for the guest's
architecture (x86_64: the amd64 .deb, the x86_64 .rpm; aarch64: the arm64 .deb, the aarch64 .rpm); the guest
refuses any other architecture.

The output holds the agent's private key: keep it secret. In KubeVirt, put it in a Secret and name that Secret in
the VM's cloudInitNoCloud volume as userDataSecretRef, not inline as userData.
USAGE
}

config="$here/systemd/agent.toml"
unit="$here/systemd/wukong-agent.service"
tmpfiles="$here/systemd/wukong-agent.tmpfiles"
kind="" kind_flag="" url="" sha="" cert="" key="" ca=""
while [ $# -gt 0 ]; do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --agent-url | --agent-deb | --agent-rpm | --agent-sha256 | --cert | --key | --client-ca | --config)
      # A flag followed by nothing, or directly by another flag, has lost its value.
      if [ $# -lt 2 ] || [[ "$2" == --* ]]; then
        echo "render-user-data: $1 needs a value (see --help)" >&2
        exit 2
      fi
      case "$1" in
        --agent-url | --agent-deb | --agent-rpm)
          if [ -n "$kind" ]; then
            echo "render-user-data: give one of --agent-url, --agent-deb and --agent-rpm, not $kind_flag and $1" >&2
            exit 2
          fi
          kind_flag=$1 url=$2
          case "$1" in --agent-url) kind=binary ;; --agent-deb) kind=deb ;; --agent-rpm) kind=rpm ;; esac
          ;;
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
[ -n "$url" ] || missing+=("--agent-url (or --agent-deb, --agent-rpm)")
[ -n "$sha" ] || missing+=(--agent-sha256)
[ -n "$cert" ] || missing+=(--cert)
[ -n "$key" ] || missing+=(--key)
[ -n "$ca" ] || missing+=(--client-ca)
if [ ${#missing[@]} -eq 1 ]; then
  echo "render-user-data: ${missing[0]} is required (see --help)" >&2
  exit 2
elif [ ${#missing[@]} -gt 1 ]; then
  last=${missing[-1]}
  list=$(IFS=';'; echo "${missing[*]:0:${#missing[@]}-1}")
  echo "render-user-data: ${list//;/, } and $last are required (see --help)" >&2
  exit 2
fi
# A line break would end the shell word in the guest's script (and a YAML line); no URL needs one.
if [[ "$url" =~ [[:cntrl:]] ]]; then
  echo "render-user-data: $kind_flag holds a line break or another control character; give the URL on one line" >&2
  exit 2
fi
[[ "$sha" =~ ^[0-9a-f]{64}$ ]] || { echo "render-user-data: --agent-sha256 must be 64 hex digits" >&2; exit 2; }
for f in "$config" "$unit" "$tmpfiles" "$cert" "$key" "$ca"; do
  [ -r "$f" ] || { echo "render-user-data: cannot read $f" >&2; exit 2; }
done

# The URL becomes one single-quoted shell word ('\'' for each quote): sh takes nothing in it as syntax, and inside
# the YAML block scalar nothing is special either, so the guest's curl gets it byte for byte.
quoted="'${url//\'/\'\\\'\'}'"
# Values are spliced in with match/substr, never gsub/sub, whose replacement text treats & and \ as syntax; one
# pass over each line, so a value that looks like a placeholder is never filled in turn.
AGENT_TOML=$config SERVICE_UNIT=$unit TMPFILES=$tmpfiles AGENT_CERT=$cert AGENT_KEY=$key CLIENT_CA=$ca \
  V_AGENT_URL=$quoted V_AGENT_SHA256=$sha V_AGENT_KIND=$kind \
  awk '
  function fill(line,    out) {
    out = ""
    while (match(line, /@AGENT_(URL|SHA256|KIND)@/)) {
      out = out substr(line, 1, RSTART - 1) ENVIRON["V_" substr(line, RSTART + 1, RLENGTH - 2)]
      line = substr(line, RSTART + RLENGTH)
    }
    return out line
  }
  $0 ~ /^ *@[A-Z_]+@$/ {
    i = index($0, "@"); indent = substr($0, 1, i - 1); name = substr($0, i + 1, length($0) - i - 1)
    if (name in ENVIRON) {
      while ((getline line < ENVIRON[name]) > 0) print indent line
      close(ENVIRON[name]); next
    }
  }
  { print fill($0) }
' "$here/systemd/cloud-init/user-data.yaml"
