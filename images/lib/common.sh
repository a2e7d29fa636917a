# shellcheck shell=bash
# Shared helpers for images/build, images/selftest and tests/nested/run.
# Source it; it defines functions only (and a few variables), runs nothing.
#
# Everything is fetched from Debian's package archive with apt-get download and
# unpacked with dpkg-deb -x; nothing is downloaded from anywhere else.

SPLITVISOR_CACHE="${SPLITVISOR_CACHE:-$HOME/.cache/splitvisor}"
DEB_CACHE="$SPLITVISOR_CACHE/debs"          # downloaded .deb files
UNPACK_CACHE="$SPLITVISOR_CACHE/unpacked"   # one dpkg -x tree per .deb
DEB_ARCH="${DEB_ARCH:-amd64}"
MULTIARCH="x86_64-linux-gnu"

# ---- messages -------------------------------------------------------------
_sv_prog="$(basename "$0")"
log()  { printf '[%s] %s\n' "$_sv_prog" "$*"; }
warn() { printf '[%s] warning: %s\n' "$_sv_prog" "$*" >&2; }
die()  { printf '[%s] error: %s\n' "$_sv_prog" "$*" >&2; exit 1; }

# need_tool COMMAND PACKAGE: fail with the apt package to install if missing.
need_tool() {
  command -v "$1" >/dev/null 2>&1 ||
    die "'$1' not found: install it with 'apt-get install $2'"
}

# ---- Debian packages ------------------------------------------------------
# apt_ready: make sure apt's package lists are there (apt-cache needs them).
apt_ready() {
  if apt-cache show --no-all-versions busybox-static >/dev/null 2>&1; then
    return 0
  fi
  if [ "$(id -u)" = 0 ]; then
    log "apt package lists are empty: running apt-get update"
    apt-get update -q >/dev/null
  else
    die "apt's package lists are empty: run 'sudo apt-get update' first"
  fi
}

# kernel_abi_package META: "linux-image-amd64" -> "linux-image-6.1.0-56-amd64",
# the package the metapackage depends on for the current ABI.
kernel_abi_package() {
  local meta="$1" dep
  dep="$(apt-cache depends "$meta" 2>/dev/null |
    awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9]/ { print $2; exit }')"
  [ -n "$dep" ] || die "cannot resolve the kernel ABI from '$meta' (apt-cache depends $meta)"
  printf '%s\n' "$dep"
}

# fetch_debs PKG...: print the paths of the cached .debs of the candidate
# versions of PKG..., one per line in the same order, downloading (apt-get
# download) those not in the cache yet. One apt-cache call for all of them:
# each apt-cache run costs ~0.6 s, so looking up packages one by one is slow.
fetch_debs() {
  local -A file=()
  local pkg ver arch missing=() f
  while read -r pkg ver arch; do
    # apt-get download names files PKG_VERSION_ARCH.deb with ':' as '%3a'.
    file[$pkg]="$DEB_CACHE/${pkg}_${ver//:/%3a}_${arch}.deb"
  done < <(apt-cache show --no-all-versions "$@" 2>/dev/null | awk '
      $1 == "Package:" { p = $2 } $1 == "Version:" { v = $2 }
      $1 == "Architecture:" { a = $2 }
      /^$/ && p != "" { print p, v, a; p = "" }
      END { if (p != "") print p, v, a }')
  for pkg in "$@"; do
    [ -n "${file[$pkg]:-}" ] || die "package '$pkg' is unknown to apt (apt-get update?)"
    [ -s "${file[$pkg]}" ] || missing+=("$pkg")
  done
  if [ "${#missing[@]}" -gt 0 ]; then
    mkdir -p "$DEB_CACHE"
    log "downloading ${missing[*]}" >&2
    local sandbox=()
    # As root apt drops to the _apt user, who cannot write into $HOME.
    if [ "$(id -u)" = 0 ]; then sandbox=(-o APT::Sandbox::User=root); fi
    (cd "$DEB_CACHE" && apt-get download -q "${sandbox[@]}" "${missing[@]}" >/dev/null) ||
      die "apt-get download ${missing[*]} failed"
  fi
  for pkg in "$@"; do
    f="${file[$pkg]}"
    [ -s "$f" ] || die "apt-get download $pkg did not produce $f"
    printf '%s\n' "$f"
  done
}

# fetch_deb PKG: fetch_debs for one package.
fetch_deb() { fetch_debs "$1"; }

# unpack_deb DEB [DIR]: dpkg -x DEB once into DIR (default: the unpack cache)
# and print DIR. A stamp file records which .deb the tree came from.
unpack_deb() {
  local deb="$1" dir="${2:-$UNPACK_CACHE/$(basename "$1" .deb)}"
  if [ ! -f "$dir/.splitvisor-unpacked" ] ||
     [ "$(cat "$dir/.splitvisor-unpacked")" != "$(basename "$deb")" ]; then
    rm -rf "$dir"
    mkdir -p "$dir"
    log "unpacking $(basename "$deb")" >&2
    dpkg-deb -x "$deb" "$dir"
    basename "$deb" >"$dir/.splitvisor-unpacked"
  fi
  printf '%s\n' "$dir"
}

# lib_package_closure PKG...: PKG and, transitively, the library packages
# (lib*) it Depends/Pre-Depends on. Used to find the shared libraries of a
# dynamically linked Debian binary without looking at the host. One
# apt-cache call per level of the dependency tree.
lib_package_closure() {
  local -A seen=()
  local level=("$@") next p d
  while [ "${#level[@]}" -gt 0 ]; do
    for p in "${level[@]}"; do seen[$p]=1; printf '%s\n' "$p"; done
    next=()
    for d in $(apt-cache depends --important "${level[@]}" 2>/dev/null |
               awk '($1 == "Depends:" || $1 == "PreDepends:") && $2 !~ /^</ { print $2 }' |
               sort -u); do
      case "$d" in
        lib*) if [ -z "${seen[$d]:-}" ]; then seen[$d]=1; next+=("$d"); fi ;;
      esac
    done
    level=("${next[@]}")
  done
  return 0
}

