"""Scan kernels: selective and linear scans, and mixer-matrix materialisation."""

from dynalens.kernels.reference import selective_scan_ref

selective_scan = selective_scan_ref  # replaced by the dispatching function of kernels/selective_scan.py

__all__ = ["selective_scan", "selective_scan_ref"]
