"""Tensor parallelism as a transform on a finished model: `shard_model(model, comm)`.

Applied to the model built on the meta device, before it is materialised, so a rank only ever
allocates its shard. Per decoder layer, with N ranks and this rank's part of each dimension:

    qkv_proj   column-parallel  rows  | its q heads | its KV heads' k | its KV heads' v |
    o_proj     row-parallel     cols  | its q heads |            -> Attention output all-reduced
    gate_up    column-parallel  rows  | its gate slice | its up slice |
    down_proj  row-parallel     cols  | its intermediate slice |   -> MLP output all-reduced
    norms, rotary, q/k norms (Qwen3)  replicated

    embed_tokens  vocab-parallel: rows [start, start + ceil(V / N)); ids outside -> 0, all-reduced
    lm_head       vocab-parallel rows (or the tied embedding's): logits [T, V / N] gathered to
                  rank 0 ([T, V] there, None on the other ranks), which samples

The all-reduces of the attention and MLP outputs happen in the RMSNorm that follows each (the
layer's post-attention norm, the next layer's input norm, the final norm), replaced by
`ReducingRMSNorm`: `comm.all_reduce_add_rms_norm` sums the ranks' partial outputs, adds the
residual and normalises (one kernel over NVLink peer memory with all_reduce="fused", else the
all-reduce then the norm). The model's forward pass has no TP branch; the logits gather is
`LlamaForCausalLM.gather_logits`.

Head partition. KV heads go whole to ranks, as evenly as their count allows, each with the query
heads of its group (so GQA needs nothing across ranks); with fewer KV heads than ranks, each KV
head is replicated on N / num_kv_heads ranks that split its query heads:

    32 q / 8 kv, N=2     rank 0: q 0-15, kv 0-3        rank 1: q 16-31, kv 4-7
    9 q / 3 kv, N=2      rank 0: q 0-5, kv 0-1         rank 1: q 6-8, kv 2   (uneven: SmolLM2-135M)
    4 q / 2 kv, N=4      rank r: q r, kv r // 2        (kv 0 on ranks 0-1, kv 1 on ranks 2-3)

Weights. Each sharded parameter gets a loader in `model.weight_loaders` that takes the FULL
checkpoint tensor (`shard`: its index in a fused projection) and copies this rank's slice, so
`load_weights` shards HF safetensors and GGUF tensors as they are read. Dummy weights are drawn
per rank (a different random model than N=1's; benchmarks only).

`comm` is the rank's group (`engine/tp_comm.py`): rank, world_size, all_reduce(x) -> x,
all_reduce_add_rms_norm(x, residual, weight, eps, region, ops) -> (out, residual), gather_to_first(x) -> [.., N * x.shape[-1]] on rank 0, None elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pdserve.common.config import ArchConfig, ConfigError
from pdserve.common.models.llama import RMSNorm


def split(n: int, parts: int, index: int) -> tuple[int, int]:
    """(start, size) of part `index` of n items in `parts` parts as even as possible (earlier parts larger)."""
    base, extra = divmod(n, parts)
    return index * base + min(index, extra), base + (index < extra)


@dataclass(frozen=True)
class HeadShard:
    q_start: int
    num_q: int
    kv_start: int
    num_kv: int


def head_shard(arch: ArchConfig, rank: int, world_size: int) -> HeadShard:
    """This rank's query and KV heads (module docstring); ParallelConfig.check_model validated the sizes."""
    kv, heads = arch.num_kv_heads, arch.num_heads
    if kv >= world_size:
        kv_start, num_kv = split(kv, world_size, rank)
        group = heads // kv
        return HeadShard(kv_start * group, num_kv * group, kv_start, num_kv)
    per_rank = heads // world_size
    return HeadShard(rank * per_rank, per_rank, rank // (world_size // kv), 1)


def vocab_shard(vocab_size: int, rank: int, world_size: int) -> tuple[int, int]:
    """(start, rows): equal padded row counts, so the ranks' logits concatenate without sizes."""
    rows = -(-vocab_size // world_size)
    return rank * rows, rows


# ---- weight loaders -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Piece:
    """Rows (dim 0) or columns (dim 1) [src, src + size) of a full tensor of `full` along `dim`,
    copied to [dst, dst + size) of the local parameter."""
    full: int
    src: int
    size: int
    dst: int


class SliceLoader:
    """weight_loader(param, full_tensor, shard): copy this rank's slice; `pieces` keyed by the
    fused shard index (None for a plain tensor). Local rows past the pieces (vocab padding) are zeroed."""

    def __init__(self, name: str, dim: int, pieces: dict[int | None, Piece]):
        self.name, self.dim, self.pieces = name, dim, pieces

    def __call__(self, param: torch.Tensor, tensor: torch.Tensor, shard: int | None) -> None:
        p, dim = self.pieces[shard], self.dim
        expected = list(param.shape)
        expected[dim] = p.full
        if list(tensor.shape) != expected:
            raise ConfigError(f"checkpoint tensor for {self.name} has shape {tuple(tensor.shape)}, "
                              f"the model expects {tuple(expected)}")
        param.data.narrow(dim, p.dst, p.size).copy_(tensor.narrow(dim, p.src, p.size))
        end = max(q.dst + q.size for q in self.pieces.values())
        if end < param.shape[dim]:
            param.data.narrow(dim, end, param.shape[dim] - end).zero_()


# How each parameter of a quantized module splits, per checkpoint format and split (column-parallel
# "col": outputs; row-parallel "row": inputs): (tensor dim, split elements per tensor index along it)
# or None (the tensor is whole on every rank). G: the group size (inputs per scale / zero row).
_QUANT_SPLITS = {
    "fp8": {"weight": ((0, 1), (1, 1)), "weight_scale": ((0, 1), None), "input_scale": (None, None),
            "bias": ((0, 1), None)},
    "awq": {"qweight": ((1, 8), (0, 1)), "qzeros": ((1, 8), (0, "G")), "scales": ((1, 1), (0, "G")),
            "bias": ((0, 1), None)},
    "gptq": {"qweight": ((1, 1), (0, 8)), "qzeros": ((1, 8), (0, "G")), "scales": ((1, 1), (0, "G")),
             "g_idx": (None, (0, 1)), "bias": ((0, 1), None)},
    # GGUF blocks arrive in the running layout (gguf_blocks.to_running_layout): P inputs a word
    "gguf": {"qweight": ((1, 1), (0, "P")), "qzeros": ((1, 1), (0, "G")), "scales": ((1, 1), (0, "G")),
             "bias": ((0, 1), None)},
}


class QuantSliceLoader:
    """A quantized module's parameter under tensor parallelism: narrows the full checkpoint tensor to
    this rank's slice in the tensor's own units (packed words, groups), then hands it to the
    module's own weight_loader, which puts it into the running layout as at TP=1. A row-parallel
    GPTQ g_idx (global group ids) is rebased to the rank's groups."""

    def __init__(self, name: str, split: tuple[int, int | str] | None, pieces: dict[int | None, Piece],
                 group_size: int | None, rebase_groups: bool = False, per_word: int = 8):
        self.name, self.pieces, self.rebase_groups = name, pieces, rebase_groups
        self.dim, unit = split if split is not None else (None, 1)
        self.unit = {"G": group_size, "P": per_word}.get(unit, unit)
        self.group_size = group_size

    def __call__(self, param: torch.Tensor, tensor: torch.Tensor, shard: int | None) -> None:
        if self.dim is not None and tensor.numel() > 1:
            p = self.pieces[shard]
            if p.src % self.unit or p.size % self.unit:
                raise ConfigError(f"{self.name}: this rank's slice [{p.src}, {p.src + p.size}) of {p.full} does not "
                                  f"split the checkpoint's {self.unit}-wide units (packing or group size): "
                                  "use another --tensor-parallel-size")
            if tensor.dim() <= self.dim or tensor.shape[self.dim] != p.full // self.unit:
                raise ConfigError(f"checkpoint tensor for {self.name} has shape {tuple(tensor.shape)}, expected "
                                  f"{p.full // self.unit} along dim {self.dim}")
            tensor = tensor.narrow(self.dim, p.src // self.unit, p.size // self.unit)
            if self.rebase_groups:
                tensor = tensor - p.src // self.group_size
        loader = getattr(param, "weight_loader", None)
        if loader is not None:
            loader(param, tensor, shard)
        else:  # a plain parameter of the module (bias): the slice goes where the piece says
            p = self.pieces[shard]
            param.data.narrow(0, p.dst, p.size).copy_(tensor)


def shard_quantized(model, path: str, module: nn.Module, method: str, group_size: int | None,
                    desc_act: bool) -> None:
    """After prepare_model swapped the linear at `path` for a quantized module of this rank's sizes:
    its parameters' loaders, from the linear's registered slices (shard_model)."""
    plain = model.weight_loaders.pop(f"{path}.weight")
    model.weight_loaders.pop(f"{path}.bias", None)
    kind = 0 if plain.dim == 0 else 1  # column- or row-parallel
    if kind == 1 and getattr(module, "bias", None) is not None:
        raise ConfigError(f"{path}: a row-parallel quantized linear with a bias is not supported")
    if kind == 1 and method == "gptq" and desc_act:
        raise ConfigError(f"GPTQ act-order (desc_act) splits {path}'s inputs across ranks in another order "
                          "than its groups: not supported with --tensor-parallel-size > 1")
    for pname, _ in module.named_parameters(recurse=False):
        split = _QUANT_SPLITS[method][pname][kind]
        if group_size is None and split is not None and split[1] == "G":
            split = None  # one group over all inputs (group_size -1): every rank keeps its scales and zeros
        model.weight_loaders[f"{path}.{pname}"] = QuantSliceLoader(
            f"{path}.{pname}", split, plain.pieces, group_size,
            rebase_groups=pname == "g_idx" and kind == 1 and group_size is not None,
            per_word=32 // getattr(module, "bits", 4))


def local_output_sizes(model, path: str, layer: nn.Linear) -> list[int] | None:
    """This rank's output sizes of the (fused) linear at `path` under tensor parallelism, else None."""
    plain = model.weight_loaders.get(f"{path}.weight")
    if plain is None:
        return None
    if plain.dim == 1:
        return [layer.out_features]
    return [plain.pieces[i].size for i in sorted(k for k in plain.pieces if k is not None)] or [layer.out_features]


def _linear(old: nn.Linear, in_features: int, out_features: int) -> nn.Linear:
    return nn.Linear(in_features, out_features, bias=old.bias is not None, device=old.weight.device,
                     dtype=old.weight.dtype)


def _register(model, prefix: str, module: nn.Module, dim: int, pieces: dict[int | None, Piece]) -> None:
    for pname, _ in module.named_parameters(recurse=False):
        name = f"{prefix}.{pname}"
        model.weight_loaders[name] = SliceLoader(name, dim if pname == "weight" else 0, pieces)


# ---- vocab-parallel embedding ----------------------------------------------------------------------
class VocabParallelEmbedding(nn.Embedding):
    """This rank's rows [start, start + rows) of the embedding; other ids embed to 0 here and
    the all-reduce sums in the rank that holds them (exact: one non-zero term per element)."""

    def __init__(self, rows: int, hidden: int, start: int, vocab_size: int, comm, device, dtype):
        super().__init__(rows, hidden, device=device, dtype=dtype)
        self.start, self.end = start, min(start + rows, vocab_size)
        self.comm = comm

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        inside = (input_ids >= self.start) & (input_ids < self.end)  # [T]
        local = torch.where(inside, input_ids - self.start, 0)
        x = F.embedding(local, self.weight) * inside[:, None].to(self.weight.dtype)  # [T, hidden]
        return self.comm.all_reduce(x)


class GatherLogits:
    """This rank's logits [N, rows] -> all ranks' [N, vocab] on rank 0 (padding dropped), None elsewhere."""

    def __init__(self, comm, vocab_size: int):
        self.comm, self.vocab_size = comm, vocab_size

    def __call__(self, logits: torch.Tensor) -> torch.Tensor | None:
        full = self.comm.gather_to_first(logits.contiguous())
        return None if full is None else full[:, :self.vocab_size]


class ReducingRMSNorm(RMSNorm):
    """The RMSNorm after a row-parallel output: x is this rank's partial sum. Called without a
    residual (the first layer's input norm, on the embedding: already summed) it is a plain norm.
    `region` (0: post-attention norms, 1: input and final norms) alternates along the forward pass,
    as comm.all_reduce_add_rms_norm needs."""

    def __init__(self, old: RMSNorm, comm, region: int):
        super().__init__(old.weight.shape[0], old.eps, old.ops)
        self.weight = nn.Parameter(torch.empty_like(old.weight))
        self.comm, self.region = comm, region

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if residual is None:
            return super().forward(x)
        return self.comm.all_reduce_add_rms_norm(x, residual, self.weight, self.eps, self.region, self.ops)


# ---- the transform ---------------------------------------------------------------------------------
def shard_model(model, comm) -> None:
    """Replace model's projections, embedding and head by this rank's shards, in place (see module doc)."""
    cfg: ArchConfig = model.cfg
    rank, world = comm.rank, comm.world_size
    hs = head_shard(cfg, rank, world)
    d = cfg.head_dim
    i_start, i_size = split(cfg.intermediate_size, world, rank)
    for n, layer in enumerate(model.layers):
        layer.input_layernorm = ReducingRMSNorm(layer.input_layernorm, comm, 1)
        layer.post_attention_layernorm = ReducingRMSNorm(layer.post_attention_layernorm, comm, 0)
        attn, mlp = layer.self_attn, layer.mlp
        q, kv = hs.num_q * d, hs.num_kv * d
        attn.qkv_proj = _linear(attn.qkv_proj, cfg.hidden_size, q + 2 * kv)
        _register(model, f"layers.{n}.self_attn.qkv_proj", attn.qkv_proj, 0, {
            0: Piece(cfg.num_heads * d, hs.q_start * d, q, 0),
            1: Piece(cfg.num_kv_heads * d, hs.kv_start * d, kv, q),
            2: Piece(cfg.num_kv_heads * d, hs.kv_start * d, kv, q + kv)})
        attn.o_proj = _linear(attn.o_proj, q, cfg.hidden_size)
        _register(model, f"layers.{n}.self_attn.o_proj", attn.o_proj, 1,
                  {None: Piece(cfg.num_heads * d, hs.q_start * d, q, 0)})
        attn.num_heads, attn.num_kv_heads, attn.q_size, attn.kv_size = hs.num_q, hs.num_kv, q, kv
        old = attn.attn
        attn.attn = attn.ops.attention_backend(hs.num_q, hs.num_kv, d, old.block_size, old.sliding_window)

        mlp.gate_up_proj = _linear(mlp.gate_up_proj, cfg.hidden_size, 2 * i_size)
        _register(model, f"layers.{n}.mlp.gate_up_proj", mlp.gate_up_proj, 0, {
            0: Piece(cfg.intermediate_size, i_start, i_size, 0),
            1: Piece(cfg.intermediate_size, i_start, i_size, i_size)})
        mlp.down_proj = _linear(mlp.down_proj, i_size, cfg.hidden_size)
        _register(model, f"layers.{n}.mlp.down_proj", mlp.down_proj, 1,
                  {None: Piece(cfg.intermediate_size, i_start, i_size, 0)})
    model.norm = ReducingRMSNorm(model.norm, comm, 1)

    v_start, v_rows = vocab_shard(cfg.vocab_size, rank, world)
    vocab_piece = {None: Piece(cfg.vocab_size, v_start, max(0, min(v_rows, cfg.vocab_size - v_start)), 0)}
    old = model.embed_tokens.weight
    model.embed_tokens = VocabParallelEmbedding(v_rows, cfg.hidden_size, v_start, cfg.vocab_size, comm,
                                                old.device, old.dtype)
    _register(model, "embed_tokens", model.embed_tokens, 0, vocab_piece)
    if model.lm_head is not None:
        model.lm_head = _linear(model.lm_head, cfg.hidden_size, v_rows)
        _register(model, "lm_head", model.lm_head, 0, vocab_piece)
    model.gather_logits = GatherLogits(comm, cfg.vocab_size)
