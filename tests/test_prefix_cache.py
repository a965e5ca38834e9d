"""Prefix reuse across all three tiers, by content hash, surviving restarts (CPU, float32, against transformers)."""

import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings

import pytest
import torch
from kv_tools import check_invariants, write_tokens
from tiny_models import hf_greedy, make_checkpoint

import tierkv
from tierkv import SamplingParams
from tierkv.kv.mover import LinkStats
from tierkv.kv.nvme_store import HEADER_NBYTES
from tierkv.kv.prefix_cache import LoadOrRecompute, PrefixHasher

GREEDY = SamplingParams(max_tokens=12, temperature=0)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    hf = make_checkpoint(path, "llama")
    g = torch.Generator().manual_seed(3)
    vocab = hf.config.vocab_size
    prefix = torch.randint(2, vocab, (100,), generator=g).tolist()
    prompts = [prefix + torch.randint(2, vocab, (n,), generator=g).tolist() for n in (5, 17, 30, 9, 21)]
    want = [hf_greedy(hf, p, 12) for p in prompts]
    return str(path), hf, prompts, want


def llm_for(path, nvme, **kw):
    opts = dict(device="cpu", gpu_blocks=12, cpu_blocks=12, nvme_dir=str(nvme), nvme_blocks=120, prefix_load="always")
    opts.update(kw)
    return tierkv.LLM(path, **opts)


def check(outs, want):
    for i, (o, w) in enumerate(zip(outs, want)):
        assert o.outputs[0].token_ids == w, f"prompt {i} differs from transformers"


def test_shared_prefixes_are_reused_from_every_tier_and_stay_exact(model, tmp_path):
    path, _, prompts, want = model
    with llm_for(path, tmp_path / "nvme") as llm:
        first = llm.generate(prompts[:1], GREEDY, use_tqdm=False)
        assert first[0].num_cached_tokens == 0
        outs = llm.generate(prompts, GREEDY, use_tqdm=False)
        check(outs, want)
        assert all(o.num_cached_tokens >= 96 for o in outs)  # the 100-token prefix: 6 full blocks of 16
        assert llm.stats()["prefix"]["hit_tokens_by_tier"]["gpu"] > 0
        for tier in ("cpu", "nvme"):
            assert llm.pm.demote_cached(tier) > 0
            assert not any(
                b.tier < llm.pm.kinds[-1] and b.ref_count == 0 for b in llm.pm.blocks.values() if tier == "nvme"
            )
            before = llm.stats()["prefix"]["hit_tokens_by_tier"][tier]
            outs = llm.generate(prompts, GREEDY, use_tqdm=False)
            check(outs, want)
            assert all(o.num_cached_tokens >= 96 for o in outs)
            assert llm.stats()["prefix"]["hit_tokens_by_tier"][tier] > before, f"no hit served from {tier}"
        check_invariants(llm.pm)


def test_different_salts_do_not_share_and_reset_forgets(model, tmp_path):
    path, _, prompts, want = model
    with llm_for(path, tmp_path / "nvme") as llm:
        llm.generate(prompts[:1], SamplingParams(max_tokens=12, temperature=0, cache_salt="tenant-a"), use_tqdm=False)
        other = llm.generate(
            prompts[:1], SamplingParams(max_tokens=12, temperature=0, cache_salt="tenant-b"), use_tqdm=False
        )[0]
        same = llm.generate(
            prompts[:1], SamplingParams(max_tokens=12, temperature=0, cache_salt="tenant-a"), use_tqdm=False
        )[0]
        assert other.num_cached_tokens == 0 and same.num_cached_tokens >= 96
        assert other.outputs[0].token_ids == same.outputs[0].token_ids == want[0]
        assert llm.reset_prefix_cache() > 0
        again = llm.generate(
            prompts[:1], SamplingParams(max_tokens=12, temperature=0, cache_salt="tenant-a"), use_tqdm=False
        )[0]
        assert again.num_cached_tokens == 0 and again.outputs[0].token_ids == want[0]


