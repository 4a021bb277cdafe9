"""Suite-wide settings.

Hypothesis examples are checked for behaviour, never for speed: the machines that run the suite
are shared 2-core boxes where a sibling process can stall any example, so the per-example
deadline is off everywhere (speed is what ``make bench`` measures).
"""

from hypothesis import settings

settings.register_profile("vfiod", deadline=None)
settings.load_profile("vfiod")
