"""Shipped, calibrated RALU schedule files (package data: load them by name with ralu.runtime.load_schedule)."""