def test_a_new_process_serves_the_prefixes_from_nvme(model, tmp_path):
    path, _, prompts, want = model
    nvme = tmp_path / "nvme"
    with llm_for(path, nvme) as llm:
        llm.generate(prompts, GREEDY, use_tqdm=False)  # close() writes the cached blocks down to NVMe
    code = textwrap.dedent(f"""
        import json, tierkv
        llm = tierkv.LLM({path!r}, device="cpu", gpu_blocks=12, cpu_blocks=12, nvme_dir={str(nvme)!r}, nvme_blocks=120, prefix_load="always")
        outs = llm.generate({prompts!r}, tierkv.SamplingParams(max_tokens=12, temperature=0), use_tqdm=False)
        print(json.dumps({{"cached": [o.num_cached_tokens for o in outs], "tokens": [o.outputs[0].token_ids for o in outs],
                          "nvme": llm.stats()["prefix"]["hit_tokens_by_tier"]["nvme"]}}))
        llm.close()
    """)
    import json

    result = json.loads(
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.splitlines()[-1]
    )
    assert all(c >= 96 for c in result["cached"]) and result["nvme"] > 0
    assert result["tokens"] == want


def test_kill_9_while_storing_leaves_a_store_that_opens_cleanly(model, tmp_path):
    path, hf, prompts, want = model
    nvme = tmp_path / "nvme"
    writer = textwrap.dedent(f"""
        import sys, torch, tierkv
        llm = tierkv.LLM({path!r}, device="cpu", gpu_blocks=4, cpu_blocks=4, nvme_dir={str(nvme)!r}, nvme_blocks=120, prefix_load="always")
        print("ready", flush=True)
        g = torch.Generator().manual_seed(int(sys.argv[1]))
        while True:  # new prefixes all the time: cached blocks are written down to NVMe all the time
            prompt = torch.randint(2, {hf.config.vocab_size}, (90,), generator=g).tolist()
            llm.generate([prompt] * 2, tierkv.SamplingParams(max_tokens=4, temperature=0), use_tqdm=False)
    """)
    for i, delay in enumerate((0.2, 0.5, 0.9, 1.4)):
        proc = subprocess.Popen(
            [sys.executable, "-c", writer, str(i)], stdout=subprocess.PIPE, text=True, start_new_session=True
        )
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(delay)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    with warnings.catch_warnings(record=True) as record, llm_for(path, nvme) as llm:  # opens cleanly, a valid index
        warnings.simplefilter("always")
        adopted = sum(1 for b in llm.pm.blocks.values() if b.key is not None)
        assert adopted > 0
        outs = llm.generate(prompts, GREEDY, use_tqdm=False)
        check(outs, want)
        check_invariants(llm.pm)
    assert not [w for w in record if "checksum" in str(w.message)], "a record vouched for a half-written block"


def test_a_block_altered_on_disk_is_detected_and_recomputed(model, tmp_path):
    path, _, prompts, want = model
    nvme = tmp_path / "nvme"
    with llm_for(path, nvme) as llm:
        llm.generate(prompts[:1], GREEDY, use_tqdm=False)
        stride = llm.pm.tiers[2].store.slot_stride
        slots = sorted(b.slot for b in llm.pm.blocks.values() if b.key is not None and b.tier == 2)
        assert not slots  # still in faster tiers; close() writes them down
    with llm_for(path, nvme) as llm:
        slots = sorted(b.slot for b in llm.pm.blocks.values() if b.key is not None)
    assert slots
    with open(os.path.join(nvme, "blocks.bin"), "r+b") as f:  # damage every stored block
        for slot in slots:
            f.seek(HEADER_NBYTES + slot * stride + 33)
            byte = f.read(1)
            f.seek(HEADER_NBYTES + slot * stride + 33)
            f.write(bytes([byte[0] ^ 0x55]))
    with pytest.warns(RuntimeWarning, match="failed their checksum"), llm_for(path, nvme) as llm:
        out = llm.generate(prompts[:1], GREEDY, use_tqdm=False)[0]
        assert out.num_cached_tokens == 0 and out.outputs[0].token_ids == want[0]
        assert llm.stats()["prefix"]["dropped_corrupt_tokens"] > 0
        check_invariants(llm.pm)


