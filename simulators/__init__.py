"""Hardware simulators speaking each device's real protocol (pty serial, PC/SC, video, Modbus)."""
