#!/usr/bin/env bash
# Fills deploy/stage/ (git-ignored), the part of deploy/Dockerfile's build
# context that is not in git:
#   stage/bin/ringtrain   the release binary (debug info stripped; STRIP=0 keeps it)
#   stage/lib/*.so*       the libraries ldd resolves outside the system library
#                         directories: libtorch_cpu, libc10, libgomp from the
#                         .venv's torch/lib, libcudart/libcupti from its nvidia/
#                         dirs. Only what ldd lists; the system ones (libc,
#                         libstdc++, libgcc_s, libm) come from the base image.
# The binary's rpath holds $ORIGIN/../lib, so /opt/ringtrain/bin/ringtrain finds
# /opt/ringtrain/lib without LD_LIBRARY_PATH.
#
# Files whose content did not change are left alone, so Docker's layer cache
# holds. Run after `cargo build --release` (BINARY=path overrides the binary).
set -euo pipefail
DEPLOY=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$DEPLOY")
BINARY=${BINARY:-$ROOT/target/release/ringtrain}
STAGE=$DEPLOY/stage
STRIP=${STRIP:-1}

log() { echo "stage: $*" >&2; }

[ -x "$BINARY" ] || {
  log "no $BINARY: run cargo build --release first"
  exit 1
}
command -v ldd >/dev/null || {
  log "ldd not found"
  exit 1
}
if [ "$STRIP" = 1 ] && ! command -v strip >/dev/null; then
  log "strip not found (binutils): copying unstripped"
  STRIP=0
fi

tmp=$(mktemp -d "${TMPDIR:-/tmp}/ringtrain-stage.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$STAGE/bin" "$STAGE/lib"

# put SRC NAME DIR [strip flag]: copy (dereferencing links) and strip into a
# temporary file, then move it into place only when its content differs.
put() {
  local src=$1 dest=$2/$3 flag=${4:-} t=$tmp/$3
  if [ "$STRIP" = 1 ] && [ -n "$flag" ]; then
    strip "$flag" -o "$t" "$src"
  else
    cp -L "$src" "$t"
  fi
  chmod 0755 "$t"
  if cmp -s "$t" "$dest"; then
    rm -f "$t"
  else
    mv -f "$t" "$dest"
    changed=$((changed + 1))
  fi
}

changed=0
# strip-debug keeps the symbol table: panics still name their functions.
put "$BINARY" "$STAGE/bin" ringtrain --strip-debug

# ldd lines: "libfoo.so.1 => /path/libfoo.so.1 (0x...)". A missing library
# ("=> not found") is an error: the image would not start.
if ldd "$BINARY" | grep -q "not found"; then
  ldd "$BINARY" | grep "not found" >&2
  log "unresolved libraries"
  exit 1
fi
wanted=()
while read -r name path; do
  case $path in
    /lib/* | /lib64/* | /usr/lib/* | /usr/lib64/*) continue ;; # from the base image
  esac
  put "$path" "$STAGE/lib" "$name" --strip-unneeded
  wanted+=("$name")
done < <(ldd "$BINARY" | awk '$2 == "=>" && $3 ~ /^\// { print $1, $3 }')

# Drop libraries a previous binary needed and this one does not.
for f in "$STAGE"/lib/*; do
  [ -e "$f" ] || continue
  n=$(basename "$f")
  [[ " ${wanted[*]} " == *" $n "* ]] || {
    rm -f "$f"
    changed=$((changed + 1))
  }
done

log "$STAGE: $(du -sh "$STAGE" | cut -f1) (binary + ${#wanted[@]} libraries: ${wanted[*]}); $changed file(s) changed"
