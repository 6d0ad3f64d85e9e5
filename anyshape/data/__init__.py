"""Text and calibration data."""
