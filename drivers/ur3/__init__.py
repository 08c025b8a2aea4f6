"""Universal Robots UR3 support (ur-rtde). ``drivers.ur3.fake`` holds a loopback controller for tests."""
