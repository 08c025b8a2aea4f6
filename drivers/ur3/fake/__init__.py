"""A loopback UR controller (dashboard, script sink, RTDE v2) for tests; run ``python -m drivers.ur3.fake.controller``."""
