# Private apt configuration: the machine's own sources plus bookworm-backports, without touching /etc/apt.
# Source this file; it defines apt_private (apt-get with the private configuration) and apt_private_update.

WUKONG_APT_DIR=${WUKONG_APT_DIR:-/var/cache/wukong/apt}

apt_private_setup() {
  mkdir -p "$WUKONG_APT_DIR/sources" "$WUKONG_APT_DIR/lists/partial"
  cp /etc/apt/sources.list.d/*.sources "$WUKONG_APT_DIR/sources/" 2>/dev/null || true
  local uri
  uri=$(awk '/^URIs:/ {print $2}' /etc/apt/sources.list.d/*.sources | grep -v security | head -n1)
  if [ -z "$uri" ]; then
    echo "apt: no Debian mirror found in /etc/apt/sources.list.d/*.sources" >&2
    return 1
  fi
  cat > "$WUKONG_APT_DIR/sources/backports.sources" <<SRC
Types: deb
URIs: $uri
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
}

apt_private() {
  apt-get -o Dir::Etc::sourcelist=- -o Dir::Etc::sourceparts="$WUKONG_APT_DIR/sources" \
    -o Dir::State::Lists="$WUKONG_APT_DIR/lists" "$@"
}

apt_cache_private() {
  apt-cache -o Dir::Etc::sourcelist=- -o Dir::Etc::sourceparts="$WUKONG_APT_DIR/sources" \
    -o Dir::State::Lists="$WUKONG_APT_DIR/lists" "$@"
}

apt_private_update() {
  apt_private_setup && apt_private update -qq
}
