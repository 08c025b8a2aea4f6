"""ALOHA (two ViperX follower and two WidowX leader arms, Dynamixel Protocol 2.0 over dynamixel-sdk).

backend.py: the driver's backend (run in the isolated worker); config.py: the cell's settings;
plugin.py: the ``aloha`` backend plugin; bench.py: `armada bench aloha`; fake/: Dynamixel servos on
ptys, and the whole four-bus ALOHA as a process (`armada fake aloha`).
"""
