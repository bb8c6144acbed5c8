"""KVLayout checks, the staging layout of gather/scatter, and the wire headers."""

from __future__ import annotations

import os

import pytest
import torch
from kv_cases import make_caches

from pdserve.common.kv_transfer import wire
from pdserve.common.kv_transfer.base import (KVLayout, KVTransferError, PullPhases, layer_views,
                                             split_address)
from pdserve.common.kv_transfer.blocks import BlockCopier, StagingBuffer, block_runs, stacked_view

CACHE = dict(num_layers=3, block_size=4, num_kv_heads=2, head_dim=8)


def test_bytes_per_block_of_llama3_8b():
    layout = KVLayout(num_layers=32, num_blocks=1000, block_size=16, num_kv_heads=8,
                      head_dim=128, dtype="bfloat16")
    assert layout.bytes_per_block == 2 * 1024 * 1024  # 64 KiB per layer (K+V) x 32 layers
    assert 128 * layout.bytes_per_block == 256 * 1024 * 1024  # a 2048-token prompt


@pytest.mark.parametrize("field, value", [("num_layers", 0), ("head_dim", -1),
                                          ("block_size", 2.0), ("dtype", "int8")])
def test_layout_rejects_bad_fields(field, value):
    args = dict(num_layers=2, num_blocks=4, block_size=16, num_kv_heads=2, head_dim=8,
                dtype="float16")
    args[field] = value
    with pytest.raises(ValueError, match=f"KVLayout.{field}"):
        KVLayout(**args)


def test_layout_from_caches_and_its_errors():
    caches = make_caches(num_blocks=5, dtype=torch.bfloat16, seed=0, **CACHE)
    assert KVLayout.from_caches(caches) == KVLayout(3, 5, 4, 2, 8, "bfloat16")
    with pytest.raises(ValueError, match="kv_caches is empty"):
        KVLayout.from_caches([])
    with pytest.raises(ValueError, match=r"kv_caches\[1\] is"):
        KVLayout.from_caches([caches[0], caches[1].float()])
    with pytest.raises(ValueError, match=r"kv_caches\[0\] must be contiguous"):
        KVLayout.from_caches([t.transpose(3, 4).contiguous().transpose(3, 4) for t in caches])
    with pytest.raises(ValueError, match="must be shaped"):
        KVLayout.from_caches([torch.zeros(5, 4, 2, 8)])
    with pytest.raises(ValueError, match="dtype torch.int32"):
        KVLayout.from_caches([torch.zeros(2, 5, 4, 2, 8, dtype=torch.int32)])


def test_peer_check_ignores_num_blocks_and_names_the_differing_field():
    mine = KVLayout(32, 100, 16, 8, 128, "bfloat16")
    mine.check_peer(KVLayout(32, 7000, 16, 8, 128, "bfloat16"), "peer")
    with pytest.raises(KVTransferError, match="block_size is 16 here but 32 there"):
        mine.check_peer(KVLayout(32, 100, 32, 8, 128, "bfloat16"), "peer")
    with pytest.raises(KVTransferError, match="dtype is 'bfloat16' here but 'float16' there"):
        mine.check_peer(KVLayout(32, 100, 16, 8, 128, "float16"), "peer")


def test_layout_names_its_tensor_parallel_shard_and_peers_compare_it():
    # 8 KV heads at TP=2: rank 1 holds heads 4-7; a peer must expect that very shard of that model
    rank1 = KVLayout(32, 100, 16, 4, 128, "bfloat16", first_kv_head=4, total_kv_heads=8)
    assert KVLayout(32, 100, 16, 8, 128, "bfloat16").total_kv_heads == 8  # no TP: every head
    rank1.check_peer(KVLayout(32, 7, 16, 4, 128, "bfloat16", 4, 8), "peer")
    with pytest.raises(KVTransferError, match="first_kv_head is 4 here but 0 there"):
        rank1.check_peer(KVLayout(32, 100, 16, 4, 128, "bfloat16", 0, 8), "peer")
    with pytest.raises(KVTransferError, match="total_kv_heads is 8 here but 4 there"):
        rank1.check_peer(KVLayout(32, 100, 16, 4, 128, "bfloat16"), "peer")
    with pytest.raises(ValueError, match="does not fit"):
        KVLayout(32, 100, 16, 4, 128, "bfloat16", first_kv_head=6, total_kv_heads=8)
    cache = [torch.zeros(2, 5, 4, 2, 8)]
    assert KVLayout.from_caches(cache, (2, 4)) == KVLayout(1, 5, 4, 2, 8, "float32", 2, 4)
    assert wire.decode(wire.encode(wire.Hello(wire.PROTOCOL_VERSION, rank1))).layout == rank1


def test_block_runs():
    assert block_runs([]) == []
    assert block_runs([4, 5, 6]) == [(0, 4, 3)]
    assert block_runs([4, 5, 9, 1, 2, 2]) == [(0, 4, 2), (2, 9, 1), (3, 1, 2), (5, 2, 1)]


