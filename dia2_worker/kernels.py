"""Kernels per frame of the serving path, split by region: what a CUDA graph of the frame replays.

A graph replays every kernel of a frame back to back at about 1.5-3 us each, so the count is the floor of
a frame's time at small batch. How they are counted:

- CUDA: the kernels the profiler records while a frame runs, each charged to the region function that
  launched it.
- CPU, eager code: the leaf operators the frame dispatches, a stand-in for the kernels the same code
  launches on CUDA: views and allocations without a kernel do not count; `scaled_dot_product_attention` and
  `rms_norm` count as one (one fused kernel on CUDA, several operators on the CPU).
- CPU, compiled code (torch.compile, the serving path's `compile` mode): each kernel Inductor generated counts
  as one, and so does each operator the compiled code calls (matrix products, attention, sorts).

Regions: `backbone` and `depformer` (the two transformers), `text machine` (the on-device text state
machine), `sampling` (CFG, sampling and the rest of the step's bookkeeping) and `codec decode` (one
streaming Mimi decode call for the frame). An operator belongs to the innermost of these functions on the
Python stack when it is dispatched. A compiled step is one graph whose kernels fuse work of several regions,
so it is counted as one region, `step`.
"""

from __future__ import annotations

import contextlib
import inspect
import sys
from collections import Counter
from types import CodeType
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

REGIONS = ("backbone", "depformer", "sampling", "text machine", "codec decode")
OTHER = "sampling"
FUSED = (F.scaled_dot_product_attention, F.rms_norm)
"""Functions that run as one kernel on CUDA and decompose into several operators on the CPU."""
_NO_KERNEL = {"empty", "empty_strided", "empty_like", "lift_fresh", "detach", "alias", "resize_",
              "sym_size", "sym_stride", "sym_numel", "sym_storage_offset"}
_HOST_SYNC = {"_local_scalar_dense", "is_nonzero", "nonzero", "equal"}
"""Operators whose result the host waits for (a value read back, a data-dependent shape)."""


def region_codes() -> dict[CodeType, str]:
    """The code objects that open a region."""
    from . import text
    from .mimi.streaming import StreamingDecoder
    from .model import Backbone, Depformer

    functions = {Backbone.forward: "backbone", Depformer.forward: "depformer", text.text_step: "text machine",
                 StreamingDecoder.decode_step: "codec decode"}
    return {inspect.unwrap(function).__code__: region for function, region in functions.items()}


def current_region(codes: dict[CodeType, str]) -> str:
    frame = sys._getframe(1)
    while frame is not None:
        region = codes.get(frame.f_code)
        if region is not None:
            return region
        frame = frame.f_back
    return OTHER


class OperatorCounter(TorchDispatchMode):
    """Counts the leaf operators dispatched inside it by region (see the module docstring), and the
    operators that wait for the device (`host_syncs`): a frame must have none."""

    def __init__(self) -> None:
        super().__init__()
        self.codes = region_codes()
        self.counts: Counter[str] = Counter()
        self.host_syncs: Counter[str] = Counter()
        self.fused_depth = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in _HOST_SYNC:  # a copy to the host, counted apart from kernels
            self.host_syncs[name] += 1
        elif not self.fused_depth and not func.is_view and name not in _NO_KERNEL:
            self.counts[current_region(self.codes)] += 1
        return func(*args, **(kwargs or {}))


class _FusedAsOne(TorchFunctionMode):
    """Charges one operator for each FUSED function and hides the operators it decomposes into."""

    def __init__(self, counter: OperatorCounter) -> None:
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func not in FUSED:
            return func(*args, **(kwargs or {}))
        counter = self.counter
        if not counter.fused_depth:
            counter.counts[current_region(counter.codes)] += 1
        counter.fused_depth += 1
        try:
            return func(*args, **(kwargs or {}))
        finally:
            counter.fused_depth -= 1


@contextlib.contextmanager
def count_operators() -> Iterator[OperatorCounter]:
    counter = OperatorCounter()
    with _FusedAsOne(counter), counter:
        yield counter


