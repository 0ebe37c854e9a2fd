"""Triton kernels for the CUDA fast path (imported only where Triton and a GPU are present).

- `layer_norm`: one program per row over the whole width. PyTorch's kernel gives each row a small block, which
  at decode time (one row per sequence) leaves the GPU idle: ~7 us a call against ~2 us.
- `add_layer_norm`, `gelu_layer_norm`: a residual add or the decoder's GELU with the LayerNorm after it, in one
  pass (the sum and the normed rows both written), where separate kernels read and write the rows twice.
- `quick_gelu`: the vision encoder's activation in one pass instead of three.
- `decode_attention_append`: a decode step's attention, writing the step's key and value into the cache too.
- `linear_row`: a batch-1 decode step's matrix-vector products with their LayerNorm, bias, activation and
  residual inside, chained with programmatic dependent launch on Hopper (`use_pdl`).
Each is checked against PyTorch in benchmarks/gpu.py and, through the model, in tests/test_fast_path.py.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from kosmos2_cli.fast import marks, triton_key

triton_key.remember()  # a new process's first kernel: ~0.45 s less (see triton_key)
marks.watch_triton()


@triton.jit
def _normed(x, cols, inside, width, eps, w_ptr, b_ptr):
    """LayerNorm of one row held in fp32 (`inside` marks its `width` real columns), in fp32."""
    mean = tl.sum(x, axis=0) / width
    centred = tl.where(inside, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=0) / width + eps)
    w = tl.load(w_ptr + cols, mask=inside, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + cols, mask=inside, other=0.0).to(tl.float32)
    return centred * rstd * w + b


def _row_warps(block: int) -> int:
    """Warps for one program over a row of `block` columns."""
    return min(max(block // 256, 1), 16)


@triton.jit
def _layer_norm_kernel(x_ptr, w_ptr, b_ptr, y_ptr, x_stride, y_stride, width, eps, BLOCK: tl.constexpr,
                       L2: tl.constexpr = False):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    inside = cols < width
    x = tl.load(x_ptr + row * x_stride + cols, mask=inside, other=0.0).to(tl.float32)
    y = _normed(x, cols, inside, width, eps, w_ptr, b_ptr).to(y_ptr.dtype.element_ty)
    if L2:  # then F.normalize: the norm rounded to the rows' dtype, as PyTorch's is, and clamped at 1e-12
        f = tl.where(inside, y.to(tl.float32), 0.0)
        norm = tl.sqrt(tl.sum(f * f, axis=0)).to(y_ptr.dtype.element_ty).to(tl.float32)
        y = (f / tl.maximum(norm, 1e-12)).to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + row * y_stride + cols, y, mask=inside)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
               l2_normalize: bool = False) -> torch.Tensor:
    """LayerNorm over the last dimension, statistics in fp32 (as PyTorch computes them); with `l2_normalize`,
    F.normalize of the result in the same pass (the image features: three PyTorch kernels fewer to start)."""
    width = x.shape[-1]
    rows = x.reshape(-1, width)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty_like(rows)
    block = triton.next_power_of_2(width)
    _layer_norm_kernel[(rows.shape[0],)](rows, weight, bias, out, rows.stride(0), out.stride(0), width, eps,
                                          BLOCK=block, L2=l2_normalize, num_warps=_row_warps(block))
    return out.view(x.shape)


@triton.jit
def _add_layer_norm_kernel(x_ptr, h_ptr, w_ptr, b_ptr, s_ptr, y_ptr, width, eps, GELU: tl.constexpr,
                           BLOCK: tl.constexpr):
    """One row: s = x + h (ADD) or s = gelu(x) (GELU), rounded to the rows' dtype as the separate kernel rounds it;
    y = LayerNorm(s). Rows are contiguous."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    inside = cols < width
    x = tl.load(x_ptr + row * width + cols, mask=inside, other=0.0).to(tl.float32)
    if GELU:
        s = 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
    else:
        s = x + tl.load(h_ptr + row * width + cols, mask=inside, other=0.0).to(tl.float32)
    s = s.to(y_ptr.dtype.element_ty)
    if not GELU:
        tl.store(s_ptr + row * width + cols, s, mask=inside)
    y = _normed(s.to(tl.float32), cols, inside, width, eps, w_ptr, b_ptr)
    tl.store(y_ptr + row * width + cols, y.to(y_ptr.dtype.element_ty), mask=inside)


