"""Scan kernels: selective, linear and SSD scans, and mixer-matrix materialisation."""

from dynalens.kernels.linear_scan import linear_scan
from dynalens.kernels.mixer_matrix import mixer_matrix
from dynalens.kernels.reference import linear_scan_ref, selective_scan_ref
from dynalens.kernels.selective_scan import selective_scan
from dynalens.kernels.ssd import ssd_scan
from dynalens.kernels.ssd_mixer import ssd_mixer_matrix
from dynalens.kernels.ssd_ref import ssd_scan_ref

__all__ = [
    "linear_scan",
    "linear_scan_ref",
    "mixer_matrix",
    "selective_scan",
    "selective_scan_ref",
    "ssd_mixer_matrix",
    "ssd_scan",
    "ssd_scan_ref",
]
