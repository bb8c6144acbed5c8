"""Calibrated int4 for `pdserve quantize`: GPTQ and AWQ run on activations of real text.

    calibration text --tokenizer--> S samples of L tokens
      -> HF transformers model, decoder layers one at a time (each moved to the device in fp32):
         the first layer's inputs are captured once; every layer's outputs feed the next
      gptq  per input of a layer (q/k/v share one, gate/up one, o, down), in that order:
            H = 2/n sum x x^T over the calibration tokens; each weight quantized column by column
            (in descending diag(H) order with act-order), the rounding error of a column spread
            over the columns not yet quantized through the Cholesky factor of H^-1 (the optimal
            update for the layer's output error on these inputs); groups are formed on the
            updated weights as they are reached. A later input is collected with the earlier
            projections already quantized, and the next layer sees this layer quantized.
      awq   per input: channel scales s = mean|x|^a (a searched on a grid, a = 0 is RTN) that
            minimise the projections' output error once w * s is rounded; 1/s is folded into
            what produces the input (the RMSNorm weight, v_proj's rows when o_proj reads them
            unsplit, up_proj's rows for down_proj); then each group's clipping range is searched
            (not for q/k, whose errors the attention scores amplify); round to nearest at last.
            The next layer sees this layer in full precision.
    -> per projection weight: (q [N, K] ints, scales [N, K/G], zeros [N, K/G], g_idx [K]),
       and the tensors AWQ changed (norm weights) -> writer.py packs them into the file layouts.

What the two methods do follows their papers (Frantar et al., "GPTQ"; Lin et al., "AWQ"); the
code is this project's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from pdserve.common.config import ConfigError
from pdserve.common.models.quantization.int4 import Int4Weight, fake_quantize, group_params, group_params_mse, rtn


def default_text() -> str:
    """The project's calibration text (shipped as package data of pdserve.services)."""
    from importlib.resources import files
    return str(files("pdserve.services") / "data" / "calibration_text.txt")


# each decoder layer's inputs: name, the projections reading it, what writes it (awq folds 1/s there)
INPUTS = (("attn_in", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "input_layernorm"),
          ("o_in", ("self_attn.o_proj",), "self_attn.v_proj"),
          ("mlp_in", ("mlp.gate_proj", "mlp.up_proj"), "post_attention_layernorm"),
          ("down_in", ("mlp.down_proj",), "mlp.up_proj"))
NO_CLIP = ("self_attn.q_proj", "self_attn.k_proj")


@dataclass
class Calibration:
    """What calibrated AWQ/GPTQ run on. text: a UTF-8 file (default: the project's
    services/data/calibration_text.txt), cut into up to num_samples pieces of seq_len tokens."""
    text: str | None = None
    num_samples: int = 128
    seq_len: int = 512
    device: str | None = None  # default: cuda when there is one
    batch_size: int = 8
    damp: float = 0.01  # gptq: added to H's diagonal, as a share of its mean
    grid: int = 20  # awq: points of the scale (0 .. 1) and clipping (1 .. 0.5) searches
    search_rows: int = 4096  # awq: calibration tokens the searches score (a random subset)
    mse_grid: int = 20  # gptq: ranges tried per group (group_params_mse); 0: the full range


