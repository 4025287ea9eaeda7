#!/usr/bin/env bash
# Makes the base image deploy/Dockerfile starts FROM (ringtrain-base:bookworm)
# without any registry: debootstrap a minimal Debian bookworm from Debian's
# package mirror and `docker import` it. Skipped when the tag already exists
# (FORCE=1 rebuilds it).
#
#   deploy/base-image.sh            # cached: a no-op once the image exists
#   FORCE=1 MIRROR=http://... deploy/base-image.sh
#
# Where a registry is reachable, `docker build --build-arg
# BASE=debian:bookworm-slim deploy` needs none of this.
#
# The binary's system libraries (libc6, libstdc++6, libgcc-s1) come from this
# image, so it must be the Debian release the binary was built on (bookworm).
set -euo pipefail

TAG=${BASE_IMAGE:-ringtrain-base:bookworm}
SUITE=${SUITE:-bookworm}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
# passwd: useradd for the Dockerfile's non-root user. Everything else
# (libstdc++6 and the rest of the closure) is already in minbase through apt.
INCLUDE=${INCLUDE:-passwd}

log() { echo "base-image: $*" >&2; }

if [ "${FORCE:-0}" != 1 ] && docker image inspect "$TAG" >/dev/null 2>&1; then
  log "$TAG exists (FORCE=1 to rebuild)"
  exit 0
fi

sudo=""
[ "$(id -u)" = 0 ] || sudo="sudo"
if ! command -v debootstrap >/dev/null 2>&1 && [ ! -x /usr/sbin/debootstrap ]; then
  log "installing debootstrap (apt-get)"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq debootstrap >/dev/null
fi
DEBOOTSTRAP=$(command -v debootstrap || echo /usr/sbin/debootstrap)

rootfs=$(mktemp -d "${TMPDIR:-/tmp}/ringtrain-base.XXXXXX")
cleanup() { $sudo rm -rf --one-file-system "$rootfs" "$rootfs.log"; }
trap cleanup EXIT

start=$SECONDS
log "debootstrap --variant=minbase $SUITE from $MIRROR (a few minutes)"
if ! $sudo "$DEBOOTSTRAP" --variant=minbase --include="$INCLUDE" \
  "$SUITE" "$rootfs" "$MIRROR" >"$rootfs.log" 2>&1; then
  tail -20 "$rootfs.log" >&2
  [ -f "$rootfs/debootstrap/debootstrap.log" ] && tail -20 "$rootfs/debootstrap/debootstrap.log" >&2
  log "debootstrap failed"
  exit 1
fi

# Trim what a container never reads: docs, man pages, locales, apt's caches
# and package lists (derived images run apt-get update first anyway).
$sudo rm -rf \
  "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* \
  "$rootfs"/usr/share/locale/* "$rootfs"/usr/share/lintian "$rootfs"/usr/share/linda \
  "$rootfs"/var/cache/apt/* "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/log/* \
  "$rootfs"/tmp/* "$rootfs"/var/tmp/*
# Keep dpkg from bringing them back in derived images.
$sudo tee "$rootfs/etc/dpkg/dpkg.cfg.d/01-nodoc" >/dev/null <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
EOF
$sudo tee "$rootfs/etc/apt/apt.conf.d/01-container" >/dev/null <<'EOF'
APT::Install-Recommends "false";
APT::Install-Suggests "false";
EOF
# The host's name resolution has no business in the image.
$sudo rm -f "$rootfs/etc/hostname" "$rootfs/etc/resolv.conf"

log "docker import as $TAG"
$sudo tar -C "$rootfs" --numeric-owner -c . |
  docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["/bin/bash"]' \
    --message "debootstrap --variant=minbase $SUITE $MIRROR" \
    - "$TAG" >/dev/null
log "$TAG ready in $((SECONDS - start))s ($(docker image inspect -f '{{.Size}}' "$TAG" | awk '{printf "%.0f MB", $1/1e6}'))"
