include $(sort $(wildcard $(BR2_EXTERNAL_EDGEFLEET_PATH)/package/*/*.mk))
