"""How do I run the share error's two dense kernels on every core: a Gram matrix and its top eigenvalues?

The share error (``flexigpt.lowrank``) needs, for thousands of weight deltas ``D`` (``m x n``,
``m >= n``), the Gram matrix ``D^T D`` and its few largest eigenvalues. Two kernels do that best:
BLAS ``ssyrk`` (a symmetric product: half the flops of a general ``D.T @ D``) and LAPACK ``ssyevr``
with an index range (it skips the eigenvalues nobody asked for). Neither is reachable from torch,
and SciPy's Python wrappers for them (``scipy.linalg.blas`` / ``scipy.linalg.lapack``) hold the GIL,
so two threads ran no faster than one (measured on the 2-core machine). Here the same SciPy kernels
are called through the function pointers that SciPy publishes for Cython
(``scipy.linalg.cython_blas`` / ``cython_lapack``), with ctypes, which releases the GIL for the
duration of each call; independent problems then scale over the cores.

Measured on one core, a 1536 x 576 delta (range over several runs): ``ssyrk`` 5.1-5.7 ms vs 9.6 ms
for torch's ``D.T @ D``; ``ssyevr`` (top 32 of 576) 5.8-6.4 ms vs 10.7 ms for
``torch.linalg.eigvalsh`` (all eigenvalues).

Where SciPy or its Cython API is missing, the same functions fall back on torch (also GIL-free,
slower): the results agree to float32 rounding either way.

All arrays are float32 numpy arrays. BLAS/LAPACK are column-major: a C-contiguous ``(m, n)`` array
is the column-major ``(n, m)`` matrix ``D^T``, which is all ``gram`` needs.
"""
from __future__ import annotations

import ctypes
import threading

import numpy as np
import torch

__all__ = ["NATIVE", "gram", "lower_product", "top_eigh", "blas_single_thread"]

_P = ctypes.c_void_p


def _pointer(module, name: str, nargs: int):
    """A ctypes function for one of SciPy's Cython BLAS/LAPACK routines (all arguments by pointer)."""
    capsule = module.__pyx_capi__[name]
    get_name = ctypes.pythonapi.PyCapsule_GetName
    get_name.restype, get_name.argtypes = ctypes.c_char_p, [ctypes.py_object]
    get_pointer = ctypes.pythonapi.PyCapsule_GetPointer
    get_pointer.restype, get_pointer.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
    address = get_pointer(capsule, get_name(capsule))
    if not address:
        raise ImportError(f"no address for {name}")
    return ctypes.CFUNCTYPE(None, *([_P] * nargs))(address)


try:
    import scipy.linalg.cython_blas as _cython_blas
    import scipy.linalg.cython_lapack as _cython_lapack
    from threadpoolctl import threadpool_limits as _threadpool_limits

    _SSYRK = _pointer(_cython_blas, "ssyrk", 10)
    _STRMM = _pointer(_cython_blas, "strmm", 11)
    _SSYEVR = _pointer(_cython_lapack, "ssyevr", 21)
    NATIVE = True
except Exception:  # pragma: no cover - the torch fallback is exercised by forcing NATIVE off in a test
    _SSYRK = _STRMM = _SSYEVR = _threadpool_limits = None
    NATIVE = False


class _Args:
    """Scalar arguments passed by pointer; keeps their buffers alive until the call returns."""

    def __init__(self) -> None:
        self._keep: list[np.ndarray] = []

    def _ptr(self, a: np.ndarray) -> int:
        self._keep.append(a)
        return a.ctypes.data

    def char(self, c: str) -> int:
        return self._ptr(np.frombuffer(c.encode(), dtype=np.uint8).copy())

    def int(self, v: int) -> int:
        return self._ptr(np.array([v], dtype=np.int32))

    def float(self, v: float) -> int:
        return self._ptr(np.array([v], dtype=np.float32))


def _f32_c(x: np.ndarray, name: str) -> np.ndarray:
    if x.dtype != np.float32 or not x.flags.c_contiguous or x.ndim != 2:
        raise ValueError(f"{name} must be a C-contiguous 2-D float32 array, got {x.dtype} {x.shape}")
    return x


def gram(d: np.ndarray, out: np.ndarray | None = None, *, native: bool | None = None,
         accumulate: bool = False) -> np.ndarray:
    """``D^T D`` of a C-contiguous float32 ``(m, n)`` array.

    Args:
        d: the matrix ``D``.
        out: optional ``(n, n)`` float32 buffer to write into.
        native: force (``True``) or skip (``False``) the BLAS route; default: whenever available.
        accumulate: add ``D^T D`` to ``out`` (required then) instead of overwriting it.

    Returns:
        ``(n, n)`` float32. On the BLAS route only the upper triangle (column-major, i.e. the lower
        triangle of the C-order array) and the diagonal are written; ``top_eigh`` reads just that.
    """
    d = _f32_c(d, "d")
    m, n = d.shape
    if accumulate and out is None:
        raise ValueError("accumulate=True needs an out buffer to add to")
    if not (NATIVE if native is None else native and NATIVE):
        res = torch.from_numpy(d).T @ torch.from_numpy(d)
        if out is None:
            return res.numpy()
        if accumulate:
            out += res.numpy()
        else:
            out[...] = res.numpy()
        return out
    if out is None:
        out = np.empty((n, n), dtype=np.float32)
    elif _f32_c(out, "out").shape != (n, n):
        raise ValueError(f"out must have shape {(n, n)}, got {out.shape}")
    a = _Args()
    # column-major: A = D^T is (n x m) with lda = n; C = A A^T = D^T D (n x n)
    _SSYRK(a.char("U"), a.char("N"), a.int(n), a.int(m), a.float(1.0), d.ctypes.data, a.int(n),
           a.float(1.0 if accumulate else 0.0), out.ctypes.data, a.int(n))
    return out


