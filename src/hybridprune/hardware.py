"""What this machine's CPU can do natively: its instruction-set flags, read once where a decision needs them
(bf16 training, int8 and bf16 deployment). A core module: it imports no torch.
"""

from __future__ import annotations

from pathlib import Path

ISA_FLAGS = ("avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")
BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # a CPU with either computes bf16 natively (else it is emulated: slow)


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> set[str]:
    """The instruction-set flags of this CPU (Linux /proc/cpuinfo; empty elsewhere).

    Example:
        >>> isinstance(cpu_flags(), set)
        True
    """
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


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
