"""Scan kernels: selective and linear scans, and mixer-matrix materialisation."""

from dynalens.kernels.reference import selective_scan_ref
from dynalens.kernels.selective_scan import selective_scan

__all__ = ["selective_scan", "selective_scan_ref"]
