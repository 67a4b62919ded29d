# Shared by the lab's image builders: the Debian cloud kernel, and loadable modules with their dependencies.
# Source this file; it sources ../lib/apt.sh.
lab_here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=../lib/apt.sh
. "$lab_here/../lib/apt.sh"

# Downloads and unpacks the current Debian cloud kernel once into CACHE/kernel; sets kdir, kver and moddir.
fetch_kernel() {
  local cache=$1 pkg
  kdir=$cache/kernel
  if [ ! -f "$kdir/.complete" ]; then
    rm -rf "$kdir"
    mkdir -p "$kdir"
    apt_private_update
    pkg=$(apt_cache_private depends linux-image-cloud-amd64 | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
    [ -n "$pkg" ] || { echo "lab: cannot resolve the Debian cloud kernel package" >&2; exit 1; }
    echo "lab: downloading $pkg"
    (cd "$cache" && apt_private -o APT::Sandbox::User=root download "$pkg" >/dev/null)
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
