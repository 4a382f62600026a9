"""Paged KV blocks: a free list, reference counts and the prefix cache.

Reference counts let a block be shared (forked sequences, prefix reuse); a block returns to the
free list when its count drops to zero.

Prefix caching (automatic, as in vLLM and SGLang): a full block whose KV has been computed is
named by a digest of its tokens chained to the digest of the block before it, so a digest names
the whole prefix up to the block's end. A new sequence whose leading blocks have digests in the
cache takes those blocks (one more reference each) and skips their prefill: chat requests that
share a system prompt or tool definitions, or a conversation's next turn, compute only what is
new. A freed block keeps its KV and its digest while it waits in the free list: it can be taken
again until an allocation needs it, roughly least recently freed first (a sequence's tail before
its head, so a shared head outlives the tails; _next_block says where and why the order bends to
keep a sequence's blocks consecutive in memory).

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


# A new run of blocks keeps ROOM_TOKENS' worth of blocks from those in use on either side, and
# is sought in at most SEARCH probes from the next free block in hand-out order
# (BlockManager._next_block).
ROOM_TOKENS = 128
SEARCH = 256


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = False) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.room = max(1, ROOM_TOKENS // block_size)
        self.prefix_caching = prefix_caching
        self.ref_counts = [0] * num_blocks
        # Free blocks, the next one to hand out first. A free block may still hold a cached
        # prefix block (its digest in `digests`) until it is handed out.
        self.free_ids: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.cached: dict[bytes, int] = {}              # digest -> the block holding it
        self.digests: list[bytes | None] = [None] * num_blocks
        self.parents = [-1] * num_blocks    # the block holding a named block's chain before it
        self.children: dict[int, set[int]] = {}     # named block -> named blocks chained after it
        self.clock = 0                  # blocks freed so far
        self.freed_at = [0] * num_blocks    # the clock when each block was last freed
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
            block_id = self._next_block(seq.block_table)
            del self.free_ids[block_id]
            self._evict(block_id)
            self.ref_counts[block_id] = 1
            seq.block_table.append(block_id)

    def _next_block(self, table: list[int]) -> int:
        """The free block a sequence with blocks `table` takes next.

        The CPU attention kernels read a sequence's blocks in table order, and over scattered
        blocks they take 1.6-1.8x the time they take over consecutive ones (kernels_bench
        --only placement). Handed out in the order they were freed, a long-running server's
        blocks were almost never consecutive: concurrent sequences grow a block at a time in
        turn, and each freed sequence returns its blocks tail first. So:
        - a sequence grows into the block after its last, if that is free and expendable
          (_expendable: holds no cached prefix, or one among the oldest quarter of the free
          list, which least-recently-freed order would hand out soon anyway);
        - otherwise a new run starts near the next block in hand-out order, ROOM blocks clear
          of any block in use on either side, so that the sequence behind it and this one can
          both grow (_run_start);
        - failing that, the next block in hand-out order.
        The price is eviction that is least recently freed only roughly. `python -m
        benchmarks.blocks` simulates both (docs/BENCHMARKS.md): consecutive steps went from
        2-37% to 39-96%; the prefix hit rate stayed the same with the server's 2912 blocks and
        fell with 1600 (0.784 to 0.716 at 16 streams of a chat load).
        """
        nxt = table[-1] + 1 if table else self.num_blocks
        if nxt < self.num_blocks and self._expendable(nxt):
            return nxt
        front = next(iter(self.free_ids))
        start = self._run_start(front)
        return front if start is None else start

    def _run_start(self, origin: int) -> int | None:
        """Where a new run starts (_next_block): from the beginning of the expendable free run
        around free block `origin` on, through the pool (wrapping), the first expendable block
        with no block in use within ROOM blocks either side; None after SEARCH probes."""
        refs, room, n = self.ref_counts, self.room, self.num_blocks
        start = origin
        while start > 0 and origin - start < SEARCH and self._expendable(start - 1):
            start -= 1
        for _ in range(SEARCH):
            if not self._expendable(start):
                start = (start + 1) % n
                continue
            lo = max(0, start - room)
            near = refs[lo:start + room + 1]
            if not any(near):
                return start
            last_busy = lo + len(near) - 1 - next(i for i, r in enumerate(reversed(near)) if r)
            start = (last_busy + room + 1) % n         # past it, with room behind
        return None

    def _expendable(self, block_id: int) -> bool:
        """Free, and holding no cached prefix or one among the oldest quarter of the free list
        (by the count of blocks freed since: an estimate, as revived blocks leave gaps)."""
        return self.ref_counts[block_id] == 0 and (
            self.digests[block_id] is None
            or self.freed_at[block_id] <= self.clock - len(self.free_ids) * 3 // 4)

    def free(self, seq: Sequence) -> None:
        for block_id in reversed(seq.block_table):
            self.ref_counts[block_id] -= 1
            assert self.ref_counts[block_id] >= 0
            if self.ref_counts[block_id] == 0:
                self.free_ids[block_id] = None
                self.freed_at[block_id], self.clock = self.clock, self.clock + 1
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
                parent = self.cached.get(digests[i - 1], -1) if i else -1
                self.parents[block_id] = parent
                if parent >= 0:
                    self.children.setdefault(parent, set()).add(block_id)
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
        """Drop block_id's name, and those of the blocks chained after it: no sequence can match
        them without it, and unnamed they are expendable where they lie (_next_block)."""
        stack = [block_id]
        while stack:
            b = stack.pop()
            digest = self.digests[b]
            if digest is None:
                continue
            del self.cached[digest]
            self.digests[b] = None
            self.children.get(self.parents[b], set()).discard(b)
            stack.extend(self.children.pop(b, ()))
