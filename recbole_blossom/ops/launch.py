"""Launch compiled Triton kernels with less host time than ``kernel[grid](...)``.

The training step of BlossomSASRec is bound by the host at L <= 1024: each ``kernel[grid](*args)`` costs the
host ~40 us (a PyTorch op ~9 us), of which the launch itself is a fraction. The rest is Triton's per-call
Python: binding and specialising every argument, hashing the cache key, checking global values, and, in
Triton 3.6, building launch metadata and calling empty enter/exit hook chains around every launch.

:func:`launch` does Triton's work once per *launch key* (the meta-parameters, each tensor's dtype and 16-byte
alignment, every int argument's value, float arguments by type), per CUDA device, and then calls the compiled
kernel's launcher directly. The key is at least as fine as Triton's own specialisation (which looks at an int's
value only through ``== 1``, divisibility by 16 and its width, and at a tensor only through its dtype and
alignment), so a cached kernel is always the one Triton would pick. (Dropout seeds are device tensors, so a new
seed is no new key.)

The direct call is used only with the Triton versions whose launcher convention it was written for
(:data:`DIRECT_VERSIONS`), on compiled (not interpreted) kernels, and while no launch hook is registered (a
profiler such as proton); otherwise every call goes through ``kernel[grid]``, as before.
"""

try:
    import triton
    from triton import knobs
    from triton.runtime.driver import driver
    from triton.runtime.jit import JITFunction
except ImportError:  # CPU-only installs: nothing to launch
    triton = None

DIRECT_VERSIONS = ("3.6.",)  # CompiledKernel.run(grid x3, stream, function, metadata, launch metadata, hooks, *args)
MAX_KEYS = 4096  # a kernel's cache is cleared beyond this many launch keys (shapes that keep changing)

_direct_ok = triton is not None and triton.__version__.startswith(DIRECT_VERSIONS)
_driver = None  # (current_device, current_raw_stream), bound on the first direct launch


def _device_and_stream():
    """The current CUDA device and its current stream, as Triton launches on them."""
    global _driver
    if _driver is None:  # ``driver.active`` is made on first use: only once a GPU is there
        _driver = (driver.active.get_current_device, driver.active.get_current_stream)
    device = _driver[0]()
    return device, _driver[1](device)


def _hooks_registered():
    enter, leave = knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook
    return bool(getattr(enter, "calls", enter)) or bool(getattr(leave, "calls", leave))


class _Entry:
    __slots__ = ("run", "function", "packed", "tail")

    def __init__(self, compiled, tail):
        self.run = compiled.run  # the property loads the binary: read it before ``function``
        self.function = compiled.function
        self.packed = compiled.packed_metadata
        self.tail = tail


_CACHES = {}  # (kernel, device) -> {launch key: _Entry}: a loaded kernel belongs to one device


def _arg_key(arg):
    if isinstance(arg, int):  # bool included
        return arg
    if isinstance(arg, float):
        return float
    ptr = getattr(arg, "data_ptr", None)
    if ptr is None:
        raise TypeError(f"launch: unsupported kernel argument of type {type(arg).__name__}")
    return arg.dtype, ptr() % 16 == 0


def launch(kernel, grid, *args, **meta):
    """``kernel[grid](*args, **meta)`` (``grid`` a tuple; ``meta`` the constexpr arguments, passed by name, and
    launch options such as ``num_warps``), through the cached compiled kernel after the first call of a key."""
    if not (_direct_ok and isinstance(kernel, JITFunction)) or _hooks_registered():
        kernel[grid](*args, **meta)
        return
    key = (tuple(meta.items()), tuple(_arg_key(a) for a in args))
    device, stream = _device_and_stream()
    cache = _CACHES.setdefault((kernel, device), {})
    entry = cache.get(key)
    if entry is None:
        compiled = kernel[grid](*args, **meta)  # Triton binds, compiles or finds the kernel, and launches
        names = kernel.arg_names[len(args):]
        if len(cache) >= MAX_KEYS:
            cache.clear()
        if all(name in meta for name in names):  # every argument after the positional ones is a constexpr
            cache[key] = _Entry(compiled, tuple(meta[name] for name in names))
        return
    g = grid + (1, 1)
    entry.run(g[0], g[1], g[2], stream, entry.function, entry.packed, None, None, None, *args, *entry.tail)