def copier_of(caches: list[torch.Tensor], kernel: str | None = None) -> BlockCopier:
    return BlockCopier(caches, KVLayout.from_caches(caches), PullPhases(), kernel)


def test_chunk_plan_of_llama3_8b_handoffs():
    copier = copier_of([torch.empty(2, 1, 16, 8, 128, dtype=torch.bfloat16) for _ in range(32)])
    # Host payloads (CPU, tcp) are pipelined in chunks of >= 4 MiB, at most 8.
    assert copier.num_chunks(1, payload_on_device=False) == 1  # 2 MiB
    assert copier.num_chunks(8, payload_on_device=False) == 4  # 16 MiB
    assert copier.num_chunks(128, payload_on_device=False) == 8  # 256 MiB
    assert copier.num_chunks(0, payload_on_device=False) == 1
    # A GPU-resident payload (ucx on CUDA) is one message whatever its size.
    assert copier.num_chunks(1, payload_on_device=True) == 1
    assert copier.num_chunks(128, payload_on_device=True) == 1
    assert copier.layer_chunks(1) == [range(0, 32)]
    assert copier.layer_chunks(4) == [range(i, i + 8) for i in range(0, 32, 8)]
    assert copier.layer_chunks(8) == [range(i, i + 4) for i in range(0, 32, 4)]


def test_layer_chunks_cover_the_layers_once_for_any_count():
    copier = copier_of(make_caches(num_blocks=2, dtype=torch.float32, seed=0,
                                   **dict(CACHE, num_layers=8)))
    assert copier.layer_chunks(3) == [range(0, 2), range(2, 5), range(5, 8)]
    for num_chunks in range(1, 9):
        chunks = copier.layer_chunks(num_chunks)
        assert len(chunks) == num_chunks and all(len(chunk) >= 1 for chunk in chunks)
        assert [layer for chunk in chunks for layer in chunk] == list(range(8))
    for bad in (0, 9):
        with pytest.raises(ValueError, match=r"num_chunks must be in \[1, 8\]"):
            copier.layer_chunks(bad)


# 8 layers of 64 KiB blocks: a pull of 20 blocks is 10 MiB, gathered in two chunks of layers.
BIG = dict(num_layers=8, block_size=16, num_kv_heads=8, head_dim=128, dtype=torch.bfloat16)


@pytest.mark.parametrize("stacked", [True, False], ids=["stacked", "per-layer"])
@pytest.mark.parametrize("num_chunks", [1, 2, 3])
@pytest.mark.parametrize("block_ids", [list(range(3, 23)), [*range(30, 40), *range(0, 10)],
                                       list(range(39, -1, -2)), [17, 4, 33, 0, 25, 9, 38, 12]],
                         ids=["one-run", "few-runs", "scattered", "shuffled"])
def test_gather_lays_blocks_out_layer_kv_block_and_scatter_inverts_it(block_ids, num_chunks,
                                                                      stacked):
    n = len(block_ids)
    src = make_caches(num_blocks=40, seed=1, stacked=stacked, **BIG)
    copier = copier_of(src)
    assert (copier.stacked is not None) == stacked
    staging = StagingBuffer(torch.device("cpu"), host_mirror=True)
    chunks = copier.layer_chunks(num_chunks)
    payload = torch.cat([copier.gather(block_ids, staging, layers).clone() for layers in chunks])
    assert payload.dtype == torch.uint8 and payload.numel() == copier.nbytes(n)
    blocks = payload.view(torch.bfloat16).view(8, 2, n, 16, 8, 128)
    for layer in range(8):
        assert torch.equal(blocks[layer], src[layer][:, block_ids])
    assert copier.phases.copy_s > 0 and copier.phases.copy_gpu_s == 0  # no CUDA events on CPU

    dst = make_caches(num_blocks=44, seed=2, stacked=stacked, **BIG)
    before = [t.clone() for t in dst]
    dst_ids = [43 - 2 * i for i in range(n)]
    receiver = copier_of(dst)
    receive_staging = StagingBuffer(torch.device("cpu"), host_mirror=True)
    offset = 0
    for layers in receiver.layer_chunks(num_chunks):
        view = receiver.receive_view(n, receive_staging, layers)
        view.copy_(payload[offset:offset + view.numel()])
        offset += view.numel()
        receiver.scatter(dst_ids, receive_staging, layers)
    assert offset == payload.numel()
    untouched = sorted(set(range(44)) - set(dst_ids))
    for layer in range(8):
        assert torch.equal(dst[layer][:, dst_ids], src[layer][:, block_ids])
        assert torch.equal(dst[layer][:, untouched], before[layer][:, untouched])


