"""Simulated embodiments (MuJoCo): backend kind and camera kind `mujoco`, scenes, tasks, scripted experts."""
