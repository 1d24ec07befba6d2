"""Corpus format, simulator and (later) readers, samplers and Ray Data datasets."""
