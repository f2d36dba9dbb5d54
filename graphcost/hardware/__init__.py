"""Devices (presets, device files, peaks per dtype, memory, bandwidth), interconnects for
parallel plans, and `calibrate`, which measures this machine's."""
