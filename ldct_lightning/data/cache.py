"""A disk cache of CT series as int16 HU memory maps, so training never decodes DICOM twice.

Each series is read once through :func:`ldct_lightning.data.dicom.read_series_hu`, rounded to int16 HU
and written as a ``.npy`` file that later reads open as a memory map. Entries are keyed by a content
hash of the series' files (and a format version), so a changed file gives a new entry; file names hold
hashes only, never identifiers. Writes go to a temporary file that is renamed into place, so an
interrupted build never leaves a half-written entry and concurrent builders (DDP ranks) do not clash.

Layout of ``cache_dir``::

    <content_key>.npy        int16 (n_slices, rows, cols) HU
    <content_key>.json       sidecar: shape, series_key, patient_key, positions_mm, format version
    stat/<stat_key>          content key of a file list with given paths, sizes and mtimes (lets a
                             rerun skip re-hashing unchanged files)
    npz/<content_key>/       arrays of a ``.npz`` file (truth volumes) as ``.npy`` memory maps
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ldct_lightning.atomic import write_text_atomic
from ldct_lightning.data.dicom import SeriesInfo, read_series_hu

# Bump when the stored layout or the HU conversion changes: old entries are then ignored.
CACHE_FORMAT_VERSION = 1
_HASH_BLOCK = 1 << 20


def _digest() -> hashlib.blake2b:
    return hashlib.blake2b(f"ldct-lightning-cache/v{CACHE_FORMAT_VERSION}\n".encode(), digest_size=16)


def content_key(files: Sequence[str | Path]) -> str:
    """Hash of the bytes of ``files`` in order (blake2b-128, with the cache format version).

    Args:
        files: the files of one series, in slice order.

    Returns:
        A 32-character hex key.
    """
    digest = _digest()
    for path in files:
        digest.update(f"file {os.path.getsize(path)}\n".encode())
        with open(path, "rb") as f:
            while block := f.read(_HASH_BLOCK):
                digest.update(block)
    return digest.hexdigest()


def stat_key(files: Sequence[str | Path]) -> str:
    """Hash of the resolved paths, sizes and modification times of ``files`` (cheap change detector)."""
    digest = _digest()
    for path in files:
        st = os.stat(path)
        digest.update(f"{Path(path).resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


@contextmanager
def building_folder(final: Path, done_file: str) -> Iterator[Path]:
    """Build a cache entry folder atomically: yield a temporary folder beside ``final``, then rename it.

    An error inside the block leaves nothing behind; when another process finished the same entry first
    (``final/done_file`` exists), its entry is kept.

    Args:
        final: the entry's folder.
        done_file: the file whose presence marks a finished entry.

    Yields:
        The temporary folder to write the entry's files into.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)  # mkdtemp makes the folder private; the cache may be shared
        try:
            os.replace(tmp, final)
        except OSError:  # another process finished the same entry first
            if not (final / done_file).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def hu_to_int16(hu: np.ndarray, out: np.ndarray) -> None:
    """Round HU to the nearest integer and clip into int16, writing into ``out`` (``hu`` is overwritten)."""
    np.rint(hu, out=hu)
    np.clip(hu, np.iinfo(np.int16).min, np.iinfo(np.int16).max, out=hu)
    out[...] = hu


