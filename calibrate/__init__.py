"""ralu.calibrate: offline NT-DM calibration of RALU schedules (scipy, Optuna, matplotlib)."""
