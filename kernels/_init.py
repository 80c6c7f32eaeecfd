"""Scan kernels: selective, linear and SSD scans, and mixer-matrix materialisation.

Imported whole, unlike the other subpackages (``dynalens/_lazy.py``): three of
its functions share their module's name (``selective_scan``, ``linear_scan``,
``mixer_matrix``), and importing such a module binds the module to that name
on the package, so a lazily bound function could be read back as its module.
The package costs torch alone: numba and Triton load with their first kernel
(``kernels/paths.py``), and ``import dynalens`` does not import it.
"""

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
