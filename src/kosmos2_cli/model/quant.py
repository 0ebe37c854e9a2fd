"""Weight-only int8 for the CPU: symmetric int8 weights, a bf16 scale per output channel and group of inputs.

Why: decoding one token reads every decoder weight once, so a token costs what moving the weights costs, and
int8 moves a quarter of fp32's bytes. Only the weights are rounded: activations stay fp32 between layers and
go into the matrix products as bf16.

Scales: one per output channel per `GROUP_SIZE` (256) input columns. Per-channel alone (one scale per whole
row) measured 3.2% relative logits error on full-size random weights; groups of 256 bring it to ~2.5% and
cost no speed (the int8 kernel is no slower on 256-wide slabs). A width that 256 does not divide gets one
scale per channel. Scales are rounded *up* to bf16 values before the weights are rounded, so the bf16 scales
the kernel takes are exact and the weights' own rounding is the only error.

Layout: `qweight` is (groups, out_features, group_size), each group's slab contiguous for the kernel.

Kernels, by how many rows go through the layer at once:
- a few rows (decoding steps, small batches or beams): `aten._weight_int8pack_mm` on each group's slab, which
  reads the int8 weights directly;
- many rows (the image encoder, the prompt): that kernel is compute-bound and slow there, so the weights are
  dequantized to bf16 a cache-sized block of channels at a time and multiplied by the bf16 GEMM (fast where the
  CPU has bf16 instructions); no full bf16 copy of a layer is ever made.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch
from torch import Tensor, nn

COMPUTE_DTYPE = torch.bfloat16
GROUP_SIZE = 256
# Up to this many rows the int8 GEMV kernel wins; beyond it, dequantized blocks + bf16 GEMM.
GEMV_MAX_ROWS = 8
# Elements of one dequantized block: 1 Mi bf16 = 2 MiB, about one core's L2 cache.
DEQUANT_BLOCK = 1 << 20
# Elements quantized at a time while loading (a 4 MiB float scratch block).
QUANT_BLOCK = 1 << 20

Release = Callable[[Tensor], None]


def group_size_for(in_features: int, group_size: int | None = None) -> int:
    """`group_size` (default GROUP_SIZE) where it divides the width, else the whole width (one scale per channel)."""
    group_size = GROUP_SIZE if group_size is None else group_size
    return group_size if 0 < group_size < in_features and in_features % group_size == 0 else in_features


def kernel_ok(group_size: int) -> bool:
    """Whether `_weight_int8pack_mm` can take slabs this wide: it returns garbage (or crashes) unless the
    reduction width is a multiple of 16."""
    return group_size % 16 == 0 and group_size > 0 and hasattr(torch.ops.aten, "_weight_int8pack_mm")


def bf16_scales(absmax: Tensor) -> Tensor:
    """absmax / 127, rounded up to the next bf16 value (so |w| / scale <= 127 still holds); 1 for zeros."""
    scale = torch.where(absmax > 0, absmax.float() / 127, torch.ones_like(absmax, dtype=torch.float32))
    rounded = scale.to(torch.bfloat16)
    low = rounded.float() < scale
    bumped = (rounded.view(torch.int16) + 1).view(torch.bfloat16)  # the next value up (scales are positive)
    return torch.where(low, bumped, rounded)


_scratch = threading.local()


def _buffer(name: str, numel: int, dtype: torch.dtype, device: torch.device | str = "cpu") -> Tensor:
    """A scratch block reused per thread: allocating big temporaries over and over costs page faults and
    fragments the heap (measured: +1.2 GB freed-but-held after quantizing the full model with temporaries)."""
    buffers = getattr(_scratch, "buffers", None)
    if buffers is None:
        buffers = _scratch.buffers = {}
    key = (name, dtype, str(device))
    buf = buffers.get(key)
    if buf is None or buf.numel() < numel:
        buf = buffers[key] = torch.empty(numel, dtype=dtype, device=device)
    return buf[:numel]


def free_scratch(name: str) -> None:
    """Drop this thread's scratch blocks called `name` (the loader's, once the model is in)."""
    buffers = getattr(_scratch, "buffers", {})
    for key in [key for key in buffers if key[0] == name]:
        del buffers[key]


def quantize(weight: Tensor, group_size: int | None = None, release: Release | None = None,
             out: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """(out, in) float weight -> qweight (groups, out, group) int8 and scales (groups, out) bf16.

    Works a block of rows at a time through one reused float scratch block (no full-size float temporary);
    `release(block)` is called on each finished block of the source, so a memory-mapped checkpoint's pages are
    handed back while loading. `out`: (qweight, scales) to write into (views of a preallocated block).
    """
    rows, cols = weight.shape
    size = group_size_for(cols) if group_size is None else group_size
    if cols % size:
        raise ValueError(f"group size {size} does not divide the width {cols}")
    groups = cols // size
    if out is None:
        out = (torch.empty((groups, rows, size), dtype=torch.int8, device=weight.device),
               torch.empty((groups, rows), dtype=torch.bfloat16, device=weight.device))
    q, scales = out
    if q.shape != (groups, rows, size) or scales.shape != (groups, rows):
        raise ValueError(f"int8 storage of shape {list(q.shape)} for a weight of {list(weight.shape)}")
    step = max(1, QUANT_BLOCK // cols)
    scratch = _buffer("quantize", min(step, rows) * cols, torch.float32, weight.device)
    for start in range(0, rows, step):
        source = weight[start : start + step]
        grouped = source.reshape(len(source), groups, size)
        low, high = torch.aminmax(grouped, dim=2)
        scale = bf16_scales(torch.maximum(high.float(), low.float().neg_()))
        block = scratch[: source.numel()].view(grouped.shape)
        # |w| / scale <= 127 by the scale's rounding up, so rounding alone lands in [-127, 127].
        torch.div(grouped, scale.float()[:, :, None], out=block).round_()
        q[:, start : start + step].copy_(block.transpose(0, 1))
        scales[:, start : start + step] = scale.t()
        if release is not None:
            release(source)
    return q, scales


def dequantize(qweight: Tensor, scales: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """The (out, in) float weights that qweight and scales stand for."""
    groups, rows, size = qweight.shape
    full = qweight.to(torch.float32) * scales.to(torch.float32)[:, :, None]
    return full.transpose(0, 1).reshape(rows, groups * size).to(dtype)


def gemv(x: Tensor, slabs: list[tuple[Tensor, Tensor]]) -> Tensor:
    """x (rows, in) bf16 @ weights.T through the int8 kernel, one group's slab at a time; fp32 out."""
    if len(slabs) == 1:
        return torch.ops.aten._weight_int8pack_mm(x, *slabs[0]).float()
    size = slabs[0][0].shape[1]
    parts = (x.view(len(slabs), 1, size) if x.shape[0] == 1 else
             x.view(x.shape[0], len(slabs), size).transpose(0, 1).contiguous()).unbind(0)
    outs = [torch.ops.aten._weight_int8pack_mm(part, q, s) for part, (q, s) in zip(parts, slabs, strict=True)]
    return torch.stack(outs).sum(0, dtype=torch.float32)