def _norm_launch(x: torch.Tensor, h: torch.Tensor | None, norm, gelu: bool) -> tuple[torch.Tensor, torch.Tensor]:
    width = x.shape[-1]
    x = x.contiguous()
    h = x if h is None else h.contiguous()
    total = torch.empty_like(x) if not gelu else x
    out = torch.empty_like(x)
    block = triton.next_power_of_2(width)
    _add_layer_norm_kernel[(x.numel() // width,)](x, h, norm.weight, norm.bias, total, out, width, norm.eps,
                                                  GELU=gelu, BLOCK=block, num_warps=_row_warps(block))
    return total, out


def add_layer_norm(x: torch.Tensor, h: torch.Tensor, norm: torch.nn.LayerNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + h, norm(x + h)) in one pass: a residual add and the LayerNorm that reads its result."""
    return _norm_launch(x, h, norm, gelu=False)


def gelu_layer_norm(x: torch.Tensor, norm: torch.nn.LayerNorm) -> torch.Tensor:
    """norm(gelu(x)) (exact erf GELU) in one pass: the decoder's feed-forward between its two products."""
    return _norm_launch(x, None, norm, gelu=True)[1]


@triton.jit
def _quick_gelu_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = offsets < n
    x = tl.load(x_ptr + offsets, mask=inside).to(tl.float32)
    y = x * tl.sigmoid(1.702 * x)
    tl.store(y_ptr + offsets, y.to(y_ptr.dtype.element_ty), mask=inside)


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """x * sigmoid(1.702 x) in one pass (eager PyTorch makes three over the encoder's widest activation)."""
    x = x.contiguous()
    out = torch.empty_like(x)
    n = x.numel()
    _quick_gelu_kernel[(triton.cdiv(n, 4096),)](x, out, n, BLOCK=4096, num_warps=8)
    return out


@triton.jit
def _decode_attention_append_kernel(q_ptr, kn_ptr, vn_ptr, k_ptr, v_ptr, slot_ptr, valid_ptr, used_ptr, done_ptr,
                                    out_ptr, q_sb, q_sh, kn_sb, kn_sh, vn_sb, vn_sh, k_sb, k_sh, k_ss, v_sb, v_sh,
                                    v_ss, slot_sb, valid_sb, o_sb, o_sh, capacity, scale, HEAD: tl.constexpr,
                                    BLOCK: tl.constexpr, DONE: tl.constexpr, PDL: tl.constexpr):
    if PDL:  # everything below reads what the kernels before wrote
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    b = tl.program_id(0)
    h = tl.program_id(1)
    dims = tl.arange(0, HEAD)
    here = tl.load(slot_ptr + b * slot_sb)
    # This step's key and value go into the cache (what a separate scatter did) and are used from registers.
    k_new = tl.load(kn_ptr + b * kn_sb + h * kn_sh + dims).to(k_ptr.dtype.element_ty)
    v_new = tl.load(vn_ptr + b * vn_sb + h * vn_sh + dims).to(v_ptr.dtype.element_ty)
    tl.store(k_ptr + b * k_sb + h * k_sh + here * k_ss + dims, k_new)
    tl.store(v_ptr + b * v_sb + h * v_sh + here * v_ss + dims, v_new)
    length = tl.minimum(tl.load(used_ptr + b), capacity)
    if DONE:  # a finished row's output is thrown away: it reads none of its cache
        length = tl.where(tl.load(done_ptr + b) != 0, 0, length)
    q = tl.load(q_ptr + b * q_sb + h * q_sh + dims).to(tl.float32) * scale
    best = tl.full((), -1.0e30, tl.float32)
    total = tl.zeros((), tl.float32)
    acc = tl.zeros((HEAD,), tl.float32)
    for start in range(0, length, BLOCK):
        slots = start + tl.arange(0, BLOCK)
        inside = slots < length
        # Keys, values and the valid flags load at once (masking the loads by the flags would wait for them).
        ok = (tl.load(valid_ptr + b * valid_sb + slots, mask=inside, other=0) != 0) & (slots != here)
        k = tl.load(k_ptr + b * k_sb + h * k_sh + slots[:, None] * k_ss + dims[None, :], mask=inside[:, None],
                    other=0.0)
        v = tl.load(v_ptr + b * v_sb + h * v_sh + slots[:, None] * v_ss + dims[None, :], mask=inside[:, None],
                    other=0.0)
        scores = tl.where(ok, tl.sum(k.to(tl.float32) * q[None, :], axis=1), -1.0e30)
        new_best = tl.maximum(best, tl.max(scores, axis=0))
        p = tl.where(ok, tl.exp(scores - new_best), 0.0)
        keep = tl.exp(best - new_best)
        v = tl.where(ok[:, None], v.to(tl.float32), 0.0)  # a padded slot's stale value must not reach the sum
        acc = acc * keep + tl.sum(p[:, None] * v, axis=0)
        total = total * keep + tl.sum(p, axis=0)
        best = new_best
    if (tl.load(valid_ptr + b * valid_sb + here) != 0) & (length > 0):
        score = tl.sum(k_new.to(tl.float32) * q, axis=0)
        new_best = tl.maximum(best, score)
        p = tl.exp(score - new_best)
        keep = tl.exp(best - new_best)
        acc = acc * keep + p * v_new.to(tl.float32)
        total = total * keep + p
    out = acc / tl.maximum(total, 1.0e-30)
    tl.store(out_ptr + b * o_sb + h * o_sh + dims, out.to(out_ptr.dtype.element_ty))


def decode_attention_append(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, keys: torch.Tensor,
                            values: torch.Tensor, slots: torch.Tensor, valid: torch.Tensor, used: torch.Tensor,
                            scale: float, block: int | None = None, warps: int | None = None,
                            done: torch.Tensor | None = None) -> torch.Tensor:
    """One decode step's attention: q, k_new, v_new (B, H, 1, D); the cache `keys`, `values` (B, H, S, D).

    Writes each row's new key and value at its slot `slots` (B, 1), then attends over the row's valid slots
    (`valid` (B, S)) below `used` (B,), read on the device so one CUDA graph serves every step. Decoding appends
    in order, so that is also causal. One launch a layer instead of a scatter per tensor, an index tensor and the
    attention; read-bound: each program streams its row's keys and values once, with an online softmax.
    Rows flagged in `done` (B,) (finished captions in a batch that goes on) read nothing and give zeros.
    """
    batch, heads, _, head_dim = q.shape
    if block is None or warps is None:  # measured (benchmarks/attention.py, H100): fastest for few / many rows
        block, warps = (128, 4) if batch * heads < 2048 else (64, 2)
    out = torch.empty(batch, heads, 1, head_dim, device=q.device, dtype=q.dtype)
    pdl = use_pdl(q.device)
    valid = valid.view(torch.uint8) if valid.dtype == torch.bool else valid
    flags = used if done is None else done.view(torch.uint8) if done.dtype == torch.bool else done
    _decode_attention_append_kernel[(batch, heads)](
        q, k_new, v_new, keys, values, slots, valid, used, flags, out, q.stride(0), q.stride(1), k_new.stride(0),
        k_new.stride(1), v_new.stride(0), v_new.stride(1), keys.stride(0), keys.stride(1), keys.stride(2),
        values.stride(0), values.stride(1), values.stride(2), slots.stride(0), valid.stride(0), out.stride(0),
        out.stride(1), keys.shape[2], scale, HEAD=head_dim, BLOCK=block, DONE=done is not None, PDL=pdl,
        num_warps=warps, **_launch(pdl),
    )
    return out


ACTIVATIONS = {"gelu": 1, "quick_gelu": 2}  # activations the one-row kernel applies after its product
# (BLOCK_N, BLOCK_K, warps) of the one-row kernel by weight shape (out, in): the fastest of 27 on an H100
# (benchmarks/gemv.py; 2.2-2.9 TB/s, where the default config lost up to 40%); other shapes by their height.
ROW_CONFIGS = {(6144, 2048): (4, 256, 4), (2048, 2048): (4, 1024, 8), (8192, 2048): (4, 1024, 4),
               (2048, 8192): (4, 1024, 8)}


def row_config(out_features: int, in_features: int) -> tuple[int, int, int]:
    if (out_features, in_features) in ROW_CONFIGS:
        return ROW_CONFIGS[(out_features, in_features)]
    return (4, 1024, 8) if out_features <= 4096 else (16, 512, 2) if out_features >= 32768 else (4, 1024, 4)


@triton.jit
def _row_chunk(acc, w, x_ptr, nw_ptr, nb_ptr, y_ptr, ks, K, mean, rstd, NORM: tl.constexpr):
    """acc + w @ x[ks] (x LayerNormed first when NORM), for one BLOCK_K-wide slab of the weight."""
    k_ok = ks < K
    x = tl.load(x_ptr + ks, mask=k_ok, other=0.0).to(tl.float32)
    if NORM:
        nw = tl.load(nw_ptr + ks, mask=k_ok, other=0.0).to(tl.float32)
        nb = tl.load(nb_ptr + ks, mask=k_ok, other=0.0).to(tl.float32)
        # Rounded to the activations' dtype, as the separate LayerNorm's output is.
        x = ((x - mean) * rstd * nw + nb).to(y_ptr.dtype.element_ty).to(tl.float32)
    return acc + tl.sum(w.to(tl.float32) * x[None, :], axis=1)


@triton.jit
def _linear_row_kernel(x_ptr, nw_ptr, nb_ptr, w_ptr, b_ptr, r_ptr, y_ptr, K, N, eps, NORM: tl.constexpr,
                       BIAS: tl.constexpr, ACT: tl.constexpr, RESIDUAL: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr, WIDTH: tl.constexpr, PDL: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    slab = tl.arange(0, BLOCK_K)
    rows = w_ptr + cols[:, None] * K
    # The first slab of weights does not depend on the kernel before: with programmatic dependent launch it
    # loads while that kernel finishes, and only then does this one wait for its input.
    first = tl.load(rows + slab[None, :], mask=col_ok[:, None] & (slab < K)[None, :], other=0.0)
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    mean = 0.0
    rstd = 1.0
    if NORM:  # every program takes the row's statistics itself (the row is a few KB, read from L2)
        whole = tl.arange(0, WIDTH)
        row = tl.load(x_ptr + whole, mask=whole < K, other=0.0).to(tl.float32)
        mean = tl.sum(row, axis=0) / K
        centred = tl.where(whole < K, row - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=0) / K + eps)
    acc = _row_chunk(tl.zeros((BLOCK_N,), tl.float32), first, x_ptr, nw_ptr, nb_ptr, y_ptr, slab, K, mean, rstd,
                     NORM)
    for start in range(BLOCK_K, K, BLOCK_K):
        ks = start + slab
        w = tl.load(rows + ks[None, :], mask=col_ok[:, None] & (ks < K)[None, :], other=0.0)
        acc = _row_chunk(acc, w, x_ptr, nw_ptr, nb_ptr, y_ptr, ks, K, mean, rstd, NORM)
    y = acc
    if BIAS:
        y += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    if ACT != 0 or RESIDUAL:
        y = y.to(y_ptr.dtype.element_ty).to(tl.float32)  # the product is rounded before what follows it
    if ACT == 1:
        y = 0.5 * y * (1.0 + tl.math.erf(y * 0.7071067811865476))
    if ACT == 2:
        y = y * tl.sigmoid(1.702 * y)
    if RESIDUAL:
        y = y + tl.load(r_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + cols, y.to(y_ptr.dtype.element_ty), mask=col_ok)


def use_pdl(device: torch.device) -> bool:
    """Programmatic dependent launch for the decode step's kernels: Hopper or newer, a Triton that has it, and
    not turned off (KOSMOS2_PDL=0)."""
    key = (device.type, device.index)
    if key not in _PDL:
        _PDL[key] = (device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9
                     and hasattr(getattr(tl.extra, "cuda", None), "gdc_wait")
                     and os.environ.get("KOSMOS2_PDL", "1").strip() != "0")
    return _PDL[key]


_PDL: dict = {}


def linear_row(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, norm: torch.nn.LayerNorm | None = None,
               activation: str | None = None, residual: torch.Tensor | None = None,
               config: tuple[int, int, int] | None = None) -> torch.Tensor:
    """residual + act(LayerNorm(x) @ weight.T + bias) for a single row x, in one kernel.

    A decode step at batch 1 reads every weight once, so it is as fast as its matrix-vector products stream
    weights: cuBLAS reached 1.2-2.3 TB/s on the decoder's shapes (1.7 on the head) with ~10 small kernels a layer
    around them. Here each product takes its LayerNorm (the row's statistics are recomputed per program: a few
    KB), bias, activation and residual with it, with a block shape measured per weight shape: four kernels a
    layer plus attention (H100: 1.84 -> 1.39 ms a step with programmatic dependent launch). Each intermediate is
    rounded to the activations' dtype where the separate kernels round it.
    """
    width = x.shape[-1]
    out_features = weight.shape[0]
    if weight.stride() != (width, 1):
        raise ValueError("linear_row needs a contiguous (out_features, in_features) weight")
    row = x.reshape(width).contiguous()
    residual = residual.reshape(out_features).contiguous() if residual is not None else None
    out = torch.empty(*x.shape[:-1], out_features, device=x.device, dtype=x.dtype)
    block_n, block_k, warps = config or row_config(out_features, width)
    pdl = use_pdl(x.device)
    block_k = min(block_k, triton.next_power_of_2(width))
    norm_w = norm.weight if norm is not None else weight  # (unused pointers when the flag is off)
    norm_b = norm.bias if norm is not None else weight
    eps = norm.eps if norm is not None else 0.0
    _linear_row_kernel[(triton.cdiv(out_features, block_n),)](
        row, norm_w, norm_b, weight, weight if bias is None else bias, weight if residual is None else residual,
        out, width, out_features, eps, NORM=norm is not None, BIAS=bias is not None,
        ACT=ACTIVATIONS[activation] if activation else 0, RESIDUAL=residual is not None, BLOCK_N=block_n,
        BLOCK_K=block_k, WIDTH=triton.next_power_of_2(width), PDL=pdl, num_warps=warps, **_launch(pdl),
    )
    return out


def _launch(pdl: bool) -> dict:
    return {"launch_pdl": True} if pdl else {}


@triton.jit
def _argmax_lse_kernel(x_ptr, token_ptr, logprob_ptr, stride, width, BLOCK: tl.constexpr):
    """One row: the first index of its largest value, and that value's log-softmax (-log sum exp(x - max)),
    accumulated online in fp32 over blocks of the row."""
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    best = tl.full([], -float("inf"), tl.float32)
    where = tl.full([], 0, tl.int64)
    total = tl.full([], 0.0, tl.float32)
    for start in range(0, width, BLOCK):
        inside = start + cols < width
        x = tl.load(x_ptr + row * stride + start + cols, mask=inside, other=-float("inf")).to(tl.float32)
        block_best = tl.max(x, axis=0)
        block_where = tl.argmax(x, axis=0)  # the first of equal maxima
        new_best = tl.maximum(best, block_best)
        total = total * tl.exp(best - new_best) + tl.sum(tl.where(inside, tl.exp(x - new_best), 0.0), axis=0)
        where = tl.where(block_best > best, start + block_where.to(tl.int64), where)
        best = new_best
    tl.store(token_ptr + row, where)
    tl.store(logprob_ptr + row, -tl.log(total))


def argmax_log_softmax(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(argmax, log_softmax at the argmax) of each row of (rows, vocab) logits: `argmax` and
    `log_softmax(logits.float())` gathered, in one read of the logits."""
    rows, width = logits.shape
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    tokens = torch.empty(rows, dtype=torch.long, device=logits.device)
    logprobs = torch.empty(rows, dtype=torch.float32, device=logits.device)
    _argmax_lse_kernel[(rows,)](logits, tokens, logprobs, logits.stride(0), width, BLOCK=4096, num_warps=8)
    return tokens, logprobs
