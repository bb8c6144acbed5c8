"""CUDA graph batch buckets (common/engine/cuda_graphs.py): which decode batch sizes replay a
graph. Pure arithmetic: runs on CPU."""

from pdserve.common.engine.cuda_graphs import bucket_sizes


def test_buckets_up_to_the_batch_limit():
    assert bucket_sizes(1) == [1]
    assert bucket_sizes(100) == [1, 2, 4, 8, 16, 32, 64, 100]
    assert bucket_sizes(256) == [1, 2, 4, 8, 16, 32, 64, 128, 256]


def test_batches_past_256_keep_graphs():
    """--max-num-seqs 512: every batch size up to 512 has a bucket (one per 128 past 256), so a
    batch of 257..512 decodes replays a graph instead of ~500 eager kernel launches."""
    assert bucket_sizes(512) == [1, 2, 4, 8, 16, 32, 64, 128, 256, 384, 512]
    assert bucket_sizes(300)[-2:] == [256, 300]
    for n in (257, 384, 385, 512):
        assert any(b >= n for b in bucket_sizes(512))
