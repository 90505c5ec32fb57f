"""A stand-in for ``sgl_kernel`` so that SGLang's CPU engine starts without a GPU.

SGLang's CPU path (``SGLANG_USE_CPU_ENGINE=1 --device cpu``) imports two host ops from
``sgl_kernel`` while it starts. The ``sglang-kernel`` wheel on PyPI is built for CUDA
and fails to load where there is no ``libcuda.so.1``. This package, put first on the
server's ``PYTHONPATH``, provides those two ops in plain torch, which is all a small
dense model with ``--attention-backend torch_native`` needs. Asking for anything else
fails at once with an error naming the op, rather than somewhere deep in a forward pass.

SGLang also imports the host ops of speculative decoding (EAGLE) when it starts, whether
or not that is used; those names exist here too but raise ``NotImplementedError`` when
called, as no test runs a draft model.

No ``torch.ops.sgl_kernel`` operators are registered, so SGLang's check for the Intel
AMX backend (``hasattr(torch.ops.sgl_kernel, "convert_weight_packed")``) is false and it
keeps to its native torch layers.
"""

from __future__ import annotations

import ctypes

import torch

__version__ = "0.0.0+cpu-stub"

__all__ = ["assign_req_to_token_pool_cpu", "copy_all_layer_kv_cache_cpu"]

# Imported at start by sglang/kernels/ops/speculative/{spec_tree,cache_locs,eagle}.py
# under SGLANG_USE_CPU_ENGINE=1; only speculative decoding calls them.
SPECULATIVE_OPS = (
    "assign_draft_cache_locs_contiguous_cpu",
    "assign_extend_cache_locs_cpu",
    "build_tree_kernel_efficient_cpu",
    "fill_accept_out_cache_loc_cpu",
    "fill_bonus_tokens_cpu",
    "verify_tree_greedy_cpu",
)


def assign_req_to_token_pool_cpu(
    req_pool_indices: torch.Tensor,
    req_to_token: torch.Tensor,
    start_offset: torch.Tensor,
    end_offset: torch.Tensor,
    out_cache_loc: torch.Tensor,
    pool_len: int,
) -> None:
    """Scatter newly allocated KV slots into the request-to-token map, in place.

    For each request ``i`` of the batch, with ``n_i = end_offset[i] - start_offset[i]``::

        req_to_token[req_pool_indices[i], start_offset[i]:end_offset[i]] = next n_i of out_cache_loc

    ``out_cache_loc`` holds the slots of all requests back to back, in batch order.
    ``req_to_token`` is ``[max_requests, pool_len]`` int32; the slots are cast to its dtype.
    """
    if req_to_token.dim() != 2:
        raise ValueError(f"req_to_token must be 2-D, got shape {tuple(req_to_token.shape)}")
    if req_to_token.size(1) != pool_len:
        raise ValueError(f"req_to_token has {req_to_token.size(1)} columns, pool_len is {pool_len}")
    batch = req_pool_indices.numel()
    if start_offset.numel() != batch or end_offset.numel() != batch:
        raise ValueError("req_pool_indices, start_offset and end_offset must have one entry per request")
    if batch == 0:
        return
    device = req_to_token.device
    starts = start_offset.reshape(-1).to(device=device, dtype=torch.long)
    lengths = end_offset.reshape(-1).to(device=device, dtype=torch.long) - starts
    if bool((lengths < 0).any()):
        raise ValueError("end_offset is below start_offset for some request")
    total = int(lengths.sum())
    if total == 0:
        return
    if out_cache_loc.numel() < total:
        raise ValueError(f"out_cache_loc has {out_cache_loc.numel()} slots, the batch needs {total}")
    rows = torch.repeat_interleave(req_pool_indices.reshape(-1).to(device=device, dtype=torch.long), lengths)
    # Column of each slot: its request's start, plus its place within that request's run.
    run_begin = torch.cumsum(lengths, 0) - lengths
    cols = torch.arange(total, device=device) - torch.repeat_interleave(run_begin - starts, lengths)
    req_to_token[rows, cols] = out_cache_loc.reshape(-1)[:total].to(device=device, dtype=req_to_token.dtype)


def copy_all_layer_kv_cache_cpu(
    data_ptrs: torch.Tensor,
    strides: torch.Tensor,
    tgt_loc: torch.Tensor,
    src_loc: torch.Tensor,
) -> None:
    """Copy KV slots within every K and V buffer of the pool, in place.

    ``data_ptrs[b]`` (uint64) is the base address of buffer ``b``, and ``strides[b]`` (int64)
    the number of bytes of one slot row of it. For every buffer::

        buf_b[tgt_loc[i], :] = buf_b[src_loc[i], :]   for all i

    All source rows of a buffer are read before any target row is written, so the copy is
    right even when the two index lists overlap.
    """
    num_locs = tgt_loc.numel()
    if src_loc.numel() != num_locs:
        raise ValueError(f"tgt_loc has {num_locs} entries, src_loc {src_loc.numel()}")
    if data_ptrs.numel() != strides.numel():
        raise ValueError("data_ptrs and strides must have one entry per buffer")
    if num_locs == 0 or data_ptrs.numel() == 0:
        return
    tgt = tgt_loc.reshape(-1).to(torch.long)
    src = src_loc.reshape(-1).to(torch.long)
    if bool((tgt < 0).any()) or bool((src < 0).any()):
        raise ValueError("negative slot index")
    rows = int(torch.maximum(tgt.max(), src.max())) + 1
    # Addresses are stored as uint64; go through int64, which holds any user-space address.
    for ptr, stride in zip(data_ptrs.to(torch.int64).tolist(), strides.tolist(), strict=True):
        if stride <= 0:
            continue
        raw = (ctypes.c_uint8 * (rows * stride)).from_address(ptr)
        buf = torch.frombuffer(raw, dtype=torch.uint8).view(rows, stride)
        buf[tgt] = buf[src]


def _not_implemented(name: str):
    def op(*args: object, **kwargs: object) -> None:
        raise NotImplementedError(
            f"sgl_kernel.{name} is a placeholder in the CPU test stub (tests/engines/sgl_kernel_stub): "
            "speculative decoding is not supported there"
        )

    op.__name__ = op.__qualname__ = name
    return op


for _name in SPECULATIVE_OPS:
    globals()[_name] = _not_implemented(_name)
del _name


def __getattr__(name: str):
    if name.startswith("__"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    raise ImportError(
        f"sgl_kernel.{name} is not available: this sgl_kernel is the CPU test stub from "
        f"tests/engines/sgl_kernel_stub, which implements only {', '.join(__all__)} "
        "(and has placeholders for the speculative-decoding ops that SGLang imports at start). "
        "The server took a code path (model, attention backend or feature) that needs "
        "a real sgl_kernel op; use a plain dense model with --attention-backend torch_native.",
        name=__name__,
    )
