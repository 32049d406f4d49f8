"""Calibration statistics: what the methods declare they need, collected by hooks and cached."""
