"""Fire drills for tests and benchmarks: broken updates and slow sites, put on the wire by FLARE filters.

Never part of a production job unless a drill is asked for (``faults``, ``delays``)."""
