"""Phantom generator, DICOM/NIfTI I/O and the studies folder builder."""