def test_a_store_of_another_model_is_dropped_and_two_processes_are_refused(model, tmp_path):
    path, _, prompts, _ = model
    nvme = tmp_path / "nvme"
    with llm_for(path, nvme) as llm:
        llm.generate(prompts[:1], GREEDY, use_tqdm=False)
    other = tmp_path / "other"
    make_checkpoint(other, "llama", seed=1)  # same config, different weights: a fine-tune must not share
    with pytest.warns(RuntimeWarning, match="written by another model"), llm_for(str(other), nvme) as llm:
        assert not llm.pm.index
        assert llm.generate(prompts[:1], GREEDY, use_tqdm=False)[0].num_cached_tokens == 0
    with pytest.warns(RuntimeWarning, match="written by another model"), llm_for(path, nvme):  # back to the first model
        code = (
            f"import tierkv; tierkv.LLM({path!r}, device='cpu', gpu_blocks=12, nvme_dir={str(nvme)!r}, nvme_blocks=120)"
        )
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert proc.returncode != 0 and "is in use by another tierkv process" in proc.stderr


def test_lookup_needs_the_tokens_to_match_not_only_the_key(tmp_path):
    from tierkv import KVLayout, PageManager, PageManagerConfig

    layout = KVLayout(2, 1, 4, torch.float32, 4)
    with PageManager(PageManagerConfig(layout, gpu_blocks=4)) as pm:
        pm.add_sequence("a")
        pm.append_tokens("a", 8)
        write_tokens(pm, "a", 0, torch.randn(2, 2, 8, 1, 4))
        assert pm.register("a", 0, b"k0", (1, 2, 3, 4)) and pm.register("a", 1, b"k1", (5, 6, 7, 8))
        assert [b.key for b in pm.lookup([b"k0", b"k1"], [(1, 2, 3, 4), (5, 6, 7, 8)])] == [b"k0", b"k1"]
        assert [b.key for b in pm.lookup([b"k0", b"k1"], [(1, 2, 3, 4), (5, 6, 7, 9)])] == [b"k0"]  # a "collision"
        pm.free("a")
        assert pm.cached[0] == 2 and pm.free_blocks() == 4  # cached blocks count as free room


def test_keys_chain_over_the_prefix_and_the_salt():
    h = PrefixHasher("fingerprint", 4)
    a = h.keys(h.root(None), [1, 2, 3, 4, 5, 6, 7, 8], 2)
    b = h.keys(h.root(None), [9, 2, 3, 4, 5, 6, 7, 8], 2)
    assert a[1] != b[1]  # same block tokens, different prefix
    assert h.keys(h.root("x"), [1, 2, 3, 4], 1)[0] != a[0]
    assert PrefixHasher("other-model", 4).keys(PrefixHasher("other-model", 4).root(None), [1, 2, 3, 4], 1)[0] != a[0]


def test_load_or_recompute_follows_the_measured_rates():
    c = LoadOrRecompute(block_nbytes=2 * 2**20, block_size=16)
    assert c.choose(["nvme"] * 8, 200) == 8  # nothing measured yet: load what was found
    c.observe_prefill(16_000, 1.0)  # 16k tokens/s: one block (16 tokens) recomputes in 1 ms
    c.bandwidth.update({"cpu->gpu": 50e9, "nvme->cpu": 1e9})  # a block loads in 0.04 ms from RAM, 2 ms from disk
    assert c.choose(["cpu"] * 8, 200) == 8
    assert c.choose(["nvme"] * 8, 200) == 0  # slower from disk than recomputing: recompute
    assert c.choose(["gpu", "gpu", "cpu", "nvme", "nvme"], 200) == 3  # load the fast part, recompute the rest


