# Private apt configuration: the machine's own sources plus bookworm-backports, without touching /etc/apt.
# Source this file; it defines apt_private (apt-get with the private configuration) and apt_private_update, and
# apt_private_add_deb_src for the few scripts that need Debian source packages.
# The machine's sources may be deb822 files (sources.list.d/*.sources) or one-line entries (sources.list and
# sources.list.d/*.list), or both; WUKONG_APT_ETC says where they are read from (tests point it at fixtures).

WUKONG_APT_DIR=${WUKONG_APT_DIR:-/var/cache/wukong/apt}
WUKONG_APT_ETC=${WUKONG_APT_ETC:-/etc/apt}

# Prints the URIs of the enabled binary (deb) entries of deb822 files, one a line, in file order.
apt_deb822_uris() {
  awk '
    function flush() { if (deb && enabled) for (i = 1; i <= n; i++) print uris[i]; deb = 0; enabled = 1; n = 0 }
    BEGIN { enabled = 1 }
    FNR == 1 { flush() }
    /^[ \t]*#/ { next }
    /^[ \t]*$/ { flush(); next }
    {
      field = tolower($1)
      if (field == "types:") { for (i = 2; i <= NF; i++) if ($i == "deb") deb = 1 }
      else if (field == "uris:") { for (i = 2; i <= NF; i++) uris[++n] = $i }
      else if (field == "enabled:") { enabled = (tolower($2) != "no") }
    }
    END { flush() }
  ' "$@"
}

# Prints the URIs of the deb lines of one-line files ("deb [options] URI suite components"), one a line.
apt_one_line_uris() {
  awk '
    $1 == "deb" {
      line = $0; sub(/^[ \t]*deb[ \t]+/, "", line)
      if (line ~ /^\[/) { sub(/^\[[^]]*\][ \t]*/, "", line) }
      split(line, words, /[ \t]+/); print words[1]
    }
  ' "$@"
}

apt_private_setup() {
  local etc=$WUKONG_APT_ETC sources=$WUKONG_APT_DIR/sources f uri
  local deb822=() one_line=()
  [ -f "$etc/sources.list" ] && one_line+=("$etc/sources.list")
  for f in "$etc"/sources.list.d/*.list; do [ -f "$f" ] && one_line+=("$f"); done
  for f in "$etc"/sources.list.d/*.sources; do [ -f "$f" ] && deb822+=("$f"); done
  # The backports entry uses the machine's own mirror: the first network URI that is not a security archive (which
  # has no backports suite).
  uri=$(
    {
      [ ${#deb822[@]} -eq 0 ] || apt_deb822_uris "${deb822[@]}"
      [ ${#one_line[@]} -eq 0 ] || apt_one_line_uris "${one_line[@]}"
    } | grep -E '^[a-z0-9+]+://' | grep -v security | head -n1 || true # none found is reported below
  )
  if [ -z "$uri" ]; then
    echo "apt: no Debian mirror found in $etc/sources.list, $etc/sources.list.d/*.list or" \
      "$etc/sources.list.d/*.sources; add the machine's mirror there (or point WUKONG_APT_ETC at a directory that has one)" >&2
    return 1
  fi
  apt_mirror_uri=$uri
  apt_foreign_setup
  # Copies from an earlier run go first: a source removed from the machine must not live on here.
  mkdir -p "$sources" "$WUKONG_APT_DIR/lists/partial"
  rm -f "$sources"/*.list "$sources"/*.sources
  for f in "${deb822[@]}" "${one_line[@]}"; do
    # sources.list itself keeps a distinct name: apt reads only *.list and *.sources from the parts directory.
    case "$f" in
      "$etc/sources.list") cp "$f" "$sources/etc-sources.list" ;;
      *) cp "$f" "$sources/" ;;
    esac
  done
  cat > "$sources/backports.sources" <<SRC
Types: deb
URIs: $uri
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
}

# Adds source-package (deb-src) entries for the machine's main mirror (the one backports uses) to the private
# sources, for `apt_private source`. apt_private_setup drops them again; run apt_private update afterwards.
apt_private_add_deb_src() {
  [ -n "${apt_mirror_uri:-}" ] || apt_private_setup || return 1
  cat > "$WUKONG_APT_DIR/sources/deb-src.sources" <<SRC
Types: deb-src
URIs: $apt_mirror_uri
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
}

apt_private() {
  apt-get -o Dir::Etc::sourcelist=- -o Dir::Etc::sourceparts="$WUKONG_APT_DIR/sources" \
    -o Dir::State::Lists="$WUKONG_APT_DIR/lists" "${apt_foreign_opts[@]}" "$@"
}

# Foreign architectures, for downloading only (scripts/lib/rust-aarch64.sh): with WUKONG_APT_ARCHES set (say
# "amd64 arm64") before apt_private_setup, apt_private and apt_cache_private also read those architectures' indexes,
# and keep their package cache in WUKONG_APT_DIR (the machine's pkgcache.bin never holds arm64 entries). The
# machine's dpkg still knows amd64 only: such a configuration downloads (apt-get download) and simulates (-s), it
# never installs. The machine's dpkg status is read, never written.
apt_foreign_opts=()
apt_foreign_setup() {
  apt_foreign_opts=()
  [ -n "${WUKONG_APT_ARCHES:-}" ] || return 0
  mkdir -p "$WUKONG_APT_DIR/cache/archives/partial"
  # apt's _apt user may not reach a checkout's target/: the downloads run as root (as apt-get download does anyway).
  apt_foreign_opts=(-o Dir::Cache="$WUKONG_APT_DIR/cache" -o APT::Sandbox::User=root
    -o "APT::Architectures=$(echo $WUKONG_APT_ARCHES | tr ' ' ',')")
}

# Downloads Debian packages PKG... (names as apt-get download takes them: NAME or NAME:ARCH) with the private
# configuration and unpacks them all into DIR with dpkg-deb -x: nothing is installed. The .deb files are not kept.
apt_private_unpack() {
  local dir=$1 deb debs
  shift
  debs=$(mktemp -d "$WUKONG_APT_DIR/debs.XXXXXX")
  (cd "$debs" && apt_private -qq -o APT::Sandbox::User=root download "$@" >/dev/null)
  mkdir -p "$dir"
  for deb in "$debs"/*.deb; do dpkg-deb -x "$deb" "$dir"; done
  rm -rf "$debs"
}

apt_cache_private() {
  apt-cache -o Dir::Etc::sourcelist=- -o Dir::Etc::sourceparts="$WUKONG_APT_DIR/sources" \
    -o Dir::State::Lists="$WUKONG_APT_DIR/lists" "${apt_foreign_opts[@]}" "$@"
}

apt_private_update() {
  apt_private_setup && apt_private update -qq
}
