"""Exact-size page-locked host memory for a host-offloaded cache.

torch's pinned-memory allocator (``pin_memory=True``) rounds every block up to a power of two, so a
731 MB branch takes 1 GiB of page-locked memory and a 117 GB cache up to ~170 GB. A
:class:`PinnedArena` instead allocates one ordinary (pageable) buffer of exactly the planned size,
registers it with CUDA (``cudaHostRegister``, through ``torch.cuda.cudart()``), and hands out
aligned, zeroed tensors from it in order; copies from and to it are asynchronous like any pinned
memory. Without CUDA (``pin=False``) it is a plain buffer. The arena is unregistered when closed
(after the device finished every copy) or garbage-collected.
"""

from __future__ import annotations

import os

import torch

ALIGN = 4096


def physical_memory() -> int | None:
    """Bytes of physical memory of this machine (``None`` where the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


class PinnedArena:
    """``capacity`` bytes of host memory, page-locked for CUDA when ``pin``.

    Raises:
        MemoryError: the memory cannot be allocated or registered (one line naming the size).
    """

    def __init__(self, capacity: int, pin: bool) -> None:
        self.capacity, self.used, self.pinned = capacity, 0, False
        try:
            self.buf = torch.empty(capacity, dtype=torch.uint8)
        except RuntimeError as err:
            raise MemoryError(f"cannot allocate {capacity / 2**30:.1f} GiB of host memory for the cache "
                              f"({str(err).splitlines()[0]}); lower cache.max_host_bytes") from None
        if pin and capacity:
            code = torch.cuda.cudart().cudaHostRegister(self.buf.data_ptr(), capacity, 0)
            code = int(getattr(code, "value", code))
            if code != 0:
                torch.cuda.cudart().cudaGetLastError()  # clear the sticky error
                raise MemoryError(f"cannot page-lock {capacity / 2**30:.1f} GiB of host memory for the cache "
                                  f"(cudaHostRegister error {code}); lower cache.max_host_bytes")
            self.pinned = True

    def take(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor | None:
        """A zeroed ``shape`` tensor of ``dtype`` from the arena, or ``None`` when it does not fit."""
        n = int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()
        start = -(-self.used // ALIGN) * ALIGN
        if start + n > self.capacity:
            return None
        t = self.buf[start:start + n].view(dtype).view(shape)
        t.zero_()
        self.used = start + n
        return t

    def close(self) -> None:
        """Unregister the memory (after the device finished its copies); the buffer stays valid."""
        if self.pinned:
            torch.cuda.synchronize()
            torch.cuda.cudart().cudaHostUnregister(self.buf.data_ptr())
            self.pinned = False

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass
