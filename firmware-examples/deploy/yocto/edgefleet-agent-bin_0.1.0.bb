# The EdgeFleet agent for a Yocto image, from the binary cross/build.sh built (bitbake does not
# run cargo here). Put this recipe in your layer (recipes-edgefleet/edgefleet-agent/) and stage
# its files beside it:
#   cross/build.sh build aarch64-unknown-linux-gnu     # or armv7-…, or the static aarch64 musl build
#   cross/build.sh stage aarch64-unknown-linux-gnu <layer>/recipes-edgefleet/edgefleet-agent/files
SUMMARY = "EdgeFleet device agent: verified model installs, local inference API, rollback"
HOMEPAGE = "https://github.com/edgefleet/edgefleet"
LICENSE = "Apache-2.0"
LIC_FILES_CHKSUM = "file://${COMMON_LICENSE_DIR}/Apache-2.0;md5=89aea4e17d99a7cacdbeed46a0096b10"

SRC_URI = "file://edgefleet-agent \
           file://edgefleet-agent.service \
           file://agent.toml \
          "
# Yocto 5.1 (styhead) and later unpack into UNPACKDIR; on scarthgap and older use ${WORKDIR}.
S = "${UNPACKDIR}"

# The binary is for one architecture: build the matching target with cross/build.sh.
COMPATIBLE_HOST = "(aarch64|arm).*-linux.*"

inherit systemd useradd

USERADD_PACKAGES = "${PN}"
USERADD_PARAM:${PN} = "--system --user-group --home-dir /var/lib/edgefleet --no-create-home --shell /bin/false edgefleet"

# Not started until the device is provisioned (provision.sh enables it).
SYSTEMD_SERVICE:${PN} = "edgefleet-agent.service"
SYSTEMD_AUTO_ENABLE:${PN} = "disable"

do_install() {
    install -D -m 0755 ${S}/edgefleet-agent ${D}${bindir}/edgefleet-agent
    install -D -m 0644 ${S}/edgefleet-agent.service ${D}${systemd_system_unitdir}/edgefleet-agent.service
    install -D -m 0644 ${S}/agent.toml ${D}${sysconfdir}/edgefleet/agent.toml
}

CONFFILES:${PN} = "${sysconfdir}/edgefleet/agent.toml"
FILES:${PN} += "${systemd_system_unitdir}/edgefleet-agent.service"

# cargo's release profile strips the binary and links it itself.
INHIBIT_PACKAGE_STRIP = "1"
INHIBIT_PACKAGE_DEBUG_SPLIT = "1"
INSANE_SKIP:${PN} += "already-stripped ldflags"
