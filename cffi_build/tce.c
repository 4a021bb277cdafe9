int vfiod_tce_abi_version(void) { return 1; }