# ---- ELF binaries and their shared libraries ------------------------------
# install_elf_from_roots BIN DEST ROOT...: copy the shared libraries BIN needs
# (its DT_NEEDED, recursively) from the unpacked package trees ROOT... into
# DEST/lib/x86_64-linux-gnu, and the dynamic loader to DEST/lib64. BIN itself
# is not copied. Uses readelf, so it never looks at the host's libraries.
install_elf_from_roots() {
  local bin="$1" dest="$2"; shift 2
  local roots=("$@") todo=("$bin") f so found r d
  local -A done_so=()
  mkdir -p "$dest/lib/$MULTIARCH" "$dest/lib64"
  while [ "${#todo[@]}" -gt 0 ]; do
    f="${todo[0]}"; todo=("${todo[@]:1}")
    # The program interpreter (dynamic loader), if any.
    local interp
    interp="$(readelf -l "$f" 2>/dev/null | sed -n 's/.*Requesting program interpreter: \(.*\)]/\1/p')"
    if [ -n "$interp" ] && [ ! -e "$dest$interp" ]; then
      found=""
      for r in "${roots[@]}"; do
        for d in "$r$interp" "$r/lib/$MULTIARCH/$(basename "$interp")"; do
          [ -e "$d" ] && { found="$d"; break 2; }
        done
      done
      [ -n "$found" ] || die "dynamic loader $interp of $f not found in the unpacked packages"
      mkdir -p "$dest$(dirname "$interp")"
      cp -L "$found" "$dest$interp"
    fi
    for so in $(readelf -d "$f" 2>/dev/null | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p'); do
      [ -n "${done_so[$so]:-}" ] && continue
      done_so[$so]=1
      found=""
      for r in "${roots[@]}"; do
        for d in "$r/lib/$MULTIARCH" "$r/usr/lib/$MULTIARCH" "$r/lib64" "$r/usr/lib"; do
          [ -e "$d/$so" ] && { found="$d/$so"; break 2; }
        done
      done
      [ -n "$found" ] || die "$so (needed by $(basename "$f")) is in none of the unpacked packages"
      cp -L "$found" "$dest/lib/$MULTIARCH/$so"
      todo+=("$dest/lib/$MULTIARCH/$so")
    done
  done
  return 0
}

# install_host_elf BIN DEST [NAME]: copy a binary built on this machine
# (vmm, memnode) to DEST/bin/NAME with the shared libraries ldd resolves on
# this host, and the dynamic loader at its own absolute path.
install_host_elf() {
  local bin="$1" dest="$2" name="${3:-$(basename "$1")}" lib
  mkdir -p "$dest/bin"
  cp -L "$bin" "$dest/bin/$name"
  # ldd lines: "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" and
  # "/lib64/ld-linux-x86-64.so.2 (0x...)"; linux-vdso has no file.
  for lib in $(ldd "$bin" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }'); do
    mkdir -p "$dest$(dirname "$lib")"
    [ -e "$dest$lib" ] || cp -L "$lib" "$dest$lib"
  done
  return 0
}

# ---- kernel modules -------------------------------------------------------
# resolve_modules MODDIR MODULE...: print, one per line and in load order
# (dependencies first), the .ko files needed for MODULE... from the unpacked
# modules tree MODDIR (= .../lib/modules/ABI). Dependencies come from
# `modinfo -F depends`; soft pre-dependencies (`modinfo -F softdep`, e.g.
# ext4's "pre: crypto-crc32c") are followed when they name a module we can
# find (crypto-X -> X or X_generic). Built-in modules (modules.builtin) are
# skipped. Compressed modules (.ko.xz/.ko.zst/.ko.gz) are printed as they are:
# install_modules decompresses them.
resolve_modules() {
  local moddir="$1"; shift
  local -A path=() state=()
  local f n
  while IFS= read -r f; do
    n="${f##*/}"; n="${n%%.ko*}"; n="${n//-/_}"
    path[$n]="$f"
  done < <(find "$moddir/kernel" -name '*.ko*' -type f)
  local -A builtin=()
  if [ -f "$moddir/modules.builtin" ]; then
    while IFS= read -r f; do
      n="${f##*/}"; n="${n%%.ko*}"; builtin[${n//-/_}]=1
    done <"$moddir/modules.builtin"
  fi

  _mod_info() { # FILE FIELD: modinfo on a possibly compressed module
    case "$1" in
      *.xz)  xz -dc "$1" >"$_mod_tmp" ;;
      *.zst) zstd -qdc "$1" >"$_mod_tmp" ;;
      *.gz)  gzip -dc "$1" >"$_mod_tmp" ;;
      *)     cp "$1" "$_mod_tmp" ;;
    esac
    modinfo -F "$2" "$_mod_tmp" || die "modinfo -F $2 $1 failed"
  }
  _mod_visit() {
    local m="${1//-/_}" dep d
    case "${state[$m]:-}" in done|builtin) return 0 ;; active) die "module dependency cycle at $m" ;; esac
    if [ -z "${path[$m]:-}" ]; then
      if [ -n "${builtin[$m]:-}" ]; then state[$m]=builtin; return 0; fi
      die "module $m not found in $moddir (and not built in)"
    fi
    state[$m]=active
    for dep in $(_mod_info "${path[$m]}" depends | tr ',' ' '); do
      _mod_visit "$dep"
    done
    # softdep: "pre: a b post: c" -- follow the "pre:" names we can resolve.
    local in_pre=0
    for d in $(_mod_info "${path[$m]}" softdep); do
      case "$d" in
        pre:) in_pre=1 ;;
        post:) in_pre=0 ;;
        *)
          [ "$in_pre" = 1 ] || continue
          d="${d#crypto-}"; d="${d//-/_}"
          if [ -n "${path[$d]:-}" ]; then _mod_visit "$d"
          elif [ -n "${path[${d}_generic]:-}" ]; then _mod_visit "${d}_generic"
          fi ;;
      esac
    done
    state[$m]="done"
    printf '%s\n' "${path[$m]}"
  }
  local _mod_tmp
  _mod_tmp="$(mktemp --suffix=.ko)"  # modinfo wants a .ko name
  for n in "$@"; do _mod_visit "$n"; done
  rm -f "$_mod_tmp"
}

