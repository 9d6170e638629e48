"""The hardware a run trains on: which device, in which precision, and what the numbers were computed on.

    from normnets_device import resolve_device, resolve_precision
    resolve_precision('auto', resolve_device('auto'))   # 'bf16' where the hardware computes it natively

Importing this module changes no process-wide state (`keep_freed_memory` does, when a script calls it).
"""
import ctypes, platform

import torch
from fastai.torch_core import default_device

__all__ = ['PRECISIONS', 'RuleError', 'resolve_device', 'cpuinfo', 'cpu_kind', 'machine_kind', 'native_bf16',
           'resolve_precision', 'device_name', 'keep_freed_memory']

PRECISIONS = ('auto', 'fp32', 'bf16', 'fp16')


class RuleError(ValueError):
    "A run that would break the exercise's rules or cannot train as asked."



def resolve_device(device) -> str:
    """'auto' -> fastai's default device ('cuda' where there is a GPU, else 'cpu'); else the device asked for,
    checked."""
    if device in (None, 'auto'): return default_device().type
    try: device = torch.device(device)
    except (RuntimeError, TypeError):
        raise RuleError(f"device {device!r}: expected auto, cpu, cuda, cuda:N or mps") from None
    available = {'cpu': 1, 'cuda': torch.cuda.device_count(), 'mps': int(torch.backends.mps.is_available())}
    if device.type not in available:
        raise RuleError(f"device {str(device)!r}: normnets trains on cpu, cuda or mps")
    if not available[device.type]: raise RuleError(f"device {str(device)!r}: none on this machine")
    if device.index is not None and device.index >= available[device.type]:
        raise RuleError(f"device {str(device)!r}: this machine has {available[device.type]} {device.type} "
                        "device(s), numbered from 0")
    return str(device)


def cpuinfo(field: str) -> str:
    """The first value of `field` in /proc/cpuinfo ('model name', 'flags'), or '' where there is none (not
    Linux)."""
    try:
        return next(line.split(':', 1)[1].strip() for line in open('/proc/cpuinfo') if line.startswith(field))
    except (OSError, StopIteration):
        return ''


def cpu_kind() -> str:
    """This CPU's kind, as normnets measures speed by it (benchmarks/speed.py's files, `JOBS_AT_ONCE`): 'amx'
    (Intel AMX tiles multiply bfloat16 matrices), 'bf16' (AVX512-BF16 instructions), else 'fp32' (no bfloat16
    arithmetic: oneDNN emulates it on AVX-512 CPUs without them, such as many Intel laptops). Read from
    /proc/cpuinfo; 'fp32' where PyTorch has no oneDNN."""
    if not torch.backends.mkldnn.is_available(): return 'fp32'
    flags = set(cpuinfo('flags').split())
    return 'amx' if 'amx_bf16' in flags else 'bf16' if 'avx512_bf16' in flags else 'fp32'


def machine_kind(device) -> str:
    "The kind of machine `device` is, as speed rules key it: 'cuda', 'mps' or 'cpu-' + `cpu_kind()`."
    device = torch.device(device)
    return f'cpu-{cpu_kind()}' if device.type == 'cpu' else device.type


def native_bf16(device) -> bool:
    """Whether `device` has bfloat16 arithmetic. A GPU from compute capability 8.0 on (A100, H100, RTX 30xx
    and later): `torch.cuda.is_bf16_supported()` also says yes for a T4 or V100, which emulate bfloat16 and
    have no bfloat16 convolutions. A CPU of kind 'amx' or 'bf16' (`cpu_kind`)."""
    device = torch.device(device)
    if device.type == 'cuda': return torch.cuda.get_device_capability(device) >= (8, 0)
    return device.type == 'cpu' and cpu_kind() != 'fp32'


def resolve_precision(precision: str, device) -> str:
    """'auto' -> 'bf16' where the hardware has bfloat16 arithmetic (`native_bf16`), 'fp16' (with loss scaling)
    on older GPUs, 'fp32' on other CPUs. Other values are checked and returned: fp16 trains only on a GPU."""
    if precision not in PRECISIONS:
        raise RuleError(f"unknown precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    on_gpu = torch.device(device).type == 'cuda'
    if precision == 'fp16' and not on_gpu:
        raise RuleError("precision 'fp16' needs a GPU: use bf16 or fp32 on a CPU")
    if precision != 'auto': return precision
    if native_bf16(device): return 'bf16'
    return 'fp16' if on_gpu else 'fp32'


def device_name(device, threads: int | None = None) -> str:
    """What computed the numbers: the GPU's name, or the CPU's model and the threads torch uses (or
    `threads`, those a run will use in a process of its own)."""
    device = torch.device(device)
    if device.type == 'cuda': return torch.cuda.get_device_name(device)
    cpu = cpuinfo('model name') or platform.processor() or platform.machine()
    threads = threads or torch.get_num_threads()
    return f"{cpu} (CPU, {threads} thread{'s' * (threads != 1)})"


def keep_freed_memory() -> bool:
    """Keep memory that PyTorch frees in the process, for the next step to reuse (Linux with glibc; elsewhere
    a no-op). By default glibc hands the few-MB activation buffers of each training step back to the OS and
    faults them in again, zeroed, on the next one: about 20,000 page faults a step (benchmarks/speed.py
    measures what they cost). Process-wide, and it stays set: scripts call it in their main, never on import.
    """
    if platform.system() != 'Linux' or platform.libc_ver()[0] != 'glibc': return False
    libc = ctypes.CDLL('libc.so.6')
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3   # mallopt's parameter numbers (malloc.h)
    # Blocks up to 32 MB (glibc's maximum) come from the heap instead of their own mmap, and the heap is
    # trimmed only when over 1 GB of it is free.
    return bool(libc.mallopt(M_MMAP_THRESHOLD, 32 << 20) and libc.mallopt(M_TRIM_THRESHOLD, 1 << 30))
