"""What this machine's CPU can do natively: its instruction-set flags, read once where a decision needs them
(bf16 training, int8 and bf16 deployment). A core module: it imports no torch.
"""

from __future__ import annotations

import os
from pathlib import Path

ISA_FLAGS = ("avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")
BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # a CPU with either computes bf16 natively (else it is emulated: slow)
# oneDNN's ISA levels, lowest first (ONEDNN_MAX_CPU_ISA caps the kernels of PyTorch's and OpenVINO's oneDNN), and
# the level each flag needs: above the cap a flag is there but unused (OpenVINO bf16 then fails, or crashes)
ONEDNN_ISA = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI",
              "AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX512_CORE_AMX", "AVX512_CORE_AMX_FP16", "ALL")  # fmt: skip
FLAG_ISA = {"avx512f": "AVX512_CORE", "avx512_vnni": "AVX512_CORE_VNNI", "avx512_bf16": "AVX512_CORE_BF16",
            "amx_tile": "AVX512_CORE_AMX", "amx_int8": "AVX512_CORE_AMX", "amx_bf16": "AVX512_CORE_AMX"}  # fmt: skip


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo", cap: str | None = None) -> set[str]:
    """The instruction-set flags of this CPU that its kernels may use (Linux /proc/cpuinfo; empty elsewhere):
    those above the oneDNN ISA cap (`cap`, default the ONEDNN_MAX_CPU_ISA environment variable) left out.

    Example:
        >>> isinstance(cpu_flags(), set)
        True
    """
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return set()
    line = next((line for line in text.splitlines() if line.startswith("flags")), None)
    flags = set(line.split(":", 1)[1].split()) if line else set()
    return capped(flags, os.environ.get("ONEDNN_MAX_CPU_ISA") if cap is None else cap)


def capped(flags: set[str], cap: str | None) -> set[str]:
    """`flags` less those whose oneDNN ISA level is above `cap` (an unknown or empty cap caps nothing).

    Example:
        >>> sorted(capped({"avx2", "avx512f", "amx_bf16"}, "avx2")), sorted(capped({"avx512f", "amx_bf16"}, ""))
        (['avx2'], ['amx_bf16', 'avx512f'])
    """
    level = (cap or "").strip().upper()
    if level not in ONEDNN_ISA:
        return flags
    top = ONEDNN_ISA.index(level)
    return {f for f in flags if ONEDNN_ISA.index(FLAG_ISA.get(f, "SSE41")) <= top}


def cpu_isa(flags: set[str] | None = None) -> dict[str, bool]:
    """The instruction sets that decide int8 and bf16 speed, present or not: AVX-512, VNNI, AMX, AVX512-BF16.

    Example:
        >>> cpu_isa({"avx512f", "amx_bf16"})["amx_bf16"], cpu_isa({"avx512f"})["amx_int8"]
        (True, False)
    """
    flags = cpu_flags() if flags is None else flags
    return {name: name in flags for name in ISA_FLAGS}


def native_bf16(flags: set[str] | None = None) -> str | None:
    """The flag that makes bf16 native on this CPU (AMX first), or None where bf16 would be emulated.

    Example:
        >>> native_bf16({"avx512f", "avx512_bf16"}), native_bf16({"avx2"})
        ('avx512_bf16', None)
    """
    flags = cpu_flags() if flags is None else flags
    return next((f for f in BF16_FLAGS if f in flags), None)
