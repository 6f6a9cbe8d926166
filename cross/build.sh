#!/usr/bin/env bash
# Builds the EdgeFleet agent and the firmware examples for the edge targets with this machine's
# own toolchain (rustup targets, Debian's cross gcc and libc, no containers), and runs the
# agent's tests under qemu-user. See cross/README.md.
#
#   cross/build.sh setup [TARGET...]   install what the targets need (apt-get when root, rustup,
#                                      binfmt_misc registration for qemu-user)
#   cross/build.sh build [TARGET...]   release builds of the agent and the examples, stripped
#                                      sizes printed
#   cross/build.sh test TARGET [ARGS]  the agent's tests under qemu-user (ARGS go to cargo test,
#                                      e.g. `serve` or `-- --test-threads 1`)
#   cross/build.sh stage TARGET DIR    copy the release agent, its systemd unit and its config
#                                      into DIR (for a Yocto recipe or a Buildroot package)
#
# TARGET is aarch64-unknown-linux-gnu, armv7-unknown-linux-gnueabihf or
# aarch64-unknown-linux-musl (static); without one, all three.
set -euo pipefail
cd "$(dirname "$0")/.."

all_targets=(aarch64-unknown-linux-gnu armv7-unknown-linux-gnueabihf aarch64-unknown-linux-musl)
# The crates built for a device: the agent and every firmware example with a binary.
device_packages=(-p edgefleet-agent -p edgefleet-vad)

die() { echo "error: $*" >&2; exit 2; }

# The Debian packages and the qemu-user name of a target.
target_info() {
    case "$1" in
        aarch64-unknown-linux-gnu)
            pkgs=(gcc-aarch64-linux-gnu libc6-dev-arm64-cross); qemu=aarch64 ;;
        armv7-unknown-linux-gnueabihf)
            pkgs=(gcc-arm-linux-gnueabihf libc6-dev-armhf-cross); qemu=arm ;;
        aarch64-unknown-linux-musl)
            # Rust ships musl itself (self-contained CRT and libc); gcc links it.
            pkgs=(gcc-aarch64-linux-gnu); qemu=aarch64 ;;
        *) die "unknown target $1 (one of: ${all_targets[*]})" ;;
    esac
}

# Whether the binfmt_misc handler for qemu-$1 is registered and enabled.
binfmt_enabled() {
    [[ -r /proc/sys/fs/binfmt_misc/qemu-$1 ]] && grep -qx enabled "/proc/sys/fs/binfmt_misc/qemu-$1"
}

setup() {
    local targets=("$@") missing=() target
    ((${#targets[@]})) || targets=("${all_targets[@]}")
    for target in "${targets[@]}"; do
        target_info "$target"
        for pkg in "${pkgs[@]}" qemu-user qemu-user-binfmt binfmt-support; do
            dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || missing+=("$pkg")
        done
    done
    if ((${#missing[@]})); then
        mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
        [[ $(id -u) -eq 0 ]] || die "the cross targets need ${missing[*]}; install them (sudo apt-get install ${missing[*]}) or run this as root"
        echo "cross: installing ${missing[*]}"
        # Packages that start services may not start them here (no init system, or a policy).
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" </dev/null >/dev/null
    fi
    local installed
    installed=$(rustup target list --installed)
    for target in "${targets[@]}"; do
        grep -qx "$target" <<<"$installed" || rustup target add "$target"
    done
    # The agent starts its model worker by executing itself; under emulation that exec needs the
    # kernel to hand foreign ELF files to qemu (binfmt_misc; update-binfmts mounts it if needed).
    for target in "${targets[@]}"; do
        target_info "$target"
        binfmt_enabled "$qemu" && continue
        if [[ $(id -u) -eq 0 ]]; then
            update-binfmts --enable "qemu-$qemu" || true
        fi
        binfmt_enabled "$qemu" || echo "warning: binfmt_misc has no enabled qemu-$qemu handler (run 'update-binfmts --enable qemu-$qemu' as root); agents under emulation cannot start their model worker" >&2
    done
    echo "cross: ready for ${targets[*]}"
}

build() {
    local targets=("$@") target bin
    ((${#targets[@]})) || targets=("${all_targets[@]}")
    for target in "${targets[@]}"; do
        target_info "$target"
        echo "==> cargo build --release --target $target ${device_packages[*]}"
        cargo build --release --locked --target "$target" "${device_packages[@]}" --bins
    done
    local out="${CARGO_TARGET_DIR:-target}"
    # The release profile strips (`strip = true`), so these are the sizes a device gets.
    printf '\n%-34s %-16s %12s %8s\n' target binary bytes MiB
    for target in "${targets[@]}"; do
        for bin in edgefleet-agent edgefleet-vad; do
            local path="$out/$target/release/$bin"
            [[ -f $path ]] || continue
            local bytes
            bytes=$(stat -c %s "$path")
            awk -v t="$target" -v b="$bin" -v n="$bytes" 'BEGIN { printf "%-34s %-16s %12d %8.1f\n", t, b, n, n / 1048576 }'
        done
    done
}

run_tests() {
    (($#)) || die "usage: cross/build.sh test TARGET [cargo test arguments]"
    local target=$1
    shift
    target_info "$target"
    binfmt_enabled "$qemu" || die "binfmt_misc has no enabled qemu-$qemu handler; run cross/build.sh setup $target as root"
    echo "==> cargo test --target $target -p edgefleet-agent $* (under qemu-$qemu)"
    time cargo test --locked --target "$target" -p edgefleet-agent "$@"
}

stage() {
    (($# == 2)) || die "usage: cross/build.sh stage TARGET DIR"
    target_info "$1"
    local bin="${CARGO_TARGET_DIR:-target}/$1/release/edgefleet-agent"
    [[ -f $bin ]] || die "$bin does not exist; run cross/build.sh build $1 first"
    mkdir -p "$2"
    install -m 0755 "$bin" "$2/edgefleet-agent"
    install -m 0644 agent/packaging/edgefleet-agent.service agent/packaging/agent.toml "$2/"
    echo "cross: staged edgefleet-agent ($1), edgefleet-agent.service and agent.toml in $2"
}

command=${1:-}
(($#)) && shift
case "$command" in
    setup) setup "$@" ;;
    build) build "$@" ;;
    test) run_tests "$@" ;;
    stage) stage "$@" ;;
    *) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
esac
