"""Scan kernels: selective and linear scans, and mixer-matrix materialisation."""

from dynalens.kernels.linear_scan import linear_scan
from dynalens.kernels.mixer_matrix import mixer_matrix
from dynalens.kernels.reference import linear_scan_ref, selective_scan_ref
from dynalens.kernels.selective_scan import selective_scan

__all__ = ["linear_scan", "linear_scan_ref", "mixer_matrix", "selective_scan", "selective_scan_ref"]
