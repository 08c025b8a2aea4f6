"""SO-101 arms (six Feetech STS3215 servos per arm, through lerobot's Feetech bus).

Only the protocol-level fake lives here so far (fake/); the driver comes later.
"""
