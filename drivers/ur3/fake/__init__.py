"""A loopback UR controller (dashboard, script sink, RTDE v2) for tests; run ``python -m armada.drivers.ur3.fake.controller``."""
