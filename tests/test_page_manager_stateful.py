"""Stateful property test: random allocate / append / fork / write / evict / prefetch / step / free sequences
over tiny tiers, checking after every step that every live token reads back bit for bit, that reference
counts, pins and free lists add up, that no tier exceeds its capacity, and that nothing leaks at the end.

On a CUDA machine the same machine runs with real streams and random delays injected on the transfer
streams and the I/O thread (`debug_delays`), so a missing ordering shows up as wrong bytes.
"""

import hashlib
import shutil
import tempfile

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from kv_tools import check_invariants, read_block, read_tokens, write_tokens

from tierkv import CapacityError, KVLayout, PageManager, PageManagerConfig

SEQ = st.integers(min_value=0, max_value=10**6)


class PageManagerMachine(RuleBasedStateMachine):
    device = "cpu"

    def __init__(self):
        super().__init__()
        self.pm = None
        self.dir = tempfile.mkdtemp(prefix="tierkv-stateful-")
        self.shadow: dict[int, torch.Tensor] = {}  # what every live sequence's tokens must read back as
        self.content: dict[bytes, tuple[torch.Tensor, tuple]] = {}  # content key -> (block bytes, tokens)
        self.chains: list[list[bytes]] = []  # key chains registered so far, for reuse
        self.next_id = 0
        self.gen = torch.Generator().manual_seed(0)

    @initialize(
        gpu=st.integers(2, 4),
        cpu=st.integers(0, 3),
        nvme=st.integers(0, 5),
        block_size=st.sampled_from([1, 2, 4]),
        eviction=st.sampled_from(["lru", "clock"]),
        reserve=st.integers(1, 2),
        write_through=st.booleans(),
    )
    def open(self, gpu, cpu, nvme, block_size, eviction, reserve, write_through):
        layout = KVLayout(num_layers=2, num_kv_heads=1, head_dim=4, dtype=torch.float32, block_size=block_size)
        cuda = self.device == "cuda"
        self.pm = PageManager(
            PageManagerConfig(
                layout,
                device=self.device,
                gpu_blocks=gpu,
                cpu_blocks=cpu,
                nvme_dir=self.dir if nvme else None,
                nvme_blocks=nvme,
                eviction=eviction,
                gpu_reserve_blocks=reserve,
                staging_blocks=2,
                debug_delays=cuda,
                write_through=write_through,
            )
        )

    def teardown(self):
        if self.pm is not None:
            for seq in list(self.shadow):
                self.pm.free(seq)
            check_invariants(self.pm)
            assert all(b.ref_count == 0 and b.key is not None for b in self.pm.blocks.values())  # only cached blocks
            assert self.pm.free_blocks() == sum(t.num_blocks for t in self.pm.tiers.values())
            self.pm.reset_prefix_cache()
            assert not self.pm.blocks and all(self.pm.resident(k) == 0 for k in self.pm.kinds)
            self.pm.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    # -- helpers --
    def kv(self, n):
        layout = self.pm.layout
        return torch.randn((layout.num_layers, 2, n, layout.num_kv_heads, layout.head_dim), generator=self.gen)

    def pick(self, i):
        return sorted(self.shadow)[i % len(self.shadow)]

    def blocks_needed(self, seq, extra):
        layout = self.pm.layout
        return layout.num_blocks_for(self.pm.num_tokens(seq) + extra) - len(self.pm.block_table(seq))

    # -- rules --
    @rule(n=st.integers(1, 10))
    def new_sequence(self, n):
        seq = self.next_id
        self.next_id += 1
        free = self.pm.free_blocks()
        self.pm.add_sequence(seq)
        need = self.pm.layout.num_blocks_for(n)
        try:
            self.pm.append_tokens(seq, n)
        except CapacityError:
            assert need > free
            self.pm.free(seq)
            return
        assert need <= free
        data = self.kv(n)
        write_tokens(self.pm, seq, 0, data)
        self.shadow[seq] = data

    @precondition(lambda self: self.shadow)
    @rule(i=SEQ, n=st.integers(1, 6))
    def append(self, i, n):
        seq = self.pick(i)
        need, free = self.blocks_needed(seq, n), self.pm.free_blocks()
        try:
            self.pm.append_tokens(seq, n)
        except CapacityError:
            assert need > free
            return
        assert need <= free
        data = self.kv(n)
        old_len, bs = self.shadow[seq].shape[2], self.pm.layout.block_size
        shared_last = old_len % bs != 0 and self.pm.block_table(seq)[old_len // bs].ref_count > 1
        free = self.pm.free_blocks()
        try:
            write_tokens(self.pm, seq, self.shadow[seq].shape[2], data)
        except CapacityError:
            # Only a copy-on-write of the shared last block can fail, and only with every tier full.
            assert shared_last and free == 0
            self.pm.free(seq)  # its new positions hold nothing: drop the sequence
            del self.shadow[seq]
            return
        self.shadow[seq] = torch.cat([self.shadow[seq], data], dim=2)

    @precondition(lambda self: self.shadow)
    @rule(i=SEQ)
    def fork(self, i):
        parent = self.pick(i)
        child = self.next_id
        self.next_id += 1
        self.pm.fork(parent, child)
        self.shadow[child] = self.shadow[parent].clone()

    @precondition(lambda self: self.shadow)
    @rule(i=SEQ, start=st.integers(0, 10**6), n=st.integers(1, 5))
    def overwrite(self, i, start, n):
        seq = self.pick(i)
        length = self.shadow[seq].shape[2]
        start = start % length
        n = min(n, length - start)
        data = self.kv(n)
        bs = self.pm.layout.block_size
        shared = sum(1 for b in self.pm.block_table(seq)[start // bs : -(-(start + n) // bs)] if b.ref_count > 1)
        free = self.pm.free_blocks()
        try:
            write_tokens(self.pm, seq, start, data)
        except CapacityError:
            assert shared > free  # copy-on-write found no free block; the invariant checks nothing changed
            return
        self.shadow[seq][:, :, start : start + n] = data

    @precondition(lambda self: self.shadow)
    @rule(i=SEQ, to=st.sampled_from(["cpu", "nvme"]))
    def evict(self, i, to):
        if to not in [self.pm.tiers[k].name for k in self.pm.kinds[1:]]:
            return
        self.pm.evict([self.pick(i)], to=to)

    @precondition(lambda self: self.shadow)
    @rule(picks=st.lists(SEQ, min_size=1, max_size=3), budget=st.integers(1, 4))
    def prefetch(self, picks, budget):
        seqs = list(dict.fromkeys(self.pick(i) for i in picks))
        self.pm.prefetch(seqs, budget_blocks=budget)

    @precondition(lambda self: self.shadow)
    @rule(picks=st.lists(SEQ, min_size=1, max_size=3))
    def step(self, picks):
        """acquire a few sequences as a step would, check their bytes on the GPU, release them."""
        seqs = list(dict.fromkeys(self.pick(i) for i in picks))
        distinct = {b.block_id for s in seqs for b in self.pm.block_table(s)}
        self.pm.begin_step()
        try:
            tables = self.pm.acquire(seqs)
        except CapacityError:
            assert len(distinct) > self.pm.tiers[0].num_blocks
            return
        assert len(distinct) <= self.pm.tiers[0].num_blocks
        pool = self.pm.tiers[0].pool
        if self.device == "cuda":
            torch.cuda._sleep(1_000_000)  # a slow compute stream must not be overtaken by later transfers
        for seq, table in zip(seqs, tables):
            on_gpu = torch.cat([pool[s] for s in table], dim=2).cpu()
            n = self.shadow[seq].shape[2]
            assert torch.equal(on_gpu[:, :, :n], self.shadow[seq]), f"sequence {seq}: GPU bytes differ"
        self.pm.release(seqs)

    @precondition(lambda self: self.shadow)
    @rule(i=SEQ)
    def free(self, i):
        seq = self.pick(i)
        self.pm.free(seq)
        del self.shadow[seq]

    @rule()
    def flush_write_through_copies(self):
        self.pm.flush_copies()

    @precondition(lambda self: self.shadow)
    @rule(i=SEQ)
    def register_full_blocks(self, i):
        """Give a sequence's full blocks content keys (a hash of their bytes chained over the prefix)."""
        seq = self.pick(i)
        data, bs = self.shadow[seq], self.pm.layout.block_size
        parent, chain = b"root", []
        for j in range(data.shape[2] // bs):
            block = data[:, :, j * bs : (j + 1) * bs].contiguous()
            key = hashlib.sha256(parent + block.numpy().tobytes()).digest()
            tokens = tuple(key[:bs])
            self.pm.register(seq, j, key, tokens)
            self.content[key] = (block.clone(), tokens)
            chain.append(key)
            parent = key
        if chain:
            self.chains.append(chain)

    @precondition(lambda self: self.chains)
    @rule(c=st.integers(0, 10**6), n=st.integers(1, 4))
    def reuse_prefix(self, c, n):
        """A new sequence starts with the longest cached prefix of a registered chain, shared by reference."""
        chain = self.chains[c % len(self.chains)][:n]
        hits = self.pm.lookup(chain, [self.content[k][1] for k in chain])
        assert all(b.key == k for b, k in zip(hits, chain))
        if not hits:
            return
        seq = self.next_id
        self.next_id += 1
        self.pm.add_sequence(seq)
        self.pm.attach(seq, hits)
        self.shadow[seq] = torch.cat([self.content[b.key][0] for b in hits], dim=2)

    @invariant()
    def consistent(self):
        if self.pm is None:
            return
        check_invariants(self.pm)
        for seq, data in self.shadow.items():
            assert torch.equal(read_tokens(self.pm, seq), data), f"sequence {seq}: bytes differ"
        for key, block in self.pm.index.items():
            assert torch.equal(read_block(self.pm, block), self.content[key][0][:, :, :]), (
                "a cached block's bytes changed"
            )


PageManagerMachine.TestCase.settings = settings(
    max_examples=200, stateful_step_count=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
TestPageManagerCPU = PageManagerMachine.TestCase


class CudaPageManagerMachine(PageManagerMachine):
    device = "cuda"


CudaPageManagerMachine.TestCase.settings = settings(
    max_examples=40, stateful_step_count=30, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
TestPageManagerCUDA = pytest.mark.gpu(CudaPageManagerMachine.TestCase)
