"""ModelRunner: SchedulerOutput -> one forward pass over the paged KV cache -> RunnerOutput.

    scheduled requests --> flatten tokens (decodes first, then prefill chunks)
                       --> input_ids [T], positions [T], slot_mapping [T], AttentionMetadata
                       --> model.forward -> hidden [T, h] -> logits only at sampled rows
                       --> Sampler -> token per request (+ logprobs)

The runner owns the model, the KV tensors and per-request generators; it never touches the
scheduler or the block pool (block ids arrive in the SchedulerOutput).
"""

from __future__ import annotations

import torch

from pdserve.common.config import ArchConfig, CacheConfig, ConfigError, ModelConfig
from pdserve.common.engine.outputs import RunnerOutput, ScheduledRequest, SchedulerOutput
from pdserve.common.engine.sampler import Sampler, top_logprobs
from pdserve.common.models.attention import AttentionMetadata, PrefillSeq
from pdserve.common.models.loader import checkpoint_dtype, load_model, resolve_dtype


class ModelRunner:
    def __init__(self, model_cfg: ModelConfig, cache_cfg: CacheConfig, arch: ArchConfig, path: str,
                 max_model_len: int):
        self.arch = arch
        self.block_size = cache_cfg.block_size
        self.device = torch.device(model_cfg.device)
        self.dtype = resolve_dtype(model_cfg.dtype, checkpoint_dtype(path))
        self.model = load_model(model_cfg, path, arch, self.block_size, max_model_len + 1, self.dtype, self.device)
        self.num_blocks = cache_cfg.num_blocks or self._blocks_for_memory(cache_cfg)
        shape = (2, self.num_blocks, self.block_size, arch.num_kv_heads, arch.head_dim)
        # one tensor per layer: [2 (K, V), num_blocks, block_size, num_kv_heads, head_dim]
        self.kv_caches = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(arch.num_layers)]
        self.sampler = Sampler(self.device, model_cfg.seed)
        self._generators: dict[str, torch.Generator] = {}

    def bytes_per_block(self) -> int:
        a = self.arch
        return 2 * a.num_layers * self.block_size * a.num_kv_heads * a.head_dim * self.dtype.itemsize

    def _blocks_for_memory(self, cache_cfg: CacheConfig) -> int:
        num = int(cache_cfg.kv_cache_memory_gb * (1 << 30)) // self.bytes_per_block()
        if num < 1:
            raise ConfigError(f"--kv-cache-memory {cache_cfg.kv_cache_memory_gb} GB holds no KV block")
        return num

    # ---- one step -----------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> RunnerOutput:
        for req_id in sched.finished_req_ids:
            self._generators.pop(req_id, None)
        if sched.is_empty():
            return RunnerOutput(sampled_token_ids={})
        decodes = [s for s in sched.scheduled if s.num_tokens == 1]
        prefills = [s for s in sched.scheduled if s.num_tokens > 1]
        ordered = decodes + prefills
        input_ids, positions, slots = [], [], []
        bs = self.block_size
        for s in ordered:
            input_ids += s.input_token_ids
            for pos in range(s.start_pos, s.start_pos + s.num_tokens):
                positions.append(pos)
                slots.append(s.block_ids[pos // bs] * bs + pos % bs)
        dev = self.device
        meta = self._attention_metadata(decodes, prefills, torch.tensor(slots, dtype=torch.long, device=dev))
        hidden = self.model(torch.tensor(input_ids, dtype=torch.long, device=dev),
                            torch.tensor(positions, dtype=torch.long, device=dev), self.kv_caches, meta)

        # rows to sample: the last token of each request whose chunk reaches its end
        starts, offset = [], 0
        for s in ordered:
            starts.append(offset)
            offset += s.num_tokens
        sample_reqs = [s for s in ordered if s.sample]
        sample_rows = [st + s.num_tokens - 1 for st, s in zip(starts, ordered) if s.sample]
        out = RunnerOutput(sampled_token_ids={})
        if sample_rows:
            logits = self.model.compute_logits(hidden[sample_rows])
            gens = [self._generator(s) for s in sample_reqs]
            tokens, logprobs = self.sampler(logits, sample_reqs, self.arch.eos_token_ids, gens)
            out.sampled_token_ids = {s.req_id: t for s, t in zip(sample_reqs, tokens)}
            out.logprobs = logprobs
        for st, s in zip(starts, ordered):
            if s.params.prompt_logprobs is not None and s.start_pos < len(s.prompt_token_ids):
                out.prompt_logprobs[s.req_id] = self._prompt_logprobs(hidden[st:st + s.num_tokens], s)
        return out

    def _attention_metadata(self, decodes: list[ScheduledRequest], prefills: list[ScheduledRequest],
                            slot_mapping: torch.Tensor) -> AttentionMetadata:
        dev = self.device
        meta = AttentionMetadata(slot_mapping=slot_mapping, num_decode_tokens=len(decodes),
                                 decode_block_tables=None, decode_context_lens=None, decode_max_context=0)
        if decodes:
            width = max(len(s.block_ids) for s in decodes)
            meta.decode_block_tables = torch.tensor([s.block_ids + [0] * (width - len(s.block_ids)) for s in decodes],
                                                    dtype=torch.long, device=dev)
            lens = [s.start_pos + 1 for s in decodes]
            meta.decode_context_lens = torch.tensor(lens, dtype=torch.long, device=dev)
            meta.decode_max_context = max(lens)
        q_start = len(decodes)
        for s in prefills:
            ctx = s.start_pos + s.num_tokens
            num_blocks = -(-ctx // self.block_size)
            meta.prefills.append(PrefillSeq(q_start=q_start, q_len=s.num_tokens, context_len=ctx,
                                            block_table=torch.tensor(s.block_ids[:num_blocks], dtype=torch.long,
                                                                     device=dev)))
            q_start += s.num_tokens
        return meta

    def _generator(self, s: ScheduledRequest) -> torch.Generator | None:
        if s.params.seed is None or s.params.temperature == 0:
            return None
        gen = self._generators.get(s.req_id)
        if gen is None:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(s.params.seed)
            self._generators[s.req_id] = gen
        return gen

    def _prompt_logprobs(self, hidden: torch.Tensor, s: ScheduledRequest) -> list:
        """Entries for the prompt tokens predicted inside this chunk (token 0 has none)."""
        prompt = s.prompt_token_ids
        entries: list = [None] if s.start_pos == 0 else []
        # position p predicts token p + 1; only prompt tokens get entries
        last = min(s.start_pos + s.num_tokens, len(prompt) - 1)
        if last > s.start_pos:
            lp = torch.log_softmax(self.model.compute_logits(hidden[:last - s.start_pos]), dim=-1)
            for row, pos in enumerate(range(s.start_pos, last)):
                entries.append(top_logprobs(lp[row], prompt[pos + 1], s.params.prompt_logprobs)[1])
        return entries
