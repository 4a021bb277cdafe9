"""Sans-I/O vfio-user wire protocol (installed as ``vfiod.protocol``)."""