def test_a_prefix_recomputed_by_choice_is_found_in_its_faster_new_copy_next_time(model, tmp_path):
    """Recomputing a prefix found on NVMe (the choice said disk was slower) gives the same tokens' KV in a faster
    tier: the key moves there. Left on disk, every later request would find it there and recompute it again."""
    path, _, prompts, want = model
    with llm_for(path, tmp_path / "nvme", prefix_load="auto") as llm:
        check(llm.generate(prompts[:1], GREEDY, use_tqdm=False), want)
        assert llm.pm.demote_cached("nvme") > 0
        chooser = llm.engine.prefix.chooser
        chooser.observe_links = chooser.observe_prefill = lambda *a: None  # these rates, whatever runs measure
        chooser.prefill_tokens_per_s = 1e6
        chooser.bandwidth = {"cpu->gpu": 1e12, "nvme->gpu": 1e3, "nvme->cpu": 1e3}  # disk: far slower
        outs = llm.generate(prompts[1:2], GREEDY, use_tqdm=False)
        check(outs, want[1:2])
        prefix = llm.stats()["prefix"]
        assert outs[0].num_cached_tokens == 0 and prefix["recomputed_by_choice"] >= 96
        assert llm.stats()["superseded_cached_blocks"] >= 6
        outs = llm.generate(prompts[2:3], GREEDY, use_tqdm=False)
        check(outs, want[2:3])
        assert outs[0].num_cached_tokens >= 96  # found in the GPU or CPU tier this time, and loaded
        assert llm.stats()["prefix"]["recomputed_by_choice"] == prefix["recomputed_by_choice"]
        check_invariants(llm.pm)


def test_the_choice_goes_by_large_batches_and_keeps_its_calibration():
    """Small batches measure their fixed latency, and a batch whose launches the host was slow to issue measures the
    host: neither may make the link read slow (in a server on the H200 one did, 0.47 GB/s against 43 measured at
    start-up, and every prefix found in the CPU tier was then recomputed, its rate never measured again)."""
    c = LoadOrRecompute(block_nbytes=2 * 2**20, block_size=16)
    c.bandwidth["cpu->gpu"] = 43e9  # calibrated at start-up
    link = LinkStats()
    link.nbytes, link.blocks = 2 * 2**20, 1
    link.note_batch(2 * 2**20, 0.005)  # one block in 5 ms
    c.observe_links({("cpu", "gpu"): link})
    assert c.bandwidth["cpu->gpu"] == 43e9
    link.note_batch(64 * 2**20, 0.35, host_seconds=0.35)  # the device waited for the host to issue it
    c.observe_links({("cpu", "gpu"): link})
    assert c.bandwidth["cpu->gpu"] == 43e9
    link.note_batch(64 * 2**20, 0.1)  # stalled: 0.67 GB/s
    link.note_batch(64 * 2**20, 64 * 2**20 / 50e9)
    link.note_batch(64 * 2**20, 0.2)
    c.observe_links({("cpu", "gpu"): link})
    assert c.bandwidth["cpu->gpu"] == pytest.approx(50e9)


def test_a_full_gpu_tier_evicts_a_cached_prefix_from_its_tail(model):
    """With no tier below the GPU, a cached prefix that must give up room loses its last blocks first: its first
    ones still serve the next request with that prefix (a prefix missing its first block serves nothing, however
    many of its later blocks stay)."""
    path, _, prompts, want = model
    with tierkv.LLM(path, device="cpu", gpu_blocks=12, enable_prefix_caching=True) as llm:
        check(llm.generate(prompts[:1], GREEDY, use_tqdm=False), want[:1])  # 105 + 12 tokens: 7 blocks, 6 keyed
        other = torch.randint(2, 100, (90,), generator=torch.Generator().manual_seed(9)).tolist()
        llm.generate([other], GREEDY, use_tqdm=False)  # 7 blocks: 2 of the cached ones give way
        outs = llm.generate(prompts[1:2], GREEDY, use_tqdm=False)
        check(outs, want[1:2])
        assert outs[0].num_cached_tokens >= 3 * 16, outs[0].num_cached_tokens


