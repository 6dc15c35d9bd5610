"""Compiled CPU kernels for SAE encoding (``native_kernels.c``), built on first use with the system C compiler.

Why: on CPUs with fast bfloat16 matmuls (AMX), what surrounds the encoder matmul costs more than the matmul.
PyTorch's row selection (``torch.topk``, or the grouped :func:`hf_dataselect.sae.kernels.row_topk` built from
it) takes ~8 µs per token to find the top 44 of 6,144 scores; the C kernel takes ~1.3 µs (one vectorised
pass for strided group maxima, then selections among a few dozen keys). The bfloat16 screen's other steps
(input rounding and norms; recomputing the candidates in float32, the final top k and the proof) each take
several PyTorch calls and passes over memory, and one pass per row in C; on AMX the screen's matmul joins
them, so its scores are never stored (benchmarks/results/sae.md, (d3)).

* :func:`row_topk` returns the same values as ``torch.topk``; among values equal to the k-th it keeps the
  smallest columns, so its result depends neither on the thread count nor on the CPU.
* :func:`screen_inputs`, :func:`screened_topk` and :func:`amx_screened_topk` compute what
  :mod:`hf_dataselect.sae.screening` defines; each float32 dot product is summed in one fixed order.

The shared library is compiled once per source, flags, compiler and CPU (``-O3 -march=native``, with OpenMP
where the compiler has it) into ``<cache_dir>/native/<hash>/`` (atomically, so processes building at once
cannot leave a half-written file) and loaded with :mod:`ctypes`, which releases the GIL during calls. Where no
compiler works, or with ``HF_DATASELECT_NATIVE=off``, the functions return ``None`` and callers use PyTorch.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

import torch

from hf_dataselect.atomic import writing

logger = logging.getLogger(__name__)

SOURCE_NAME = "native_kernels.c"
COMPILE_FLAGS: tuple[str, ...] = ("-O3", "-march=native", "-shared", "-fPIC", "-pthread") + (
    # GCC and clang otherwise keep to 256-bit vectors on AVX-512 CPUs: half the lanes for the key scans
    ("-mprefer-vector-width=512",) if platform.machine().lower() in ("x86_64", "amd64") else ()
)
BUILD_TIMEOUT_S = 120
MIN_ROWS_PER_THREAD = 64
"""Fewer rows than this per thread do not pay for starting the thread."""
_DTYPE_CODES = {torch.bfloat16: 1, torch.float32: 0}
MAX_WIDTH = 1 << 24
"""Row width limit of the row top-k (tie positions are packed in 24 bits)."""


def enabled() -> bool:
    """``HF_DATASELECT_NATIVE`` is not ``off``/``0``/``false``/``no``."""
    return os.environ.get("HF_DATASELECT_NATIVE", "auto").strip().lower() not in ("0", "false", "off", "no")


def _cpu_fingerprint() -> str:
    """The CPU's feature flags: ``-march=native`` code runs only where they are the same."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()}"


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc") or shutil.which("clang")


def build(flags: Sequence[str] = COMPILE_FLAGS, cache_dir: Path | None = None) -> Path:
    """Compile ``native_kernels.c`` with ``flags`` (once) and return the shared library's path.

    Raises ``RuntimeError`` when there is no compiler or it fails.
    """
    from hf_dataselect.sae.auto import default_cache_dir

    compiler = _compiler()
    if compiler is None:
        raise RuntimeError("no C compiler found (set CC)")
    source = resources.files("hf_dataselect.sae").joinpath(SOURCE_NAME).read_bytes()
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    digest = hashlib.sha256(
        b"\0".join([source, " ".join(flags).encode(), version.encode(), _cpu_fingerprint().encode()])
    ).hexdigest()[:16]
    target = (cache_dir or default_cache_dir()) / "native" / digest / "libhf_dataselect_kernels.so"
    if target.exists():
        return target
    source_path = target.parent / SOURCE_NAME
    with writing(source_path) as temporary:
        temporary.write_bytes(source)
    with writing(target) as temporary:
        result = subprocess.run(
            [compiler, *flags, "-o", str(temporary), str(source_path)],
            capture_output=True,
            text=True,
            timeout=BUILD_TIMEOUT_S,
        )
        if result.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {result.stderr.strip()[-2000:]}")
    logger.info("Built the native SAE kernels: %s", target)
    return target


