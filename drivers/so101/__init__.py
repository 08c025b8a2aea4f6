"""SO-101 arms (six Feetech STS3215 servos per arm, through lerobot's Feetech bus and SO classes).

backend.py (the driver's backend, run in an isolated worker), config.py (cell settings), plugin.py
(kind "so101"), bench.py (`armada bench so101`), calibration.py (lerobot's calibration format), and
fake/ (the STS3215 bus fake and the whole-arm fake process, `armada fake so101`).
"""
