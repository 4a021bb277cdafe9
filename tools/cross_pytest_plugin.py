"""pytest plugin for tools/test-cross.sh: under qemu-user every example runs 5-20x slower, so
hypothesis' per-example deadline (a wall-clock limit) is turned off; nothing else changes."""

from hypothesis import settings

settings.register_profile("vfiod-cross", deadline=None)
settings.load_profile("vfiod-cross")
