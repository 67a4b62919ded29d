#!/usr/bin/env bash
# Proves that a binary runs on every distribution of its architecture with glibc >= 2.17 (issues 16 and 27):
#   * every versioned dynamic symbol it imports, and every version it requires, is at most GLIBC_2.17;
#   * it needs no shared library beyond libudev.so.1, libm.so.6, libc.so.6, libpthread.so.0, libdl.so.2
#     (and the architecture's dynamic loader, ld-linux-x86-64.so.2 or ld-linux-aarch64.so.1, should the linker
#     record it).
# The architecture (x86_64 or aarch64) is read from the ELF header; any other is refused.
#
#   check-glibc.sh BINARY [MAX_VERSION]
#
# Exits 1 naming every offending symbol or library; prints a one-line summary when the binary passes.
set -euo pipefail

bin=${1:?usage: check-glibc.sh BINARY [MAX_VERSION]}
max=${2:-2.17}

[ -f "$bin" ] || { echo "check-glibc: $bin does not exist" >&2; exit 1; }
command -v readelf >/dev/null || { echo "check-glibc: readelf not found; run scripts/lib/install-deps.sh" >&2; exit 1; }
# shellcheck source=elf.sh
. "$(dirname "$0")/elf.sh"
arch=$(elf_arch "$bin")
case $arch in
  x86_64) loader=ld-linux-x86-64.so.2 ;;
  aarch64) loader=ld-linux-aarch64.so.1 ;;
  *) echo "check-glibc: $bin: not an x86_64 or aarch64 ELF binary" >&2; exit 1 ;;
esac
allowed_needed=(libudev.so.1 libm.so.6 libc.so.6 libpthread.so.0 libdl.so.2 "$loader")

# Is version $1 newer than $2? (2.2.5 < 2.17 < 2.34: compared as versions, not as text)
newer() { [ "$1" != "$2" ] && [ "$(printf '%s\n%s\n' "$1" "$2" | sort -V | tail -n1)" = "$1" ]; }

bad=0
highest=0
# Imported symbols: readelf prints NAME@GLIBC_X.Y (a reference) or NAME@@GLIBC_X.Y; a "(N)" index may follow.
while read -r sym ver; do
  newer "$ver" "$highest" && highest=$ver
  if newer "$ver" "$max"; then
    echo "check-glibc: $bin: $sym@GLIBC_$ver is newer than GLIBC_$max" >&2
    bad=1
  fi
done < <(readelf --dyn-syms -W "$bin" | awk '{for (i = 1; i <= NF; i++) if ($i ~ /@@?GLIBC_[0-9.]+$/) print $i}' |
  sed -E 's/@@?GLIBC_/ /' | sort -u)

# Version requirements (.gnu.version_r), in case one is recorded without a symbol that shows it.
while read -r ver; do
  newer "$ver" "$highest" && highest=$ver
  if newer "$ver" "$max"; then
    echo "check-glibc: $bin: requires version GLIBC_$ver, newer than GLIBC_$max" >&2
    bad=1
  fi
done < <(readelf -V -W "$bin" | grep -oE 'Name: GLIBC_[0-9.]+' | sed 's/Name: GLIBC_//' | sort -u)

needed=$(readelf -d -W "$bin" | sed -nE 's/.*\(NEEDED\).*\[(.*)\].*/\1/p')
for lib in $needed; do
  ok=0
  for a in "${allowed_needed[@]}"; do [ "$lib" = "$a" ] && ok=1; done
  if [ "$ok" -eq 0 ]; then
    echo "check-glibc: $bin: needs $lib, which is not in the guest baseline (${allowed_needed[*]})" >&2
    bad=1
  fi
done

if [ "$highest" = 0 ]; then
  echo "check-glibc: $bin: no GLIBC symbol versions found (not a dynamically linked glibc binary?)" >&2
  bad=1
fi
[ "$bad" -eq 0 ] || exit 1
echo "check-glibc: $bin: $arch, highest symbol version GLIBC_$highest (<= GLIBC_$max); needs $(echo "$needed" | tr '\n' ' ')"