# install_modules MODDIR DEST ABI MODULE...: copy the modules MODULE... need,
# decompressed to plain .ko (busybox insmod loads only uncompressed modules),
# into DEST/lib/modules/ABI/NAME.ko, and write DEST/lib/modules/ABI/load-order
# listing the module names in the order init must insmod them.
install_modules() {
  local moddir="$1" dest="$2" abi="$3"; shift 3
  local out="$dest/lib/modules/$abi" f n list
  mkdir -p "$out"
  : >"$out/load-order"
  list="$(resolve_modules "$moddir" "$@")"
  for f in $list; do
    n="$(basename "$f")"; n="${n%%.ko*}"
    case "$f" in
      *.xz)  xz -dc "$f" >"$out/$n.ko" ;;
      *.zst) zstd -qdc "$f" >"$out/$n.ko" ;;
      *.gz)  gzip -dc "$f" >"$out/$n.ko" ;;
      *)     cp "$f" "$out/$n.ko" ;;
    esac
    printf '%s\n' "$n" >>"$out/load-order"
  done
  log "modules for $abi, in load order: $(tr '\n' ' ' <"$out/load-order")"
}

# ---- busybox and the cpio archive -----------------------------------------
# install_busybox BUSYBOX DEST: the static busybox at DEST/bin/busybox and a
# symlink for each of its applets (bin/sh, sbin/insmod, ...).
install_busybox() {
  local bb="$1" dest="$2" a
  mkdir -p "$dest/bin" "$dest/sbin" "$dest/usr/bin" "$dest/usr/sbin"
  cp "$bb" "$dest/bin/busybox"
  for a in $("$bb" --list-full); do
    [ "$a" = bin/busybox ] && continue
    [ -e "$dest/$a" ] || [ -L "$dest/$a" ] || ln -s /bin/busybox "$dest/$a"
  done
  return 0
}

# make_cpio DIR OUT: DIR as a gzip-compressed newc cpio archive (an initramfs),
# all files owned by root.
make_cpio() {
  local dir="$1" out="$2"
  (cd "$dir" && find . -mindepth 1 -print0 | LC_ALL=C sort -z |
    cpio --null -o -H newc -R 0:0 --quiet) | gzip -6 -n >"$out.tmp"
  mv "$out.tmp" "$out"
}

# add_console_node DIR: /dev/console in the archive (needs root for mknod; the
# kernel's built-in initramfs has one anyway, so it is optional).
add_console_node() {
  mkdir -p "$1/dev"
  if [ "$(id -u)" = 0 ] && [ ! -e "$1/dev/console" ]; then
    mknod -m 600 "$1/dev/console" c 5 1
  fi
}
