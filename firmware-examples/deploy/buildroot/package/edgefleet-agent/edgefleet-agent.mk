################################################################################
#
# edgefleet-agent: the prebuilt EdgeFleet agent staged by cross/build.sh stage
#
################################################################################

EDGEFLEET_AGENT_VERSION = 0.1.0
EDGEFLEET_AGENT_SITE = $(call qstrip,$(BR2_PACKAGE_EDGEFLEET_AGENT_PREBUILT_DIR))
EDGEFLEET_AGENT_SITE_METHOD = local
EDGEFLEET_AGENT_LICENSE = Apache-2.0

define EDGEFLEET_AGENT_INSTALL_TARGET_CMDS
	$(INSTALL) -D -m 0755 $(@D)/edgefleet-agent $(TARGET_DIR)/usr/bin/edgefleet-agent
	$(INSTALL) -D -m 0644 $(@D)/agent.toml $(TARGET_DIR)/etc/edgefleet/agent.toml
endef

# Not enabled: the device is provisioned first (provision.sh enables and starts it).
define EDGEFLEET_AGENT_INSTALL_INIT_SYSTEMD
	$(INSTALL) -D -m 0644 $(@D)/edgefleet-agent.service \
		$(TARGET_DIR)/usr/lib/systemd/system/edgefleet-agent.service
endef

define EDGEFLEET_AGENT_USERS
	edgefleet -1 edgefleet -1 * /var/lib/edgefleet - - EdgeFleet agent
endef

$(eval $(generic-package))