def test_write_through_keeps_the_disk_cache_complete_even_after_kill_9(model, tmp_path):
    """Write-back writes cached blocks down at eviction or close(); write-through writes them as they are keyed,
    so a process killed with SIGKILL (no close) still leaves its prefixes to the next one."""
    path, _, prompts, want = model
    nvme = tmp_path / "nvme"
    code = textwrap.dedent(f"""
        import os, signal, tierkv
        llm = tierkv.LLM({path!r}, device="cpu", gpu_blocks=12, cpu_blocks=12, nvme_dir={str(nvme)!r}, nvme_blocks=120,
                         prefix_load="always", write_through=True)
        llm.generate({prompts!r}, tierkv.SamplingParams(max_tokens=12, temperature=0), use_tqdm=False)
        llm.pm.flush_copies()  # the last step's blocks (the engine flushes at the start of each step)
        llm.pm.synchronize()
        only_in_memory = sum(1 for b in llm.pm.index.values() if b.tier != 2 and b.disk_copy is None)
        print(len(llm.pm.index), only_in_memory, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    keyed, only_in_memory = map(int, proc.stdout.split())
    assert proc.returncode == -signal.SIGKILL and keyed > 0 and only_in_memory == 0
    with llm_for(path, nvme) as llm:
        outs = llm.generate(prompts, GREEDY, use_tqdm=False)
        check(outs, want)
        assert all(o.num_cached_tokens >= 96 for o in outs)
        assert llm.stats()["prefix"]["hit_tokens_by_tier"]["nvme"] > 0


def test_requests_arriving_together_share_one_load_of_a_cached_prefix(model, tmp_path):
    path, _, prompts, want = model
    with llm_for(path, tmp_path / "nvme") as llm:
        llm.generate(prompts[:1], GREEDY, use_tqdm=False)
        assert llm.pm.demote_cached("nvme") > 0
        llm.pm.reset_counters()
        outs = llm.generate(prompts, GREEDY, use_tqdm=False)  # five requests, one prefix on disk
        check(outs, want)
        assert all(o.num_cached_tokens >= 96 for o in outs)
        links = llm.stats()["links"]
        read = sum(v["blocks"] for k, v in links.items() if k.startswith("nvme->"))
        assert read <= 8, f"the shared prefix was read {read} blocks' worth from disk: more than once"


@pytest.mark.parametrize("lookahead", [0, 64])
def test_eviction_passes_over_prefixes_that_waiting_requests_will_reuse(model, lookahead):
    """The same prompts twice, each pass submitted at once, on a GPU tier that holds a few of them and a CPU tier
    that holds all. In pass 2, plain LRU (lookahead 0) evicts each cached prompt from the GPU just before its
    request comes back for it: every hit is loaded from the CPU tier. Passing over what waiting requests will reuse,
    the last prompts of pass 1 are still on the GPU when their requests start, and the blocks of pass-2 requests
    just finished (which nothing queued needs) give way instead. Same tokens either way."""
    path, hf, _, _ = model
    g = torch.Generator().manual_seed(11)
    prompts = [torch.randint(2, hf.config.vocab_size, (50,), generator=g).tolist() for _ in range(8)]
    with tierkv.LLM(path, device="cpu", gpu_blocks=14, cpu_blocks=80, prefix_load="always", max_num_seqs=2) as llm:
        llm.engine.prefix.queued_lookahead = lookahead
        first = llm.generate(prompts, GREEDY, use_tqdm=False)
        before = dict(llm.stats()["prefix"]["hit_tokens_by_tier"])
        second = llm.generate(prompts, GREEDY, use_tqdm=False)
        hits = {k: v - before[k] for k, v in llm.stats()["prefix"]["hit_tokens_by_tier"].items()}
        check_invariants(llm.pm)
    assert [o.outputs[0].token_ids for o in second] == [o.outputs[0].token_ids for o in first]
    assert hits["gpu"] + hits["cpu"] == 8 * 3 * 16  # every prompt's 3 full blocks found again, in one tier or other
    if lookahead:
        assert hits["gpu"] >= 2 * 3 * 16, hits  # at least the last two prompts of pass 1, from the GPU
    else:
        assert hits["gpu"] == 0, hits  # LRU under a cyclic reread: each evicted just before its reuse