def test_stacked_view_only_over_consecutive_slices_of_one_allocation():
    cache = torch.randn(3, 2, 5, 4, 2, 8)
    assert stacked_view(list(cache.unbind(0))).data_ptr() == cache.data_ptr()
    assert torch.equal(stacked_view(list(cache.unbind(0))), cache)
    assert stacked_view([cache[0], cache[2]]) is None  # a gap
    assert stacked_view([cache[1], cache[0]]) is None  # out of order
    assert stacked_view([t.clone() for t in cache.unbind(0)]) is None  # separate allocations
    # The engine's one tensor is accepted as it is, as its per-layer views.
    assert layer_views(cache)[2].data_ptr() == cache[2].data_ptr()
    assert KVLayout.from_caches(cache) == KVLayout(3, 5, 4, 2, 8, "float32")
    with pytest.raises(ValueError, match="must be shaped"):
        layer_views(cache[0])


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="set TRITON_INTERPRET=1 "
                    "(with triton installed) to run the copy_blocks path on CPU")
@pytest.mark.parametrize("stacked", [True, False], ids=["stacked", "per-layer"])
def test_triton_copy_path_gathers_and_scatters_scattered_ids(stacked):
    pytest.importorskip("triton")
    src = make_caches(num_blocks=30, dtype=torch.bfloat16, seed=3, stacked=stacked, **CACHE)
    dst = make_caches(num_blocks=32, dtype=torch.bfloat16, seed=4, stacked=stacked, **CACHE)
    before = [t.clone() for t in dst]
    src_ids, dst_ids = [17, 3, 9, 28, 0, 11, 5, 21, 14, 2], [29, 1, 4, 8, 12, 16, 20, 24, 26, 7]
    sender, receiver = copier_of(src, "triton"), copier_of(dst, "triton")
    staging = StagingBuffer(torch.device("cpu"), host_mirror=False)
    layers = range(0, 3)
    sender.gather(src_ids, staging, layers)
    receiver.scatter(dst_ids, staging, layers)
    untouched = sorted(set(range(32)) - set(dst_ids))
    for layer in layers:
        assert torch.equal(dst[layer][:, dst_ids], src[layer][:, src_ids])
        assert torch.equal(dst[layer][:, untouched], before[layer][:, untouched])


def test_payload_is_on_device_only_for_cuda_staging_without_host_mirror():
    assert not StagingBuffer(torch.device("cpu"), host_mirror=False).payload_on_device
    assert not StagingBuffer(torch.device("cpu"), host_mirror=True).payload_on_device


def test_staging_buffer_grows_and_is_reused():
    staging = StagingBuffer(torch.device("cpu"), host_mirror=True)
    big = staging.device_bytes(100)
    small = staging.host_bytes(10)  # on CPU the host bytes are the device bytes
    assert small.data_ptr() == big.data_ptr() and small.numel() == 10


def test_wire_round_trip_and_malformed_headers():
    layout = KVLayout(2, 10, 16, 2, 8, "float32")
    for message in [wire.Hello(wire.PROTOCOL_VERSION, layout),
                    wire.PullRequest("lease-1", 2, 5, 2, 1.5), wire.PullRequest("lease-2", 3, 0, 0, 1.0),
                    wire.PullReply(1024, 4),
                    wire.PullReply(0, 0), wire.Error("lease gone")]:
        assert wire.decode(wire.encode(message)) == message
    for data in [b"not json", b'{"type": "bogus"}', b'{"type": "pull", "lease_id": 3}',
                 b'{"type": "reply", "nbytes": -1, "num_chunks": 1}',
                 b'{"type": "reply", "nbytes": 64}',  # a version-1 reply: no num_chunks
                 b'{"type": "reply", "nbytes": 64, "num_chunks": 0}',
                 b'{"type": "reply", "nbytes": 0, "num_chunks": 2}',
                 b'{"type": "pull", "lease_id": "a", "src_block_offset": 0, "num_blocks": 2, '
                 b'"num_chunks": 0, "timeout_s": 1.0}',  # blocks in no chunk
                 b'{"type": "pull", "lease_id": "a", "src_block_offset": 0, "num_blocks": 2, '
                 b'"timeout_s": 1.0}',  # a version-2 request: no num_chunks
                 b'{"type": "hello", "version": 1, "layout": {"num_layers": 2}}']:
        with pytest.raises(KVTransferError, match="malformed"):
            wire.decode(data)
    with pytest.raises(KVTransferError, match="speaks KV wire protocol 2, this worker speaks 4"):
        wire.check_hello(wire.Hello(2, layout), layout, "peer")
    with pytest.raises(KVTransferError, match="peer: lease gone"):
        wire.expect(wire.Error("lease gone"), wire.PullReply, "peer")


def test_split_address():
    assert split_address("tcp://127.0.0.1:5000", "tcp") == ("127.0.0.1", 5000)
    assert split_address("ucx://[::1]:7", "ucx") == ("::1", 7)
    for bad in ["tcp://host", "tcp://:5", "127.0.0.1:5"]:
        with pytest.raises(ValueError):
            split_address(bad, "tcp")
