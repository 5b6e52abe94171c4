#!/usr/bin/env bash
# Makes rootful Podman usable on this machine for tests/deploy/, and the local images the
# tests build on (no container registry is reachable from CI):
#   - Podman, runc and mmdebstrap from Debian's packages. runc, not Debian's default
#     crun: crun refuses this machine's hybrid (v1 + v2) cgroup hierarchy.
#   - containers.conf and storage.conf of our own (the machine's stay untouched):
#     default ulimits at the hard nofile limit and at most kernel.pid_max processes
#     (Podman's defaults are above both here and every container would fail to
#     start), image store under $SV2TPD_CACHE.
#   - Debian $DEBIAN_SUITE root file systems made with mmdebstrap from Debian's
#     packages, imported and tagged as the Dockerfile's FROM names:
#       debian:bookworm-slim   the runtime stage (minbase),
#       rust:1-bookworm        the builder stage: gcc and this machine's Rust toolchain
#                              (the one CI builds with) in /usr/local/cargo,
#     and $SYSTEMD_IMAGE: Debian with systemd as init, for the package test.
# Each image is made once and kept; delete it (podman rmi) or the cache to remake it.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

install_packages() {
    local missing=() package
    for package in podman runc mmdebstrap uidmap; do
        dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package")
    done
    ((${#missing[@]} == 0)) && return
    say "installing ${missing[*]}"
    local sudo=()
    ((EUID == 0)) || sudo=(sudo)
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

write_config() {
    mkdir -p "$PODMAN_DIR/storage" "$PODMAN_DIR/tmp" "$PODMAN_DIR/rootfs"
    local nofile nproc
    nofile=$(ulimit -Hn)
    # Measured here: a container's nproc above kernel.pid_max (32768) is refused with
    # EPERM even below the hard limit (96367), so take the smaller of the two.
    nproc=$(ulimit -Hu)
    local pid_max
    pid_max=$(cat /proc/sys/kernel/pid_max)
    if [ "$nproc" = unlimited ] || ((nproc > pid_max)); then nproc=$pid_max; fi
    [ "$nofile" = unlimited ] && nofile=1048576
    cat >"$PODMAN_DIR/containers.conf" <<CONF
# Written by tests/deploy/podman-setup.sh.
[containers]
default_ulimits = ["nofile=$nofile:$nofile", "nproc=$nproc:$nproc"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
CONF
    cat >"$PODMAN_DIR/storage.conf" <<CONF
# Written by tests/deploy/podman-setup.sh.
[storage]
driver = "overlay"
graphroot = "$PODMAN_DIR/storage"
runroot = "/run/sv2-tpd-ci/containers"
CONF
}

# rootfs_image NAME MMDEBSTRAP_ARGS... [-- IMPORT_CHANGES...]: makes image NAME from a
# Debian root file system. The image is labelled with a hash of its recipe (the
# arguments and $IMAGE_INPUTS, which names what the hooks copy in) and remade when the
# recipe changes.
rootfs_image() {
    local name="$1"
    shift
    local changes=() args=()
    while (($#)); do
        if [ "$1" = -- ]; then
            shift
            changes=("$@")
            break
        fi
        args+=("$1")
        shift
    done
    local recipe
    recipe=$(printf '%s\n' "$DEBIAN_SUITE" "${args[@]}" "${changes[@]}" "${IMAGE_INPUTS:-}" |
        sha256sum | cut -c1-16)
    if [ "$(pm image inspect -f '{{index .Labels "sv2-tpd-ci.recipe"}}' "$name" 2>/dev/null)" = "$recipe" ]; then
        return
    fi
    local tarball="$PODMAN_DIR/rootfs/${name//[\/:]/_}.tar"
    say "making $name with mmdebstrap ${args[*]}"
    mmdebstrap --quiet --mode=root "${args[@]}" "$DEBIAN_SUITE" "$tarball" \
        "deb http://deb.debian.org/debian $DEBIAN_SUITE main" \
        "deb http://deb.debian.org/debian $DEBIAN_SUITE-updates main" \
        "deb http://deb.debian.org/debian-security $DEBIAN_SUITE-security main"
    local change_args=(--change "LABEL sv2-tpd-ci.recipe=$recipe")
    for change in "${changes[@]}"; do change_args+=(--change "$change"); done
    pm import "${change_args[@]}" "$tarball" "$name" >/dev/null
    rm -f "$tarball"
}

# The toolchain cargo runs with here (rustup's active one).
rust_toolchain() {
    local rustc
    rustc=$(rustup which rustc 2>/dev/null || command -v rustc)
    dirname "$(dirname "$rustc")"
}

install_packages
write_config

rootfs_image docker.io/library/debian:bookworm-slim --variant=minbase \
    -- 'CMD ["bash"]'

toolchain=$(rust_toolchain)
say "builder toolchain: $toolchain ($(rustc --version))"
# The builder fetches crates as this machine does: through its TLS trust store, which
# may hold local CAs (/usr/local/share/ca-certificates) that Debian's lacks.
local_cas=(/usr/local/share/ca-certificates/*.crt)
[ -e "${local_cas[0]}" ] || local_cas=()
IMAGE_INPUTS="$(rustc --version) $(cat "${local_cas[@]}" /dev/null | sha256sum)" \
    rootfs_image docker.io/library/rust:1-bookworm --variant=minbase \
    --include=gcc,libc6-dev,ca-certificates,pkg-config \
    --customize-hook="mkdir -p \"\$1/usr/local/cargo\" && for d in bin lib libexec etc; do [ ! -d '$toolchain'/\$d ] || cp -a '$toolchain'/\$d \"\$1/usr/local/cargo/\"; done" \
    --customize-hook="for ca in ${local_cas[*]}; do cp \"\$ca\" \"\$1/usr/local/share/ca-certificates/\"; done; chroot \"\$1\" update-ca-certificates >/dev/null" \
    -- 'ENV PATH=/usr/local/cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    'ENV CARGO_HOME=/usr/local/cargo' 'CMD ["bash"]'

rootfs_image "$SYSTEMD_IMAGE" --variant=minbase --include=systemd,systemd-sysv,dbus,procps \
    --customize-hook='systemctl --root="$1" mask systemd-logind.service getty.target console-getty.service systemd-networkd-wait-online.service' \
    -- 'CMD ["/sbin/init"]' 'STOPSIGNAL SIGRTMIN+3'

say "images: $(pm images --format '{{.Repository}}:{{.Tag}}' | tr '\n' ' ')"
