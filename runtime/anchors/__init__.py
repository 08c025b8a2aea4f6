"""`armada bench anchors`: armada beside openpi's client and LeRobot's async inference, in one run."""