@contextlib.contextmanager
def region_ranges() -> Iterator[None]:
    """A profiler range `region::<name>` around every call of a region's function made inside, compiled or
    not: Dynamo runs a rewritten copy of a compiled function's code, found by its file, line and name."""
    from torch.profiler import record_function

    keys = {(code.co_filename, code.co_firstlineno, code.co_name): region for code, region in region_codes().items()}
    opened: list[tuple[object, record_function]] = []

    def hook(frame, event, arg) -> None:
        if event == "call":
            code = frame.f_code
            region = keys.get((code.co_filename, code.co_firstlineno, code.co_name))
            if region is not None:
                opened.append((frame, record_function(f"region::{region}").__enter__()))
        elif event == "return" and opened and opened[-1][0] is frame:
            opened.pop()[1].__exit__(None, None, None)

    previous = sys.getprofile()
    sys.setprofile(hook)
    try:
        yield
    finally:
        sys.setprofile(previous)
        while opened:
            opened.pop()[1].__exit__(None, None, None)


def count_profiled_kernels(call: Callable[[], object], device: torch.device, outside: str = OTHER) -> Counter[str]:
    """Kernels `call` runs by region, from the profiler, for frames whose code runs compiled (or eagerly on
    CUDA). CUDA: the device kernels. CPU: each C++ kernel Inductor generated (compiled with
    `cpp.enable_kernel_profile`, so each reports itself) and each operator called from outside any operator
    (by compiled code's wrapper or by eager code) that does work. A kernel belongs to the innermost region
    function on the Python stack when it is launched, else to `outside`: kernels compiled from several
    regions' code into one graph run outside all of them."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    if cuda:
        torch.cuda.synchronize()
    with profile(activities=activities) as prof:
        with region_ranges():
            call()
        if cuda:
            torch.cuda.synchronize()
    counts: Counter[str] = Counter()

    def walk(event, region: str, in_operator: bool) -> None:
        name = event.name
        if name.startswith("region::"):
            region = name.removeprefix("region::")
        counted = False
        if cuda:
            counts[region] += sum(1 for kernel in event.kernels if _is_kernel(kernel.name))
        elif "cpp_fused" in name or (name.startswith("aten::") and not in_operator and _does_work(name)):
            counts[region] += 1
            counted = True
        for child in event.cpu_children:  # what a counted operator calls is part of its kernel
            walk(child, region, in_operator or counted)

    for event in prof.events():
        if event.cpu_parent is None:
            walk(event, outside, False)
    return counts


def _does_work(name: str) -> bool:
    """Whether operator `aten::name` computes something, rather than making a view or an empty tensor."""
    op = name.removeprefix("aten::")
    if op in _NO_KERNEL:
        return False
    packet = getattr(torch.ops.aten, op, None)
    if packet is None:
        return True
    return not any(getattr(packet, overload).is_view for overload in packet.overloads())


def count_cuda_kernels(call: Callable[[], object]) -> Counter[str]:
    """Kernels `call` launches on CUDA by region: the profiler's device kernels, each charged to the region
    function that launched it."""
    return count_profiled_kernels(call, torch.device("cuda"))


def count_graph_kernels(replay: Callable[[], None]) -> int:
    """Kernels one replay of a captured CUDA graph runs, from the profiler's device activity."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        replay()
        torch.cuda.synchronize()
    return sum(1 for event in prof.events() if event.device_type == torch.autograd.DeviceType.CUDA
               and _is_kernel(event.name))


def _is_kernel(name: str) -> bool:
    """Device activity that is a kernel launch (not a memcpy/memset, which the profiler also lists)."""
    return not name.lower().startswith(("memcpy", "memset"))


@contextlib.contextmanager
def gpu_code_path(model: torch.nn.Module) -> Iterator[None]:
    """The serving path as a GPU runs it, on any device: the CPU batch-invariance policy off."""
    previous = model.batch_invariant
    model.set_batch_invariant(False)
    try:
        yield
    finally:
        model.set_batch_invariant(previous)