def gptq(w: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int, sym: bool, act_order: bool,
         damp: float = 0.01, block: int = 128, zero_min: int = 1, mse_grid: int = 20) -> Int4Weight:
    """GPTQ of one weight w [N, K] given H [K, K] of its inputs. mse_grid > 0: each group's range
    is searched (group_params_mse: SmolLM2 perplexity 22.64 -> 22.07 sym, 22.24 -> 21.67 asym)."""
    w = w.float().clone()
    n, k = w.shape
    h = hessian.float().clone()
    dead = torch.diag(h) == 0  # inputs never active: their weights cannot matter
    h[dead, dead] = 1
    w[:, dead] = 0
    perm = (torch.argsort(torch.diag(h), descending=True, stable=True) if act_order
            else torch.arange(k, device=w.device))
    w, h = w[:, perm], h[perm][:, perm]
    u = _inverse_cholesky(h, damp)
    maxq = (1 << bits) - 1
    num_groups = k // group_size
    q = torch.zeros(n, k, dtype=torch.int32, device=w.device)
    scales = torch.zeros(n, num_groups, device=w.device)
    zeros = torch.zeros(n, num_groups, dtype=torch.int32, device=w.device)
    block = max(block // group_size, 1) * group_size  # groups never straddle a block
    for b0 in range(0, k, block):
        b1 = min(b0 + block, k)
        wb = w[:, b0:b1].clone()
        errors = torch.zeros_like(wb)
        ub = u[b0:b1, b0:b1]
        for j in range(b1 - b0):
            col = b0 + j
            g = col // group_size
            if col % group_size == 0:  # the group's range from its weights as updated so far
                if mse_grid:
                    scales[:, g], zeros[:, g] = group_params_mse(wb[:, j:j + group_size], bits, sym, zero_min,
                                                                 grid=mse_grid)
                else:
                    scales[:, g], zeros[:, g] = group_params(wb[:, j:j + group_size], bits, sym, zero_min)
            s, z = scales[:, g], zeros[:, g].float()
            qc = torch.clamp(torch.round(wb[:, j] / s) + z, 0, maxq)
            q[:, col] = qc.to(torch.int32)
            err = (wb[:, j] - (qc - z) * s) / ub[j, j]
            wb[:, j:] -= err[:, None] * ub[j, j:][None, :]
            errors[:, j] = err
        w[:, b1:] -= errors @ u[b0:b1, b1:]
    q_in = torch.empty_like(q)
    q_in[:, perm] = q
    g_idx = torch.empty(k, dtype=torch.int32, device=w.device)
    g_idx[perm] = (torch.arange(k, device=w.device) // group_size).to(torch.int32)
    return Int4Weight(q_in.cpu(), scales.cpu(), zeros.cpu(), g_idx.cpu())


def _inverse_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1; more damping until H is positive definite."""
    eye = torch.eye(h.shape[0], device=h.device)
    mean_diag = torch.diag(h).mean()
    for attempt in range(6):
        factor, info = torch.linalg.cholesky_ex(h + damp * (10 ** attempt) * mean_diag * eye)
        if not info:
            inverse = torch.cholesky_inverse(factor)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if not info:
                return upper
    raise ConfigError("gptq: the calibration inputs' Hessian stays singular after damping; give more calibration text")


def awq_scale(x: torch.Tensor, x_abs_mean: torch.Tensor, weights: list[torch.Tensor], bits: int, group_size: int,
              sym: bool, grid: int) -> torch.Tensor:
    """Per-input scales s [K] (weights are multiplied by s, inputs divided) minimising the output
    error of the rounded projections on the rows x [M, K]; a = 0 (s = 1, plain RTN) is on the grid."""
    w = torch.cat(weights).float()
    ref = x @ w.t()
    best, best_s = math.inf, torch.ones_like(x_abs_mean)
    for i in range(grid):
        s = x_abs_mean.pow(i / grid).clamp_min(1e-4)
        s = s / (s.max() * s.min()).sqrt()
        wq = fake_quantize(w * s, bits, group_size, sym) / s
        loss = float((x @ wq.t() - ref).pow(2).mean())
        if loss < best:
            best, best_s = loss, s
    return best_s


def awq_clip(w: torch.Tensor, x: torch.Tensor, bits: int, group_size: int, sym: bool, grid: int,
             max_shrink: float = 0.5, rows_per_chunk: int = 256) -> torch.Tensor:
    """w [N, K] with each (output, group) clamped to the +-range (a share of its largest |w|) whose
    rounding gives the smallest output error on the rows x [M, K]."""
    n, k = w.shape
    num_groups = k // group_size
    xg = x.view(-1, num_groups, group_size)
    out = torch.empty_like(w)
    for r0 in range(0, n, rows_per_chunk):
        wg = w[r0:r0 + rows_per_chunk].view(-1, num_groups, group_size)
        amax = wg.abs().amax(dim=2, keepdim=True)
        best_err = torch.full(wg.shape[:2], math.inf, device=w.device)
        best_max = amax.clone()
        for i in range(int(max_shrink * grid)):
            limit = amax * (1 - i / grid)
            clipped = torch.maximum(torch.minimum(wg, limit), -limit)
            wq = fake_quantize(clipped.reshape(-1, k), bits, group_size, sym).view_as(wg)
            err = torch.einsum("mgj,ngj->mng", xg, wg - wq).pow(2).sum(dim=0)  # [rows, groups]
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_max = torch.where(better[..., None], limit, best_max)
        out[r0:r0 + rows_per_chunk] = torch.maximum(torch.minimum(wg, best_max), -best_max).view(-1, k)
    return out


def calibration_samples(tokenizer, text: str, num_samples: int, seq_len: int) -> torch.Tensor:
    """[S, L] token ids: consecutive pieces of the text. With fewer tokens than num_samples x
    seq_len the pieces are as many as fit (a short text gets shorter pieces, at least 64 tokens)."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) < 128:
        raise ConfigError(f"calibration text has {len(ids)} tokens; give at least 128 (--calibration-data)")
    seq_len = min(seq_len, max(64, len(ids) // 4))  # at least 4 pieces where the text allows
    count = min(num_samples, len(ids) // seq_len)
    return torch.tensor(ids[:count * seq_len]).view(count, seq_len)


def _to(obj, device, dtype=torch.float32):
    if isinstance(obj, torch.Tensor):
        return obj.to(device, dtype) if obj.is_floating_point() else obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device, dtype) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device, dtype) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device, dtype) for k, v in obj.items()}
    return obj


class _Captured(Exception):
    pass


def _decoder(model):
    """The transformers model's stack of decoder layers' owner (embeddings, rotary, `layers`)."""
    return model.get_decoder() if hasattr(model, "get_decoder") else model.model


def _layer_inputs(model, samples: torch.Tensor, device: str, batch_size: int) -> list:
    """(hidden [b, L, D] fp32, kwargs) of the first decoder layer for each batch of samples."""
    base = _decoder(model)
    for name in ("embed_tokens", "rotary_emb"):
        if hasattr(base, name):
            getattr(base, name).to(device, torch.float32)
    captured = []

    def grab(module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        kwargs = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        captured.append((hidden.to(device, torch.float32), _to(kwargs, device)))
        raise _Captured

    handle = base.layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for b0 in range(0, samples.shape[0], batch_size):
            try:
                model(input_ids=samples[b0:b0 + batch_size].to(device), use_cache=False)
            except _Captured:
                pass
    finally:
        handle.remove()
    for name in ("embed_tokens", "rotary_emb"):
        if hasattr(base, name):
            getattr(base, name).to("cpu")
    return captured


def _run_layer(layer, inputs: list, hooks: dict | None = None) -> list:
    """Runs the layer on every batch; hooks: module -> fn(x [rows, K]) called with each input.

    Every position counts, the first one too: the first token of a sequence becomes the
    attention sink, whose hidden state carries massive activations in a few channels (SmolLM2-
    135M: 46x the median row norm at the inputs of late down_proj layers). Those rows dominate H,
    and leaving them out is far worse (SmolLM2 GPTQ perplexity 54 instead of 22-27: the sink's
    own outputs break); with them in, GPTQ needs act-order on such a model (docs/quantization.md)."""
    handles = []
    for module, fn in (hooks or {}).items():
        handles.append(module.register_forward_hook(
            lambda m, args, out, fn=fn: fn(args[0].reshape(-1, args[0].shape[-1]).float())))
    try:
        outs = []
        for hidden, kwargs in inputs:
            out = layer(hidden, **kwargs)
            outs.append((out[0] if isinstance(out, tuple) else out, kwargs))
        return outs
    finally:
        for h in handles:
            h.remove()


class _Hessian:
    def __init__(self):
        self.h, self.n = None, 0

    def add(self, x: torch.Tensor) -> None:
        x = x.double()
        if self.h is None:
            self.h = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=x.device)
        self.h += x.t() @ x
        self.n += x.shape[0]

    def value(self) -> torch.Tensor:
        return (2 * self.h / self.n).float()


class _Activations:
    """mean |x| per input over every row, and a random subset of rows for the searches."""

    def __init__(self, rows_per_batch: int, generator: torch.Generator):
        self.abs_sum, self.n, self.rows, self.per_batch, self.gen = None, 0, [], rows_per_batch, generator

    def add(self, x: torch.Tensor) -> None:
        s = x.abs().sum(dim=0)
        self.abs_sum = s if self.abs_sum is None else self.abs_sum + s
        self.n += x.shape[0]
        self.rows.append(x[torch.randperm(x.shape[0], generator=self.gen)[:self.per_batch].to(x.device)])

    def mean(self) -> torch.Tensor:
        return self.abs_sum / self.n

    def sample(self, m: int) -> torch.Tensor:
        rows = torch.cat(self.rows)
        return rows[torch.randperm(rows.shape[0], generator=self.gen)[:m].to(rows.device)]


def calibrate(src: str, method: str, group_size: int, sym: bool, act_order: bool, cal: Calibration,
              bits: int = 4, log=None) -> tuple[dict[str, Int4Weight], dict[str, torch.Tensor]]:
    """-> (checkpoint weight name of each projection -> its int4 weight, name -> tensor AWQ changed)."""
    import transformers
    if method not in ("awq", "gptq"):
        raise ConfigError(f"calibration is for awq and gptq, not {method!r}")
    device = cal.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        if torch.device(device).type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"--device {device}: this machine has no CUDA device")
    except RuntimeError as e:
        raise ConfigError(f"--device {device}: {e}") from None
    text_path = cal.text or default_text()
    try:
        with open(text_path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(f"--calibration-data {text_path}: {e.strerror}") from None
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(src)
    except Exception as e:  # noqa: BLE001 - any load failure means the same to the user
        raise ConfigError(f"calibration needs the model's tokenizer in {src}: {e}") from None
    samples = calibration_samples(tokenizer, text, cal.num_samples, cal.seq_len)
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype="auto").eval()
    except (OSError, ValueError) as e:  # missing or unreadable weights, an index that does not match them
        raise ConfigError(f"calibration could not load {src} with transformers: {e}") from None
    layers = _decoder(model).layers
    prefix = next(name for name, module in model.named_modules() if module is layers) + "."
    gen = torch.Generator().manual_seed(0)
    results: dict[str, Int4Weight] = {}
    changed: dict[str, torch.Tensor] = {}
    with torch.inference_mode():
        inputs = _layer_inputs(model, samples, device, cal.batch_size)
        for i, layer in enumerate(layers):
            dtype = next(layer.parameters()).dtype
            layer.to(device, torch.float32)
            name = f"{prefix}{i}."
            if method == "gptq":
                inputs = _gptq_layer(layer, inputs, name, results, group_size, sym, act_order, cal, bits)
            else:
                inputs = _awq_layer(layer, inputs, name, results, changed, group_size, sym, cal, bits, gen)
            layer.to("cpu", dtype)
            if log:
                log(f"calibrated layer {i + 1}/{len(layers)}")
    return results, changed