def load(path: Path) -> ctypes.CDLL:
    """The library at ``path`` with its functions' signatures declared."""
    library = ctypes.CDLL(str(path))
    pointer, size, flag = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    library.hf_dataselect_topk_rows.restype = ctypes.c_int
    library.hf_dataselect_topk_rows.argtypes = [pointer, flag, size, size, size, pointer, pointer, flag]
    library.hf_dataselect_screen_inputs.restype = ctypes.c_int
    library.hf_dataselect_screen_inputs.argtypes = [
        *(pointer, size, size, size, ctypes.c_double),  # x, n, d, stride, inflate
        *(pointer, flag),  # augmented, threads
    ]
    library.hf_dataselect_same_bytes.restype = ctypes.c_int
    library.hf_dataselect_same_bytes.argtypes = [pointer, pointer, size]
    library.hf_dataselect_has_amx.restype = ctypes.c_int
    library.hf_dataselect_has_amx.argtypes = []
    library.hf_dataselect_amx_screened_topk.restype = ctypes.c_int
    library.hf_dataselect_amx_screened_topk.argtypes = [
        *(pointer, size, size, size, size),  # packed, n, kp, latents, candidates
        *(pointer, flag, pointer, pointer, pointer, size, size),  # x, x is bf16, shift, weight, bias, d, k
        ctypes.c_double,  # inflate
        *(pointer, pointer, pointer, flag),  # values, indices, proven, threads
    ]
    library.hf_dataselect_screened_topk.restype = ctypes.c_int
    library.hf_dataselect_screened_topk.argtypes = [
        *(pointer, size, size, size),  # scores, n, width, candidates
        *(pointer, pointer, pointer, pointer, size, size),  # x, shift, weight, bias, d, k
        *(pointer, pointer, pointer, flag),  # values, indices, proven, threads
    ]
    return library


OPENMP_FLAGS = ("-fopenmp",)
"""Tried first: the kernels then share PyTorch's OpenMP runtime (libgomp.so.1, already loaded) and its threads."""


@functools.lru_cache(maxsize=1)
def _library() -> ctypes.CDLL | None:
    errors = []
    for flags in (COMPILE_FLAGS + OPENMP_FLAGS, COMPILE_FLAGS):  # without OpenMP: POSIX threads of their own
        try:
            return load(build(flags))
        except (OSError, RuntimeError, subprocess.SubprocessError) as error:
            errors.append(str(error))
    logger.warning("Native SAE kernels unavailable, using PyTorch's (same results, slower): %s", errors[-1])
    return None


def library() -> ctypes.CDLL | None:
    """The loaded kernels, or ``None`` when disabled or not buildable here."""
    return _library() if enabled() else None


