"""Paged KV blocks: a free list, reference counts and the prefix cache.

Reference counts let a block be shared (forked sequences, prefix reuse); a block returns to the
free list when its count drops to zero.

Prefix caching (automatic, as in vLLM and SGLang): a full block whose KV has been computed is
named by a digest of its tokens chained to the digest of the block before it, so a digest names
the whole prefix up to the block's end. A new sequence whose leading blocks have digests in the
cache takes those blocks (one more reference each) and skips their prefill: chat requests that
share a system prompt or tool definitions, or a conversation's next turn, compute only what is
new. A freed block keeps its KV and its digest while it waits in the free list: it can be taken
again until an allocation needs it, least recently freed first (and a sequence's tail before
its head, so a shared head outlives the tails).

The chain starts from the weights version the sequence's KV was computed with: KV from other
weights never matches. A sequence whose weights change mid-way (a swap without reset) stops
adding blocks. Digests are SHA-256 over the tokens' bytes: a collision would hand one request
another's KV, so no cheaper hash is used.
"""
from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict

from engine.sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = False) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self.ref_counts = [0] * num_blocks
        # Free blocks, the next one to hand out first. A free block may still hold a cached
        # prefix block (its digest in `digests`) until it is handed out.
        self.free_ids: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.cached: dict[bytes, int] = {}              # digest -> the block holding it
        self.digests: list[bytes | None] = [None] * num_blocks
        self.num_queried_tokens = 0     # prompt tokens of sequences that looked up the cache
        self.num_hit_tokens = 0         # ... of which were found in it

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_ids)

    def blocks_needed(self, seq: Sequence, num_new_tokens: int, prefix: list[int] | None = None) -> int:
        """Free blocks `seq` must take to hold its cached tokens plus num_new_tokens; with
        `prefix` (from `match`, for a sequence without blocks) the matched blocks count as
        held, and those of them now in the free list as taken from it."""
        held = len(seq.block_table) + len(prefix or ())
        total = seq.num_computed_tokens + len(prefix or ()) * self.block_size + num_new_tokens
        revived = sum(self.ref_counts[b] == 0 for b in prefix or ())
        return max(0, -(-total // self.block_size) - held) + revived

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= len(self.free_ids)

    def allocate(self, seq: Sequence, num_new_tokens: int, prefix: list[int] | None = None) -> None:
        """Blocks for num_new_tokens more of seq. An admission passes what `match` found (maybe
        nothing): those blocks come first, as computed, and count in the hit rate."""
        if prefix is not None:
            assert not seq.block_table and seq.num_computed_tokens == 0
            for block_id in prefix:
                if self.ref_counts[block_id] == 0:
                    del self.free_ids[block_id]
                self.ref_counts[block_id] += 1
            seq.block_table.extend(prefix)
            seq.num_cached_blocks = len(prefix)
            seq.num_computed_tokens = hit = len(prefix) * self.block_size
            if self.prefix_caching and seq.sampling.prompt_logprobs is None:
                self.num_queried_tokens += seq.num_prompt_tokens
                self.num_hit_tokens += min(hit, seq.num_prompt_tokens)
            if seq.num_preemptions == 0:
                seq.num_cached_tokens = min(hit, seq.num_prompt_tokens)
        for _ in range(self.blocks_needed(seq, num_new_tokens)):
            block_id, _ = self.free_ids.popitem(last=False)
            assert self.ref_counts[block_id] == 0
            self._evict(block_id)
            self.ref_counts[block_id] = 1
            seq.block_table.append(block_id)

    def free(self, seq: Sequence) -> None:
        for block_id in reversed(seq.block_table):
            self.ref_counts[block_id] -= 1
            assert self.ref_counts[block_id] >= 0
            if self.ref_counts[block_id] == 0:
                self.free_ids[block_id] = None
                if self.digests[block_id] is None:      # nothing to keep: hand it out first
                    self.free_ids.move_to_end(block_id, last=False)
        seq.block_table.clear()
        seq.num_computed_tokens = seq.num_cached_blocks = 0

    # --- prefix cache -------------------------------------------------------------------------

    def match(self, seq: Sequence, weights_version: int) -> list[int]:
        """The cached blocks holding seq's longest cached prefix of whole blocks, for a sequence
        without blocks. Its last token is never matched: computing it gives the logits to sample
        from. Also starts seq's chain at weights_version."""
        assert not seq.block_table
        if seq.kv_version != weights_version:
            seq.kv_version, seq.block_digests = weights_version, []
        if not self.prefix_caching or seq.sampling.prompt_logprobs is not None:
            return []       # prompt logprobs need every prompt position's logits
        found = []
        for digest in self._digests(seq, (seq.num_tokens - 1) // self.block_size):
            block_id = self.cached.get(digest)
            if block_id is None:
                break
            found.append(block_id)
        return found

    def register(self, seq: Sequence, weights_version: int) -> None:
        """Name seq's newly filled blocks in the cache, after a step computed them with
        weights_version (a sequence whose weights changed since its chain began stops here)."""
        if not self.prefix_caching:
            return
        if seq.kv_version != weights_version:
            seq.kv_version = None
            return
        full = seq.num_computed_tokens // self.block_size
        if full <= seq.num_cached_blocks:
            return
        digests = self._digests(seq, full)
        for i in range(seq.num_cached_blocks, full):
            block_id = seq.block_table[i]
            # Another sequence may have computed the same block meanwhile: keep the first.
            if digests[i] not in self.cached and self.digests[block_id] is None:
                self.cached[digests[i]] = block_id
                self.digests[block_id] = digests[i]
        seq.num_cached_blocks = full

    def _digests(self, seq: Sequence, count: int) -> list[bytes]:
        """The chained digests of seq's first `count` blocks (extends seq.block_digests)."""
        digests, size = seq.block_digests, self.block_size
        for i in range(len(digests), count):
            h = hashlib.sha256(digests[-1] if digests else b"v%d" % seq.kv_version)
            h.update(array("q", seq.token_ids[i * size:(i + 1) * size]).tobytes())
            digests.append(h.digest())
        return digests[:count]

    def _evict(self, block_id: int) -> None:
        digest = self.digests[block_id]
        if digest is not None:
            del self.cached[digest]
            self.digests[block_id] = None
