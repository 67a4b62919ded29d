# Shared by check-glibc.sh and package-agent.sh. Source this file; it defines elf_arch.

# Prints the architecture ELF file FILE is for, from its header: x86_64, aarch64, or "unknown" (any other machine,
# or not an ELF file). Needs readelf (binutils).
elf_arch() {
  case $(readelf -h -W "$1" 2>/dev/null | sed -nE 's/^ *Machine: *//p' || true) in
    *X86-64*) echo x86_64 ;;
    *AArch64*) echo aarch64 ;;
    *) echo unknown ;;
  esac
}
