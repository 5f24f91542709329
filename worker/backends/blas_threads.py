"""Keep numpy's OpenBLAS single-threaded while the native kernels run their own OpenMP threads.

Both thread pools busy-wait for a while after each call. With both at full width on the same
cores, every numpy product in the attention block (q @ K^T, p @ V) fights the spinning OpenMP
workers and vice versa: on Gemma 3 270M (2 cores) prefill ran at ~100 tok/s instead of ~300 and
the attention block took 10x longer. The attention products are small, so one BLAS thread loses
nothing. This is what threadpoolctl does, without the dependency: find the OpenBLAS that numpy
loaded and call its set_num_threads.
"""

from __future__ import annotations

import ctypes

# Names of set_num_threads in the OpenBLAS builds numpy ships (scipy-openblas, 64-bit ints
# first) and in a plain system OpenBLAS.
_SETTERS = (
    "scipy_openblas_set_num_threads64_",
    "scipy_openblas_set_num_threads",
    "openblas_set_num_threads64_",
    "openblas_set_num_threads",
)


def _loaded_openblas_paths() -> list[str]:
    paths = []
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.rsplit(" ", 1)[-1].strip()
                file_name = path.rsplit("/", 1)[-1].lower()
                if "openblas" in file_name and ".so" in file_name:
                    paths.append(path)
    except OSError:  # not Linux: leave BLAS as it is
        return []
    return sorted(set(paths))


def limit_blas_threads(n_threads: int) -> bool:
    """Set numpy's OpenBLAS to `n_threads`; True if an OpenBLAS was found and set."""
    done = False
    for path in _loaded_openblas_paths():
        library = ctypes.CDLL(path)
        for name in _SETTERS:
            setter = getattr(library, name, None)
            if setter is not None:
                setter(ctypes.c_int(n_threads))
                done = True
                break
    return done
