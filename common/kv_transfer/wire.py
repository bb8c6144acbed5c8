"""Control messages of the KV transfer wire protocol (shared by the tcp and ucx backends).

These are not inter-service RPCs (those live in proto/): they are the few headers that frame a
block payload on a KV connection. Each is a small JSON object.

    client                                   server
      Hello{version, layout}          ->                       (first message of a connection)
                                      <-     Hello{version, layout} | Error{message}
      PullRequest{lease_id, src_block_offset, num_blocks, num_chunks, timeout_s}  ->
                                      <-     PullReply{nbytes, num_chunks} then nbytes of raw
                                             blocks in num_chunks layer chunks
                                             | Error{message}
      PullRequest ...                       (the connection is reused for the next pull)

The payload layout is blocks.py's staging layout [L, 2, n, block_size, H, D]; the client picks
the number of layer chunks (one for GPU-resident payloads, several to pipeline host ones), since
it may post the receives of all chunks together with the request (ucx), and both ends split
the layers the same way (BlockCopier.layer_chunks). The tcp backend frames each header with a
4-byte big-endian length and streams the chunks back to back; the ucx backend sends each header
as one active message and each chunk as one tagged message (a refusing server completes the
client's posted receives with one empty tagged message per chunk); the nccl backend sends the
headers over tcp and the payload as one NCCL send; the ipc backend sends no payload at all:

      (after Hello)                   <-     Mapping{host_id, kind, regions}
      PullRequest ...                 ->
                                      <-     PullSource{block_ids, valid_s} | Error{message}
      [the client copies the blocks out of its mapping of the server's cache]
      PullDone{lease_id}              ->     only if the copy may have outlived valid_s
                                      <-     PullDone{lease_id} | Error (lease gone meanwhile)

Version 2 added PullReply.num_chunks; version 3 moved the choice to PullRequest.num_chunks;
version 4 added the tensor-parallel shard to the layout (first_kv_head, total_kv_heads).
"""

from __future__ import annotations

import json
import struct
from dataclasses import asdict, dataclass

from pdserve.common.kv_transfer.base import KVLayout, KVTransferError

PROTOCOL_VERSION = 4
MAX_HEADER_BYTES = 64 * 1024
LENGTH_PREFIX = struct.Struct("!I")


@dataclass(frozen=True)
class Hello:
    version: int
    layout: KVLayout


@dataclass(frozen=True)
class PullRequest:
    lease_id: str
    src_block_offset: int
    num_blocks: int
    num_chunks: int  # layer chunks the client receives the payload in; 0 iff num_blocks is 0
    timeout_s: float  # the client's remaining budget; the server gives up on sending after it

    def __post_init__(self):
        if not isinstance(self.lease_id, str):
            raise ValueError(f"lease_id must be a str, got {self.lease_id!r}")
        for field in ("src_block_offset", "num_blocks", "num_chunks"):
            if not isinstance(getattr(self, field), int) or getattr(self, field) < 0:
                raise ValueError(f"{field} must be an int >= 0, got {getattr(self, field)!r}")
        if (self.num_blocks == 0) != (self.num_chunks == 0):
            raise ValueError(f"{self.num_blocks} blocks cannot come in {self.num_chunks} chunks")
        if not isinstance(self.timeout_s, (int, float)) or self.timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s!r}")


@dataclass(frozen=True)
class PullReply:
    nbytes: int  # payload bytes that follow this header
    num_chunks: int  # layer chunks (ucx: tagged messages) they come in; 0 iff nbytes is 0

    def __post_init__(self):
        for field in ("nbytes", "num_chunks"):
            if not isinstance(getattr(self, field), int) or getattr(self, field) < 0:
                raise ValueError(f"{field} must be an int >= 0, got {getattr(self, field)!r}")
        if (self.nbytes == 0) != (self.num_chunks == 0):
            raise ValueError(f"{self.nbytes} bytes cannot come in {self.num_chunks} chunks")