class SeriesCache:
    """Content-addressed cache of CT series as int16 HU memory maps.

    Args:
        cache_dir: folder of the cache (created when missing).
        chunk_slices: slices decoded per chunk during a build (bounds the float32 memory used).
        trust_stat: reuse the content key of a file list whose paths, sizes and modification times are
            unchanged instead of hashing the files again. Set False to hash on every :meth:`get`.

    Example:
        >>> cache = SeriesCache("data/demo/.cache")
        >>> volume = cache.get(series)  # np.memmap int16 (n_slices, rows, cols), HU
    """

    def __init__(self, cache_dir: str | Path, chunk_slices: int = 32, trust_stat: bool = True) -> None:
        if chunk_slices < 1:
            raise ValueError(f"chunk_slices must be >= 1, got {chunk_slices}")
        self.cache_dir = Path(cache_dir)
        self.chunk_slices = chunk_slices
        self.trust_stat = trust_stat
        self.builds = 0  # series built (not reused) by this instance; tests and logs read it

    # ------------------------------------------------------------------------------------------ keys

    def key(self, series: SeriesInfo) -> str:
        """Content key of a series (hashes its files unless an unchanged stat entry knows it)."""
        stat_file = self.cache_dir / "stat" / stat_key(series.files)
        if self.trust_stat and stat_file.is_file():
            key = stat_file.read_text().strip()
            if (self.cache_dir / f"{key}.json").is_file():
                return key
        key = content_key(series.files)
        if self.trust_stat and (self.cache_dir / f"{key}.json").is_file():
            self._remember_stat(stat_file, key)
        return key

    def _remember_stat(self, stat_file: Path, key: str) -> None:
        write_text_atomic(stat_file, key)

    def paths(self, key: str) -> tuple[Path, Path]:
        """The ``.npy`` array and ``.json`` sidecar of a content key."""
        return self.cache_dir / f"{key}.npy", self.cache_dir / f"{key}.json"

    # ------------------------------------------------------------------------------------------- get

    def get(self, series: SeriesInfo, progress: bool = False) -> np.memmap:
        """The series as int16 HU, built on first use and memory-mapped read-only afterwards.

        Args:
            series: a series from :func:`ldct_lightning.data.dicom.scan_dicom_folder`.
            progress: show a progress bar while building.

        Returns:
            Read-only ``np.memmap`` of shape (n_slices, rows, cols), dtype int16, slices in the order of
            ``series.files`` (ascending position).

        Raises:
            DicomError: a slice cannot be decoded.
            ValueError: a cached entry does not match the series (corrupt cache folder).
        """
        key = self.key(series)
        array_path, sidecar_path = self.paths(key)
        if not (array_path.is_file() and sidecar_path.is_file()):
            self._build(series, key, progress)
            if self.trust_stat:
                self._remember_stat(self.cache_dir / "stat" / stat_key(series.files), key)
        volume = np.load(array_path, mmap_mode="r")
        expected = (series.n_slices, series.rows, series.cols)
        if volume.shape != expected or volume.dtype != np.int16:
            raise ValueError(
                f"{array_path}: cached array is {volume.dtype} {volume.shape}, expected int16 {expected} for "
                f"series {series.series_key}. Delete the file (or the cache folder) to rebuild it"
            )
        return volume

    def sidecar(self, series: SeriesInfo) -> dict:
        """The JSON sidecar of a cached series (builds the entry when missing)."""
        self.get(series)
        return json.loads(self.paths(self.key(series))[1].read_text())

    def _build(self, series: SeriesInfo, key: str, progress: bool) -> None:
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        array_path, sidecar_path = self.paths(key)
        shape = (series.n_slices, series.rows, series.cols)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{key}.", suffix=".npy.tmp", dir=self.cache_dir)
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.int16, shape=shape)
            starts = range(0, series.n_slices, self.chunk_slices)
            bar = tqdm(
                total=series.n_slices,
                desc=f"cache series {series.series_key}",
                unit="slice",
                disable=not progress,
            )
            # decoded in chunks so that a long series never needs its full float32 volume in memory
            for start in starts:
                stop = min(start + self.chunk_slices, series.n_slices)
                chunk = dataclasses.replace(
                    series, files=series.files[start:stop], positions_mm=series.positions_mm[start:stop]
                )
                hu_to_int16(read_series_hu(chunk), out[start:stop])
                bar.update(stop - start)
            bar.close()
            out.flush()
            del out
            os.chmod(tmp, 0o644)  # mkstemp makes the file private; the cache may be shared
            os.replace(tmp, array_path)
        finally:
            tmp.unlink(missing_ok=True)
        sidecar = {
            "format_version": CACHE_FORMAT_VERSION,
            "content_key": key,
            "series_key": series.series_key,
            "patient_key": series.patient_key,
            "shape": list(shape),
            "dtype": "int16",
            "unit": "HU",
            "positions_mm": list(series.positions_mm),
            "pixel_spacing_mm": list(series.pixel_spacing_mm),
        }
        write_text_atomic(sidecar_path, json.dumps(sidecar, indent=1))
        self.builds += 1

    # ------------------------------------------------------------------------------------------- npz

    def get_npz(self, path: str | Path) -> dict[str, np.memmap]:
        """The arrays of a ``.npz`` file (e.g. a truth file) as read-only memory maps.

        A ``.npz`` is a zip archive that cannot be memory-mapped; this extracts it once per content.

        Args:
            path: the ``.npz`` file.

        Returns:
            Array name -> read-only ``np.memmap``.
        """
        path = Path(path)
        key = content_key([path])
        folder = self.cache_dir / "npz" / key
        if not (folder / "done").is_file():
            with building_folder(folder, "done") as tmp:
                with np.load(path, allow_pickle=False) as data:
                    for name in data.files:
                        np.save(tmp / f"{name}.npy", data[name])
                (tmp / "done").write_text(
                    json.dumps({"format_version": CACHE_FORMAT_VERSION, "arrays": data.files})
                )
            self.builds += 1
        names = json.loads((folder / "done").read_text())["arrays"]
        return {name: np.load(folder / f"{name}.npy", mmap_mode="r") for name in names}
