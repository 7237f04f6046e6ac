"""Device backends: CUDA, and a CPU stand-in that runs the same code paths."""

from swapserve.engine.backend.base import Backend, Waiter


def make_backend(device: str, page_bytes: int) -> Backend:
    if device == "cpu":
        from swapserve.engine.backend.cpu import CpuBackend

        return CpuBackend(page_bytes)
    from swapserve.engine.backend.cuda import CudaBackend

    return CudaBackend(device, page_bytes)


__all__ = ["Backend", "Waiter", "make_backend"]
