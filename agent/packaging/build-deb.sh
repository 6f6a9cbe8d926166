#!/usr/bin/env bash
# Builds the Debian package of the EdgeFleet agent with dpkg-deb: the binary, the systemd unit
# and the documented default configuration (a conffile), beside this script.
#
#   agent/packaging/build-deb.sh [--target TRIPLE] [--binary PATH] [--out DIR] [--compress xz|gzip|none]
#
# Without --binary it builds the release agent for --target (default: this machine's) first.
# The package's architecture comes from the binary's ELF header (amd64, arm64, armhf), its
# dependencies from the shared libraries the binary needs (none for the static musl build).
# Prints the path of the .deb it wrote.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)

target="" binary="" out="$repo/target/debian" compress=xz
while (($#)); do
    case "$1" in
        --target) target=$2; shift 2 ;;
        --binary) binary=$2; shift 2 ;;
        --out) out=$2; shift 2 ;;
        --compress) compress=$2; shift 2 ;;
        *) sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
    esac
done
case "$compress" in xz|gzip|none) ;; *) echo "error: --compress must be xz, gzip or none" >&2; exit 2 ;; esac
for tool in dpkg-deb readelf; do
    command -v "$tool" >/dev/null || { echo "error: $tool not found (apt-get install dpkg binutils)" >&2; exit 2; }
done

if [[ -z $binary ]]; then
    (cd "$repo" && cargo build --release --locked -p edgefleet-agent --bin edgefleet-agent ${target:+--target "$target"})
    binary="${CARGO_TARGET_DIR:-$repo/target}/${target:+$target/}release/edgefleet-agent"
fi
[[ -f $binary ]] || { echo "error: $binary does not exist; build the agent first" >&2; exit 2; }

# ELF e_machine (bytes 18-19, little-endian) -> Debian architecture and the strip that reads it.
machine=$(od -An -tx1 -j18 -N2 "$binary" | tr -d ' \n')
case "$machine" in
    3e00) arch=amd64; strip_tool="strip" ;;
    b700) arch=arm64; strip_tool=aarch64-linux-gnu-strip ;;
    2800) arch=armhf; strip_tool=arm-linux-gnueabihf-strip ;;
    *) echo "error: $binary is not an x86-64, aarch64 or 32-bit Arm ELF executable (e_machine $machine)" >&2; exit 2 ;;
esac

version=$(sed -n '/^\[workspace.package\]/,/^\[/s/^version = "\(.*\)"/\1/p' "$repo/Cargo.toml")
[[ -n $version ]] || { echo "error: no [workspace.package] version in $repo/Cargo.toml" >&2; exit 2; }

staging=$(mktemp -d)
trap 'rm -rf "$staging"' EXIT
pkg="$staging/edgefleet-agent_${version}_$arch"
install -d "$pkg/DEBIAN" "$pkg/usr/bin" "$pkg/lib/systemd/system" "$pkg/etc/edgefleet" \
    "$pkg/usr/share/doc/edgefleet-agent"
install -m 0755 "$binary" "$pkg/usr/bin/edgefleet-agent"
# A release build is stripped already; a debug build keeps its symbols out of the package.
if readelf -S -W "$pkg/usr/bin/edgefleet-agent" | grep -q '\.symtab'; then
    command -v "$strip_tool" >/dev/null || { echo "error: $binary has symbols and $strip_tool is missing (cross/build.sh setup installs it)" >&2; exit 2; }
    "$strip_tool" "$pkg/usr/bin/edgefleet-agent"
fi
install -m 0644 "$here/edgefleet-agent.service" "$pkg/lib/systemd/system/"
install -m 0644 "$here/agent.toml" "$pkg/etc/edgefleet/agent.toml"
for script in postinst prerm postrm; do
    install -m 0755 "$here/debian/$script" "$pkg/DEBIAN/$script"
done
echo /etc/edgefleet/agent.toml >"$pkg/DEBIAN/conffiles"
cat >"$pkg/usr/share/doc/edgefleet-agent/copyright" <<COPYRIGHT
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: edgefleet
Source: https://github.com/edgefleet/edgefleet

Files: *
License: Apache-2.0
 On Debian systems the full text of the license is in /usr/share/common-licenses/Apache-2.0.
COPYRIGHT

# Dependencies: glibc at the newest symbol version the binary uses, libgcc_s if it needs it.
depends=()
needed=$(readelf -d -W "$pkg/usr/bin/edgefleet-agent" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p')
for lib in $needed; do
    case "$lib" in
        libc.so.6|libm.so.6|libdl.so.2|libpthread.so.0|librt.so.1|ld-linux*) ;;
        libgcc_s.so.1) depends+=("libgcc-s1") ;;
        *) echo "error: the agent needs $lib, which this script does not map to a Debian package" >&2; exit 1 ;;
    esac
done
if [[ -n $needed ]]; then
    glibc=$(readelf -V -W "$pkg/usr/bin/edgefleet-agent" | grep -o 'GLIBC_[0-9.]*' | sed 's/GLIBC_//' | sort -Vu | tail -1)
    depends=("libc6 (>= $glibc)" "${depends[@]}")
fi
installed_kib=$(du -sk --exclude=DEBIAN "$pkg" | cut -f1)
{
    echo "Package: edgefleet-agent"
    echo "Version: $version"
    echo "Architecture: $arch"
    echo "Maintainer: ${DEB_MAINTAINER:-EdgeFleet developers <edgefleet@localhost>}"
    echo "Installed-Size: $installed_kib"
    if ((${#depends[@]})); then
        (IFS=,; echo "Depends: ${depends[*]}" | sed 's/,/, /g')
    fi
    echo "Section: net"
    echo "Priority: optional"
    echo "Homepage: https://github.com/edgefleet/edgefleet"
    echo "Description: EdgeFleet device agent"
    echo " Verified atomic model installs, tract inference in a supervised worker process,"
    echo " a local inference API, self-test and local rollback, telemetry to the controller."
    echo " Provision a device (device id, controller, trust files, enrollment token) before"
    echo " starting edgefleet-agent.service; firmware-examples/deploy/provision.sh does that."
} >"$pkg/DEBIAN/control"

mkdir -p "$out"
deb="$out/edgefleet-agent_${version}_$arch.deb"
dpkg-deb --root-owner-group -Z"$compress" --build "$pkg" "$deb" >/dev/null
echo "$deb"