def _threads(rows: int) -> int:
    return max(1, min(torch.get_num_threads(), rows // MIN_ROWS_PER_THREAD))


def _usable(*tensors: torch.Tensor) -> bool:
    """CPU and contiguous (the kernels read raw memory; they are for inference, nothing is differentiated)."""
    return all(t.device.type == "cpu" and t.is_contiguous() for t in tensors)


def row_topk(
    scores: torch.Tensor, k: int, kernels: ctypes.CDLL | None = None
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(values [n, k], indices [n, k])``: each row's ``k`` largest entries, unsorted; ``None`` where the
    kernel does not apply (not a contiguous 2-D bfloat16/float32 CPU tensor, ``k`` out of range, kernels
    unavailable), so that the caller uses PyTorch. ``kernels`` overrides the library (tests)."""
    if scores.dtype not in _DTYPE_CODES or scores.dim() != 2 or not 1 <= k <= scores.shape[1] < MAX_WIDTH:
        return None
    kernels = kernels or library()
    if kernels is None or not _usable(scores):
        return None
    n, width = scores.shape
    values = torch.empty(n, k, dtype=scores.dtype)
    indices = torch.empty(n, k, dtype=torch.long)
    if n and kernels.hf_dataselect_topk_rows(
        scores.data_ptr(),
        _DTYPE_CODES[scores.dtype],
        n,
        width,
        k,
        values.data_ptr(),
        indices.data_ptr(),
        _threads(n),
    ):
        raise MemoryError("native row_topk: out of memory")
    return values, indices


def same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors hold the same bits (same dtype and shape): ``memcmp`` in C, several times faster
    than ``torch.equal`` on a 9 MiB encoder; ``torch.equal`` where the kernels are not there."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    kernels = library()
    if kernels is None or not _usable(a, b):
        return bool(torch.equal(a, b))
    return bool(kernels.hf_dataselect_same_bytes(a.data_ptr(), b.data_ptr(), a.numel() * a.element_size()))


def _pointer(tensor: torch.Tensor | None) -> int | None:
    return None if tensor is None else tensor.data_ptr()


def _encoder_operands(
    x: torch.Tensor,
    shift: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor,
    k: int,
    candidates: int,
    x_dtypes: tuple[torch.dtype, ...] = (torch.float32,),
) -> bool:
    """Whether ``x [n, d]`` (of ``x_dtypes``), ``shift [d]``, ``weight [L, d]``, ``bias [L]`` (float32) suit
    the kernels (CPU, contiguous); raises ``ValueError`` when their shapes, ``k`` or ``candidates`` disagree."""
    tensors = [t for t in (shift, weight, bias) if t is not None]
    if x.dtype not in x_dtypes or any(t.dtype != torch.float32 for t in tensors) or not _usable(x, *tensors):
        return False
    d, latents = weight.shape[1], weight.shape[0]
    if (
        x.dim() != 2
        or x.shape[1] != d
        or bias.shape != (latents,)
        or (shift is not None and shift.shape != (d,))
    ):
        raise ValueError("SAE kernels: x, shift, weight and bias shapes do not agree")
    if not 1 <= k <= candidates <= latents:
        raise ValueError(
            f"SAE kernels: need 1 <= k ({k}) <= candidates ({candidates}) <= latents ({latents})"
        )
    return True


def _screen_outputs(n: int, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (
        torch.empty(n, k, dtype=torch.float32),
        torch.empty(n, k, dtype=torch.long),
        torch.empty(n, dtype=torch.bool),
    )


def screened_topk(
    scores: torch.Tensor,
    candidates: int,
    x: torch.Tensor,
    shift: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor,
    k: int,
    kernels: ctypes.CDLL | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """The bfloat16 screen's steps 2–3 (:mod:`hf_dataselect.sae.screening`) for every row, in one pass:
    ``(values [n, k] float32 clamped at 0, indices [n, k], proven [n] bool)`` of the pre-activations
    ``weight (x - shift) + bias``, given the bfloat16 ``scores [n, L]``; ``None`` where the kernel does not
    apply."""
    if scores.dtype != torch.bfloat16 or scores.dim() != 2 or not _usable(scores):
        return None
    if not _encoder_operands(x, shift, weight, bias, k, candidates):
        return None
    n = scores.shape[0]
    if scores.shape != (x.shape[0], weight.shape[0]):
        raise ValueError("screened_topk: scores must be [tokens, latents]")
    kernels = kernels or library()
    if kernels is None:
        return None
    values, indices, proven = _screen_outputs(n, k)
    if n and kernels.hf_dataselect_screened_topk(
        scores.data_ptr(),
        n,
        weight.shape[0],
        candidates,
        x.data_ptr(),
        _pointer(shift),
        weight.data_ptr(),
        bias.data_ptr(),
        x.shape[1],
        k,
        values.data_ptr(),
        indices.data_ptr(),
        proven.data_ptr(),
        _threads(n),
    ):
        raise MemoryError("native screened_topk: out of memory")
    return values, indices, proven


def screen_inputs(
    x: torch.Tensor,
    inflate: float,
    rows: int | None = None,
    columns: int | None = None,
    kernels: ctypes.CDLL | None = None,
) -> torch.Tensor | None:
    """The bfloat16 screen's matmul inputs in one pass over ``x [n, d]`` (float32): ``[rows, columns]``
    bfloat16 ``[bf16(x), 1, ‖bf16([x, 1])‖·inflate, ‖x − bf16(x)‖·inflate]`` (norms in float64, rounded to
    nearest; zero-padded to ``rows >= n`` and ``columns >= d + 3``); ``None`` where the kernel does not
    apply."""
    if x.dtype != torch.float32 or x.dim() != 2 or not _usable(x):
        return None
    kernels = kernels or library()
    if kernels is None:
        return None
    n, d = x.shape
    rows, columns = rows or n, columns or d + 3
    if rows < n or columns < d + 3:
        raise ValueError(f"screen_inputs: [{rows}, {columns}] cannot hold [{n}, {d} + 3]")
    augmented = torch.empty(rows, columns, dtype=torch.bfloat16)
    augmented[n:] = 0
    if n and kernels.hf_dataselect_screen_inputs(
        x.data_ptr(), n, d, columns, inflate, augmented.data_ptr(), _threads(n)
    ):
        raise MemoryError("native screen_inputs: out of memory")
    return augmented


AMX_LATENTS, AMX_COLUMNS = 32, 32
"""Padding of the fused AMX kernel's weights: latents (two tiles of 16) and bfloat16 columns (one tile row of
64 bytes)."""


def amx_available(kernels: ctypes.CDLL | None = None) -> bool:
    """Whether :func:`amx_screened_topk` runs here: the kernels were built for a CPU with AMX tiles, and the
    operating system lets this process use them."""
    kernels = kernels or library()
    return kernels is not None and bool(kernels.hf_dataselect_has_amx())


def pack_for_amx(augmented: torch.Tensor) -> torch.Tensor:
    """The screen's ``[latents, d + 3]`` bfloat16 weights as AMX tiles read them: zero-padded to a multiple of 32
    latents and 32 columns, laid out ``[latent tile][column step][16 column pairs][16 latents][2]``."""
    latents, columns = augmented.shape
    padded_latents = -(-latents // AMX_LATENTS) * AMX_LATENTS
    padded_columns = -(-columns // AMX_COLUMNS) * AMX_COLUMNS
    padded = torch.zeros(padded_latents, padded_columns, dtype=torch.bfloat16)
    padded[:latents, :columns] = augmented
    tiles = padded.view(padded_latents // 16, 16, padded_columns // AMX_COLUMNS, AMX_COLUMNS // 2, 2)
    return tiles.permute(0, 2, 3, 1, 4).contiguous()


def amx_screened_topk(
    packed: torch.Tensor,
    candidates: int,
    x: torch.Tensor,
    shift: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor,
    k: int,
    inflate: float,
    kernels: ctypes.CDLL | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """:func:`screened_topk` from ``x`` itself, fused on AMX tiles: the step 1 inputs (as :func:`screen_inputs`
    with ``inflate``) are built per block of tokens, and the bfloat16 scores are accumulated in tiles and never
    stored; ``packed`` from :func:`pack_for_amx`. ``x`` may be bfloat16 (a bfloat16 model's hidden states,
    read as their exact float32 values without a float32 copy). ``None`` where AMX is not available."""
    if packed.dtype != torch.bfloat16 or packed.dim() != 5 or not _usable(packed):
        return None
    if not _encoder_operands(x, shift, weight, bias, k, candidates, x_dtypes=(torch.float32, torch.bfloat16)):
        return None
    n, d = x.shape
    latents = weight.shape[0]
    kp = packed.shape[1] * AMX_COLUMNS
    if kp < d + 3 or packed.shape[0] * 16 != -(-latents // AMX_LATENTS) * AMX_LATENTS:
        raise ValueError("amx_screened_topk: packed weights do not match the encoder")
    kernels = kernels or library()
    if kernels is None:
        return None
    values, indices, proven = _screen_outputs(n, k)
    if not n:
        return values, indices, proven
    status = kernels.hf_dataselect_amx_screened_topk(
        packed.data_ptr(),
        n,
        kp,
        latents,
        candidates,
        x.data_ptr(),
        int(x.dtype == torch.bfloat16),
        _pointer(shift),
        weight.data_ptr(),
        bias.data_ptr(),
        d,
        k,
        inflate,
        values.data_ptr(),
        indices.data_ptr(),
        proven.data_ptr(),
        _threads(n),
    )
    if status == -2:
        return None
    if status:
        raise MemoryError("native amx_screened_topk: out of memory")
    return values, indices, proven
