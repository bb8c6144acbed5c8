"""KV blocks re-sharded by head between tensor-parallel sizes: every destination rank's shard,
assembled from the source ranks' shards by the plan, equals the shard cut from the full cache."""

from __future__ import annotations

import pytest
import torch

from pdserve.common.config import ArchConfig
from pdserve.common.kv_transfer.tp_reshard import HeadRun, apply_plan, reshard_plan
from pdserve.common.models.parallel import head_shard


def shards(full: torch.Tensor, arch: ArchConfig, tp: int) -> list[torch.Tensor]:
    out = []
    for r in range(tp):
        h = head_shard(arch, r, tp)
        out.append(full[..., h.kv_start:h.kv_start + h.num_kv, :].clone())
    return out


@pytest.mark.parametrize("heads,kv,src_tp,dst_tp", [
    (32, 8, 2, 1), (32, 8, 1, 2), (32, 8, 2, 4), (32, 8, 4, 2), (32, 8, 8, 2),
    (4, 2, 4, 1), (4, 2, 1, 4), (4, 2, 4, 2), (9, 3, 2, 1), (9, 3, 1, 2), (9, 3, 2, 3)])
def test_reshard_reproduces_destination_shards(heads, kv, src_tp, dst_tp):
    arch = ArchConfig("llama", 100, 64, 128, 1, heads, kv, 4)
    full = torch.randn(3, 2, 5, 4, kv, 4)  # [L, 2, n blocks, block_size, KV heads, D]
    src = shards(full, arch, src_tp)
    plan = reshard_plan(arch, src_tp, dst_tp)
    for d, want in enumerate(shards(full, arch, dst_tp)):
        got = torch.full_like(want, float("nan"))
        apply_plan(plan[d], src, got)
        assert torch.equal(got, want)


def test_runs_are_merged_and_replicas_spread():
    arch = ArchConfig("llama", 100, 64, 128, 1, 32, 8, 4)
    assert reshard_plan(arch, 2, 1) == [[HeadRun(0, 0, 0, 4), HeadRun(1, 0, 4, 4)]]
    arch = ArchConfig("llama", 100, 64, 128, 1, 4, 2, 4)  # TP=4: KV head 0 on ranks 0-1, head 1 on 2-3
    assert reshard_plan(arch, 4, 2) == [[HeadRun(0, 0, 0, 1)], [HeadRun(3, 0, 0, 1)]]