@dataclass(frozen=True)
class Error:
    message: str


@dataclass(frozen=True)
class Pair:
    """nccl backend: the server's offer of a pair communicator after Hello; the client echoes it.

    group names the pair in the server's TCPStore (at store_port on the server's host);
    backend is "nccl" (CUDA caches) or "gloo" (CPU caches) and must be the same on both ends.
    """
    group: str
    store_port: int
    backend: str


@dataclass(frozen=True)
class Mapping:
    """ipc backend: after Hello, the server's export of its KV cache memory (ipc.py).

    host_id is the server's boot id (ipc works only within one host); kind is "cuda" (CUDA IPC
    handles) or "host" (a memfd, host_shm.py); regions has one export per mapped tensor: the
    whole stacked cache, or one per layer when the layers are separate allocations.
    """
    host_id: str
    kind: str
    regions: list


@dataclass(frozen=True)
class PullSource:
    """ipc backend: the answer to a PullRequest: the lease's source block ids (no payload), and
    valid_s, the seconds the lease still holds them (None: unknown): a client whose copy ends
    within valid_s of sending its request skips the PullDone check."""
    block_ids: list
    valid_s: float | None = None

    def __post_init__(self):
        if not isinstance(self.block_ids, list):
            raise ValueError(f"block_ids must be a list, got {self.block_ids!r}")
        if self.valid_s is not None and (not isinstance(self.valid_s, (int, float))
                                         or isinstance(self.valid_s, bool)):
            raise ValueError(f"valid_s must be a number of seconds or None, got {self.valid_s!r}")


@dataclass(frozen=True)
class PullDone:
    """ipc backend: the client copied the blocks of lease_id (sent when the copy may have outlived
    PullSource.valid_s); the server echoes it while the lease still holds them (so they were never
    reused during the copy), else answers an Error."""
    lease_id: str


Message = Hello | PullRequest | PullReply | Error | Pair | Mapping | PullSource | PullDone
_TYPES = {"hello": Hello, "pull": PullRequest, "reply": PullReply, "error": Error, "pair": Pair,
          "mapping": Mapping, "source": PullSource, "done": PullDone}
_NAMES = {cls: name for name, cls in _TYPES.items()}


def encode(message: Message) -> bytes:
    body = asdict(message)
    if isinstance(message, Hello):
        body["layout"] = message.layout.to_dict()
    body["type"] = _NAMES[type(message)]
    data = json.dumps(body, separators=(",", ":")).encode()
    if len(data) > MAX_HEADER_BYTES:
        raise ValueError(f"KV wire header of {len(data)} bytes exceeds {MAX_HEADER_BYTES}")
    return data


def decode(data: bytes | bytearray | memoryview) -> Message:
    """Parses one header; KVTransferError if the peer sent something else."""
    try:
        body = json.loads(bytes(data))
        cls = _TYPES[body.pop("type")]
        if cls is Hello:
            body["layout"] = KVLayout.from_dict(body["layout"])
        return cls(**body)
    except KVTransferError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise KVTransferError(f"malformed KV wire header {bytes(data)[:200]!r}: {e}") from e


def expect(message: Message, cls: type, peer: str):
    """Returns message if it is a cls; raises KVTransferError for an Error or anything else."""
    if isinstance(message, Error):
        raise KVTransferError(f"{peer}: {message.message}")
    if not isinstance(message, cls):
        raise KVTransferError(f"{peer} sent {type(message).__name__}, expected {cls.__name__}")
    return message


def check_hello(hello: Hello, layout: KVLayout, peer: str) -> None:
    if hello.version != PROTOCOL_VERSION:
        raise KVTransferError(f"{peer} speaks KV wire protocol {hello.version}, this worker "
                              f"speaks {PROTOCOL_VERSION}")
    layout.check_peer(hello.layout, peer)