def lower_product(b: np.ndarray, s: np.ndarray, *, right: bool, native: bool | None = None) -> np.ndarray:
    """In place: ``b <- b @ s`` (``right``) or ``b <- s^T @ b`` for a lower-triangular float32 ``s``.

    BLAS ``strmm`` reads only the triangle and costs half a general product; the whitened share
    error multiplies every weight delta by a Cholesky factor this way.

    Args:
        b: C-contiguous float32 ``(p, q)``, overwritten with the product.
        s: C-contiguous float32 ``(q, q)`` (``right``) or ``(p, p)``; only its lower triangle is read.
        native: force (``True``) or skip (``False``) the BLAS route; default: whenever available.

    Returns:
        ``b``.
    """
    b, s = _f32_c(b, "b"), _f32_c(s, "s")
    p, q = b.shape
    k = q if right else p
    if s.shape != (k, k):
        raise ValueError(f"s must have shape {(k, k)} for b of shape {b.shape} (right={right}), got {s.shape}")
    if not (NATIVE if native is None else native and NATIVE):
        low = torch.from_numpy(s).tril()
        tb = torch.from_numpy(b)
        b[...] = (tb @ low if right else low.T @ tb).numpy()
        return b
    a = _Args()
    # Column-major views: b is B' = b^T (q x p, ldb q) and s is S' = s^T, an upper triangle.
    # right: (b s)^T = s^T b^T = S' B' (side L, no transpose); left: (s^T b)^T = b^T s = B' S'^T.
    if right:
        _STRMM(a.char("L"), a.char("U"), a.char("N"), a.char("N"), a.int(q), a.int(p), a.float(1.0),
               s.ctypes.data, a.int(q), b.ctypes.data, a.int(q))
    else:
        _STRMM(a.char("R"), a.char("U"), a.char("T"), a.char("N"), a.int(q), a.int(p), a.float(1.0),
               s.ctypes.data, a.int(p), b.ctypes.data, a.int(q))
    return b


def top_eigh(g: np.ndarray, k: int, *, vectors: bool = False, native: bool | None = None):
    """The ``k`` largest eigenvalues (ascending) of a symmetric float32 matrix, optionally with vectors.

    Reads the column-major upper triangle of ``g`` (as ``gram`` writes it); ``g`` may be overwritten.

    Returns:
        ``values`` of shape ``(k,)``, or ``(values, vecs)`` with ``vecs`` of shape ``(n, k)``
        (column ``c`` belongs to ``values[c]``).
    """
    g = _f32_c(g, "g")
    n = g.shape[0]
    if not 1 <= k <= n or g.shape != (n, n):
        raise ValueError(f"k={k} must be in 1..{n} for a square matrix, got shape {g.shape}")
    if not (NATIVE if native is None else native and NATIVE):
        # the C-order lower triangle is the column-major upper one: symmetrise from it
        t = torch.from_numpy(g).tril()
        t = t + t.T - torch.diag(torch.diagonal(t))
        if vectors:
            w, v = torch.linalg.eigh(t)
            return w[n - k :].numpy().copy(), v[:, n - k :].numpy().copy()
        return torch.linalg.eigvalsh(t)[n - k :].numpy().copy()
    a = _Args()
    w = np.empty(n, dtype=np.float32)
    z = np.empty((k, n) if vectors else (1,), dtype=np.float32)  # C-order (k, n) = column-major (n, k)
    isuppz = np.empty(2 * max(k, 1), dtype=np.int32)
    lwork, liwork = 26 * n, 10 * n  # LAPACK's documented minimum workspace
    work, iwork = np.empty(lwork, dtype=np.float32), np.empty(liwork, dtype=np.int32)
    found, info = np.zeros(1, dtype=np.int32), np.zeros(1, dtype=np.int32)
    _SSYEVR(a.char("V" if vectors else "N"), a.char("I"), a.char("U"), a.int(n), g.ctypes.data, a.int(n),
            a.float(0.0), a.float(0.0), a.int(n - k + 1), a.int(n), a.float(0.0), found.ctypes.data,
            w.ctypes.data, z.ctypes.data, a.int(n if vectors else 1), isuppz.ctypes.data, work.ctypes.data,
            a.int(lwork), iwork.ctypes.data, a.int(liwork), info.ctypes.data)
    if info[0] != 0 or found[0] != k:
        raise np.linalg.LinAlgError(f"ssyevr did not converge (info={int(info[0])}, found {int(found[0])} of {k})")
    return (w[:k].copy(), z.T.copy()) if vectors else w[:k].copy()


class blas_single_thread:
    """Context: SciPy's BLAS and torch each on one thread, so that worker threads own one core each.

    ``torch.set_num_threads`` is process-wide, so both are restored on exit, and one parallel section
    runs at a time (a second caller waits; the same thread may nest). Enter it from the thread that
    hands out the work, never from the workers.
    """

    _lock = threading.RLock()

    def __enter__(self):
        self._lock.acquire()
        self._torch = torch.get_num_threads()
        self._limits = _threadpool_limits(1, user_api="blas") if _threadpool_limits is not None else None
        torch.set_num_threads(1)
        return self

    def __exit__(self, *exc) -> None:
        try:
            if self._limits is not None:
                self._limits.restore_original_limits()
            torch.set_num_threads(self._torch)
        finally:
            self._lock.release()