def _gptq_layer(layer, inputs, name, results, group_size, sym, act_order, cal, bits) -> list:
    for _, projs, _ in INPUTS:  # each input collected with the earlier projections quantized
        modules = [layer.get_submodule(p) for p in projs]
        hessian = _Hessian()
        _run_layer(layer, inputs, {modules[0]: hessian.add})
        h = hessian.value()
        for proj, module in zip(projs, modules):
            result = gptq(module.weight.data, h, bits, group_size, sym, act_order, damp=cal.damp,
                          mse_grid=cal.mse_grid)
            results[f"{name}{proj}.weight"] = result
            module.weight.data.copy_(result.dequantize().to(module.weight.device))
    return _run_layer(layer, inputs)  # the next layer reads this one quantized


def _awq_layer(layer, inputs, name, results, changed, group_size, sym, cal, bits, gen) -> list:
    per_batch = -(-cal.search_rows // len(inputs))
    stats = {key: _Activations(per_batch, gen) for key, _, _ in INPUTS}
    hooks = {layer.get_submodule(projs[0]): stats[key].add for key, projs, _ in INPUTS}
    outputs = _run_layer(layer, inputs, hooks)  # the next layer reads this one in full precision
    rows = {}
    for key, projs, writer in INPUTS:
        modules = [layer.get_submodule(p) for p in projs]
        x = stats[key].sample(cal.search_rows)
        producer = layer.get_submodule(writer)
        if producer.weight.shape[0] != x.shape[1]:  # o_proj under GQA: its input is v's heads repeated
            rows[key] = x
            continue
        s = awq_scale(x, stats[key].mean(), [m.weight.data for m in modules], bits, group_size, sym, cal.grid)
        producer.weight.data.div_(s.view(-1, *([1] * (producer.weight.dim() - 1))))
        if getattr(producer, "bias", None) is not None:
            producer.bias.data.div_(s)
        for m in modules:
            m.weight.data.mul_(s)
        rows[key] = x / s
        if writer.endswith("layernorm"):
            changed[f"{name}{writer}.weight"] = producer.weight.data.cpu().clone()
    for key, projs, _ in INPUTS:
        clip_rows = rows[key][:512]
        for proj in projs:
            w = layer.get_submodule(proj).weight.data
            if proj not in NO_CLIP:
                w = awq_clip(w.float(), clip_rows, bits, group_size, sym, cal.grid)
            results[f"{name}{proj}.weight"] = rtn(w, bits, group_size, sym)
    return outputs
