# Shared by the lab's image builders: the guest's architecture and its Debian packages, the Debian kernel, and
# loadable modules with their dependencies. Source this file; it sources ../lib/apt.sh.
lab_here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=../lib/apt.sh
. "$lab_here/../lib/apt.sh"

# The guest's architecture, as lab_set_arch sets it: x86_64 (the host's; the default) or aarch64.
lab_arch=x86_64
lab_deb_arch=amd64
lab_kernel_meta=linux-image-cloud-amd64

# Sets the guest's architecture ARCH (x86_64 or aarch64); CACHE is where a foreign architecture's apt state lives.
# An aarch64 guest is built from Debian's arm64 packages, fetched with the project's private apt configuration
# (../lib/apt.sh) for that architecture (WUKONG_APT_ARCHES), its lists and package cache under CACHE/apt: neither
# /etc/apt nor the machine's apt state is touched.
lab_set_arch() {
  local arch=$1 cache=$2
  case $arch in
    x86_64) lab_deb_arch=amd64 lab_kernel_meta=linux-image-cloud-amd64 ;;
    aarch64)
      lab_deb_arch=arm64 lab_kernel_meta=linux-image-arm64:arm64
      mkdir -p "$cache"
      WUKONG_APT_DIR=$(cd "$cache" && pwd)/apt
      export WUKONG_APT_DIR WUKONG_APT_ARCHES=arm64
      ;;
    *) echo "lab: unknown guest architecture $arch (x86_64 or aarch64)" >&2; exit 1 ;;
  esac
  lab_arch=$arch
}

# Downloads and unpacks Debian packages NAME... of the guest's architecture into DIR/root (once: DIR/.complete).
fetch_packages() {
  local dir=$1
  shift
  [ -f "$dir/.complete" ] && [ "$(cat "$dir/.complete")" = "$*" ] && return 0
  rm -rf "$dir"
  apt_private_update
  echo "lab: downloading $* ($lab_deb_arch)"
  apt_private_unpack "$dir/root" "${@/%/:$lab_deb_arch}"
  echo "$*" > "$dir/.complete"
}

# Downloads and unpacks the current Debian kernel of the guest's architecture (the cloud kernel for x86_64,
# linux-image-arm64 for aarch64) once into CACHE/kernel; sets kdir, kver and moddir.
fetch_kernel() {
  local cache=$1 pkg
  kdir=$cache/kernel
  if [ ! -f "$kdir/.complete" ]; then
    rm -rf "$kdir"
    mkdir -p "$kdir"
    apt_private_update
    pkg=$(apt_cache_private depends "$lab_kernel_meta" | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
    [ -n "$pkg" ] || { echo "lab: cannot resolve the Debian kernel package ($lab_kernel_meta)" >&2; exit 1; }
    echo "lab: downloading $pkg"
    (cd "$cache" && apt_private -o APT::Sandbox::User=root download "$pkg" >/dev/null)
    # A foreign architecture's name is qualified (linux-image-...-arm64:arm64); its file's is not.
    pkg=${pkg%%:*}
    dpkg-deb -x "$cache/${pkg}"_*.deb "$kdir"
    # The package leaves modules.dep to its postinst; generate it in the extracted tree.
    depmod -b "$kdir" "$(ls "$kdir/lib/modules" | head -n1)"
    rm -f "$cache/${pkg}"_*.deb
    touch "$kdir/.complete"
  fi
  kver=$(ls "$kdir/lib/modules" | head -n1)
  moddir=$kdir/lib/modules/$kver
}

# Prints where loadable module NAME is (its path in modules.dep), nothing when the kernel has no such loadable module.
# Needs fetch_kernel first.
module_path() {
  awk -F: -v n="$1" '{ f=$1; sub(/.*\//, "", f); sub(/\.ko(\.[a-z]+)?$/, "", f); gsub(/-/, "_", f); if (f == n) { print $1; exit } }' "$moddir/modules.dep"
}

# Whether the kernel has module NAME, loadable or built in. Needs fetch_kernel first.
has_module() {
  [ -n "$(module_path "$1")" ] || grep -qE "/${1//_/[_-]}\.ko" "$moddir/modules.builtin"
}

# Copies modules NAME... and everything they depend on (from modules.dep) into ROOT/lib/modules, uncompressed,
# and lists them in load order in ROOT/etc/modules-order. Built-in modules are skipped. Needs fetch_kernel first.
copy_modules() {
  local root=$1 m path base
  shift
  local -a order=()
  local -A seen=()
  resolve() {
    local name=$1 path dep
    path=$(module_path "$name")
    if [ -z "$path" ]; then
      has_module "$name" && return 0
      echo "lab: kernel module $name not found for $kver" >&2
      exit 1
    fi
    [ -n "${seen[$path]:-}" ] && return 0
    seen[$path]=1
    for dep in $(awk -F: -v p="$path" '$1 == p { print $2; exit }' "$moddir/modules.dep"); do
      dep=${dep##*/}; dep=${dep%%.ko*}; dep=${dep//-/_}
      resolve "$dep"
    done
    order+=("$path")
  }
  for m in "$@"; do resolve "$m"; done
  mkdir -p "$root/lib/modules" "$root/etc"
  : > "$root/etc/modules-order"
  for path in "${order[@]}"; do
    base=${path##*/}
    case $base in
      *.ko.xz) xz -dc "$moddir/$path" > "$root/lib/modules/${base%.xz}"; base=${base%.xz} ;;
      *.ko.zst) zstd -qdc "$moddir/$path" > "$root/lib/modules/${base%.zst}"; base=${base%.zst} ;;
      *) cp "$moddir/$path" "$root/lib/modules/$base" ;;
    esac
    echo "$base" >> "$root/etc/modules-order"
  done
}
