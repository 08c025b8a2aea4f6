"""Recording to LeRobotDataset v3: every frame and state message, aligned, crash-safe."""
