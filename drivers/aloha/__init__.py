"""ALOHA (two ViperX follower and two WidowX leader arms, Dynamixel Protocol 2.0 over dynamixel-sdk).

Only the protocol-level fake lives here so far (fake/); the driver comes later.
"""
