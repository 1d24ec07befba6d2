"""Reports: statistics tables and plots."""