def dequant_matmul(x: Tensor, qweight: Tensor, scales: Tensor) -> Tensor:
    """x (rows, in) bf16 @ weights.T by the bf16 GEMM, dequantizing one cache-sized block of channels at a time."""
    groups, out_features, size = qweight.shape
    in_features = groups * size
    out = x.new_empty((x.shape[0], out_features))
    step = max(1, DEQUANT_BLOCK // in_features)
    rows = min(step, out_features)
    block = _buffer("dequantize", rows * in_features, COMPUTE_DTYPE, x.device)
    wide = _buffer("dequantize-fp32", rows * in_features, torch.float32, x.device)
    for start in range(0, out_features, step):
        stop = min(start + step, out_features)
        shape = (stop - start, groups, size)
        # int8 -> fp32, scale, -> bf16: three cache-resident passes, ~20% faster than one mixed-dtype multiply.
        staged = wide[: (stop - start) * in_features].view(shape)
        staged.copy_(qweight[:, start:stop].transpose(0, 1)).mul_(scales[:, start:stop].t()[:, :, None])
        weights = block[: (stop - start) * in_features].view(shape).copy_(staged)
        torch.mm(x, weights.view(stop - start, in_features).t(), out=out[:, start:stop])
    return out


def int8_matmul(x: Tensor, qweight: Tensor, scales: Tensor, slabs: list[tuple[Tensor, Tensor]] | None = None) -> Tensor:
    """x (rows, in), any float dtype -> x @ weights.T (rows, out), by the kernel that suits the row count.

    `slabs`: the per-group (qweight[g], scales[g]) views, when the caller keeps them (saves two ops a group).
    """
    x = x.to(COMPUTE_DTYPE)
    if x.requires_grad and torch.is_grad_enabled():
        # Outside no_grad (a gradient w.r.t. the input is wanted): differentiable ops on the whole weight.
        return x @ dequantize(qweight, scales, COMPUTE_DTYPE).t()
    if x.shape[0] <= GEMV_MAX_ROWS and kernel_ok(qweight.shape[2]):
        # The kernel loads its inputs with aligned vector loads: a fresh, aligned copy for views that are not.
        if not x.is_contiguous() or x.data_ptr() % 64:
            x = x.clone(memory_format=torch.contiguous_format)
        if slabs is None:
            slabs = list(zip(qweight.unbind(0), scales.unbind(0), strict=True))
        return gemv(x, slabs)
    return dequant_matmul(x.contiguous(), qweight, scales)


class Int8Weight(nn.Module):
    """Holds an int8 weight (`qweight`, `scales`) and fills it from a checkpoint's float (out, in) tensor.

    The loader's protocol: `weight_shape` is the checkpoint tensor's shape; `take_weight(tensor, release)`
    quantizes it (no float copy is kept). The buffers are left out of the state dict: checkpoints hold floats.
    """

    def _init_weight(self, rows: int, cols: int, device: torch.device | str | None, group_size: int | None) -> None:
        size = group_size_for(cols, group_size)
        self.weight_shape = (rows, cols)
        self.group_size = size
        self.register_buffer("qweight", torch.zeros((cols // size, rows, size), dtype=torch.int8, device=device),
                             persistent=False)
        self.register_buffer("scales", torch.ones((cols // size, rows), dtype=torch.bfloat16, device=device),
                             persistent=False)
        self._slabs: list[tuple[Tensor, Tensor]] | None = None  # per-group views, made when the weight is set

    def take_weight(self, source: Tensor, release: Release | None = None) -> None:
        if tuple(source.shape) != self.weight_shape:
            raise ValueError(f"weight of shape {list(source.shape)} for an int8 layer of {list(self.weight_shape)}")
        placed = not self.qweight.is_meta and self.qweight.device == source.device
        self.set_weight(*quantize(source, self.group_size, release, (self.qweight, self.scales) if placed else None))

    def set_weight(self, qweight: Tensor, scales: Tensor) -> None:
        self.qweight, self.scales = qweight, scales
        self.group_size = qweight.shape[2]
        self.weight_shape = (qweight.shape[1], qweight.shape[0] * qweight.shape[2])
        self._slabs = list(zip(qweight.unbind(0), scales.unbind(0), strict=True))

    def _apply(self, fn, recurse: bool = True):  # .to(), .cpu(), ...: keep the per-group views current
        super()._apply(fn, recurse)
        self._slabs = list(zip(self.qweight.unbind(0), self.scales.unbind(0), strict=True))
        return self

    def share_weight(self, other: Int8Weight) -> None:
        """Use another module's int8 rows and scales (the tied embedding / language-model head)."""
        self.set_weight(other.qweight, other.scales)

    def dequantized(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return dequantize(self.qweight, self.scales, dtype)


class Int8Linear(Int8Weight):
    """`nn.Linear` with int8 weights; the output has the input's dtype, the bias is added in fp32."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
                 group_size: int | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self._init_weight(out_features, in_features, device, group_size)
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None

    @classmethod
    def like(cls, linear: nn.Linear, group_size: int | None = None) -> Int8Linear:
        return cls(linear.in_features, linear.out_features, linear.bias is not None, linear.weight.device,
                   linear.weight.dtype, group_size)

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        out = int8_matmul(x.reshape(-1, self.in_features), self.qweight, self.scales, self._slabs).float()
        if self.bias is not None:
            out += self.bias
        return out.to(x.dtype).view(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, group_size={self.group_size}")


class Int8Embedding(Int8Weight):
    """`nn.Embedding` with int8 rows; looked-up rows are dequantized to the model's float dtype."""

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
                 group_size: int | None = None) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self.out_dtype = dtype
        self._init_weight(num_embeddings, embedding_dim, device, group_size)

    @classmethod
    def like(cls, embedding: nn.Embedding, group_size: int | None = None) -> Int8Embedding:
        return cls(embedding.num_embeddings, embedding.embedding_dim, embedding.padding_idx,
                   embedding.weight.device, embedding.weight.dtype, group_size)

    def forward(self, ids: Tensor) -> Tensor:
        flat = ids.reshape(-1)
        rows = self.qweight[:, flat].to(torch.float32) * self.scales[:, flat].to(torch.float32)[:, :, None]
        return rows.transpose(0, 1).reshape(*ids.shape, self.embedding_dim).to(self.out_dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8, group_size={self.group_size}"


def _side_by_side(tensors: list[Tensor]) -> Tensor | None:
    """The one tensor whose dim-1 slices the given views are, in order, if they are exactly that; else None."""
    first = tensors[0]
    total = sum(t.shape[1] for t in tensors)
    if first.stride(0) != total * first.stride(1) or any(t.stride() != first.stride() for t in tensors):
        return None
    offset = first.storage_offset()
    for t in tensors:
        if t.untyped_storage().data_ptr() != first.untyped_storage().data_ptr() or t.storage_offset() != offset:
            return None
        offset += t.shape[1] * t.stride(1)
    return first.as_strided((first.shape[0], total, *first.shape[2:]), first.stride(), first.storage_offset())


def fuse_linears(layers: list[Int8Linear]) -> Int8Linear:
    """One int8 layer computing the given ones' outputs side by side (same input width, same groups).

    The given layers become views of the fused weights, so fusing costs no memory; laid out side by side
    already (`allocate`), it copies nothing either.
    """
    fused = Int8Linear(layers[0].in_features, sum(m.out_features for m in layers), layers[0].bias is not None,
                       "meta", group_size=layers[0].group_size)
    qweight = _side_by_side([m.qweight for m in layers])
    scales = _side_by_side([m.scales for m in layers])
    if qweight is None or scales is None:
        qweight = torch.cat([m.qweight for m in layers], dim=1)
        scales = torch.cat([m.scales for m in layers], dim=1)
    fused.set_weight(qweight, scales)
    if fused.bias is not None:
        fused.bias = nn.Parameter(torch.cat([m.bias.detach() for m in layers]), requires_grad=False)
    start = 0
    for m in layers:
        stop = start + m.out_features
        m.set_weight(fused.qweight[:, start:stop], fused.scales[:, start:stop])
        if m.bias is not None:
            m.bias = nn.Parameter(fused.bias[start:stop], requires_grad=False)
        start = stop
    return fused


def _fusable(module: nn.Module) -> list[Int8Linear] | None:
    """q/k/v of an attention module, when they can be one layer (same shapes)."""
    layers = [getattr(module, name, None) for name in ("q_proj", "k_proj", "v_proj")]
    if all(isinstance(m, Int8Linear) for m in layers) and len({m.weight_shape for m in layers}) == 1:
        return layers
    return None


def allocate(model: nn.Module, device: torch.device | str = "cpu") -> None:
    """Place every int8 layer of a (meta-device) model in one block of int8 memory and one of scales.

    One allocation instead of hundreds: the heap does not fragment while loading (measured: ~200 MB held by
    glibc's heap otherwise), and q/k/v of an attention lie side by side, so fusing them copies nothing.
    """
    plan: list[list[Int8Weight]] = []
    seen: set[int] = set()
    for module in model.modules():
        group = _fusable(module)
        if group and not any(id(m) in seen for m in group):
            plan.append(group)
            seen.update(id(m) for m in group)
    for module in model.modules():
        if isinstance(module, Int8Weight) and id(module) not in seen and module.qweight.is_meta:
            if not any(module.qweight is other[0].qweight for other in plan):  # tied: filled through its twin
                plan.append([module])
            seen.add(id(module))

    def sizes(group: list[Int8Weight]) -> tuple[int, int, int, int]:
        groups, _, size = group[0].qweight.shape
        rows = sum(m.qweight.shape[1] for m in group)
        return groups, rows, size, -(-groups * rows * size // 64) * 64

    q_total = sum(sizes(group)[3] for group in plan)
    s_total = sum(-(-sizes(group)[0] * sizes(group)[1] // 32) * 32 for group in plan)
    q_block = torch.empty(q_total, dtype=torch.int8, device=device)
    s_block = torch.empty(s_total, dtype=torch.bfloat16, device=device)
    q_at = s_at = 0
    for group in plan:
        groups, rows, size, q_bytes = sizes(group)
        region = q_block[q_at : q_at + groups * rows * size].view(groups, rows, size)
        scales = s_block[s_at : s_at + groups * rows].view(groups, rows)
        q_at += q_bytes
        s_at += -(-groups * rows // 32) * 32
        start = 0
        for m in group:
            stop = start + m.qweight.shape[1]
            m.set_weight(region[:, start:stop], scales[:, start:stop])
            start = stop
    if hasattr(model, "tie_weights"):
        model.tie_weights()


def quantize_modules(model: nn.Module, group_size: int | None = None) -> nn.Module:
    """Swap every `nn.Linear` and the token embedding of a (meta-device) model for int8 twins, in place.

    Done before loading, so the loader quantizes each checkpoint tensor as it reads it. Norms, biases, the
    patch convolution, the image position table (resized as a table) and the learned queries stay in float.
    """
    token_embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, name, Int8Linear.like(child, group_size))
            elif child is token_embedding:
                setattr(module, name, Int8Embedding.like(child, group_size))
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return model


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, Int8Weight) for m in model.modules())


def fuse_attention(attention: nn.Module) -> None:
    """One int8 layer for an attention's q, k and v projections (they become views of it): fewer, larger calls."""
    attention.qkv = fuse_linears([attention.q_proj, attention.k_proj, attention.v_proj])
