"""The caching allocator for large host tensors (``runtime.cache_host_memory``, ``csrc/host_cache.cpp``).

It replaces the CPU allocator of the whole process, so each test runs its checks in a fresh Python process.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from columnformer import native

pytestmark = pytest.mark.skipif(not native.available(), reason="the C++ kernels could not be built here")

MIB = 1 << 20


def _run(code: str) -> dict:
    """Run ``code`` (which prints one JSON object last) in a fresh interpreter; return that object."""
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_freed_block_serves_the_next_request_of_its_size():
    r = _run("""
        import json, torch
        from columnformer.runtime import cache_host_memory, host_cache_stats
        assert cache_host_memory()
        a = torch.empty(4 << 20 >> 2)            # 4 MiB
        pa = a.data_ptr(); del a
        b = torch.empty((4 << 20) // 4 - 1000)    # a little less: the same 2 MiB-rounded size
        small = torch.empty(1000)                  # below min_bytes: not the cache's
        s = host_cache_stats()
        print(json.dumps({"same": b.data_ptr() == pa, "small_live": s["live_bytes"], **s}))
    """)
    assert r["same"] and r["hits"] == 1 and r["misses"] == 1
    assert r["small_live"] == 4 * MIB  # only b is the cache's


def test_a_new_block_takes_the_pages_of_cached_blocks_so_the_footprint_stays_at_the_most_ever_alive():
    r = _run("""
        import json, torch
        from columnformer.runtime import cache_host_memory, host_cache_stats
        assert cache_host_memory()
        a = torch.empty(16 << 20 >> 2); b = torch.empty(16 << 20 >> 2)   # 32 MiB alive at most
        a.fill_(1.0); b.fill_(2.0)
        del a, b                                                         # both cached
        c = torch.empty(24 << 20 >> 2)    # no cached block is >= 24 MiB: built from 16 + 8 MiB of theirs
        s = host_cache_stats()
        c.fill_(3.0)                      # every page of the new block is writable memory
        d = torch.empty(8 << 20 >> 2)     # the rest of the second cached block serves this
        d.fill_(4.0)
        print(json.dumps({"c": c.sum().item(), "d": d.sum().item(), "after": host_cache_stats(), **s}))
    """)
    assert r["misses"] == 3 and r["hits"] == 0
    assert r["moved_bytes"] == 24 * MIB and r["fresh_bytes"] == 32 * MIB  # only a and b were new memory
    assert r["cached_bytes"] == 8 * MIB and r["live_bytes"] == 24 * MIB  # 32 MiB held, as at the peak
    assert r["c"] == 3.0 * (24 << 20 >> 2) and r["d"] == 4.0 * (8 << 20 >> 2)
    assert r["after"]["hits"] == 1 and r["after"]["cached_bytes"] == 0 and r["after"]["live_bytes"] == 32 * MIB


def test_a_larger_cached_block_serves_a_request_up_to_a_quarter_smaller():
    r = _run("""
        import json, torch
        from columnformer.runtime import cache_host_memory, host_cache_stats
        assert cache_host_memory()
        a = torch.empty(20 << 20 >> 2); pa = a.data_ptr(); del a
        b = torch.empty(16 << 20 >> 2)    # 20 <= 1.25 * 16: served by a's block
        hit = b.data_ptr() == pa; del b
        c = torch.empty(12 << 20 >> 2)    # 20 > 1.25 * 12: a new block, its pages taken from the 20 MiB one
        print(json.dumps({"hit": hit, "moved": c.data_ptr() != pa, **host_cache_stats()}))
    """)
    assert r["hit"] and r["moved"] and r["hits"] == 1 and r["misses"] == 2
    assert r["moved_bytes"] == 12 * MIB and r["fresh_bytes"] == 20 * MIB
    assert r["live_bytes"] == 12 * MIB and r["cached_bytes"] == 8 * MIB


def test_training_steps_give_the_same_numbers_and_stop_missing_after_the_first_step():
    """A recurrent sparse sheet trained 3 steps with the cache equals the same run without it; in the third step
    most large requests are served by a cached block and the rest by pages moved from cached ones: no new memory."""
    code = """
        import json, sys, torch
        from columnformer import Columnformer, SheetConfig, grid
        from columnformer.connectivity import Connectivity
        from columnformer.runtime import cache_host_memory, host_cache_stats
        use = sys.argv[1] == "1"
        if use:
            assert cache_host_memory(min_bytes=64 << 10)
        torch.manual_seed(0)
        geo = grid(32, 32)
        cfg = SheetConfig(width=32, steps=3, recurrent=True, qk_dim=16, mlp_ratio=1.0, untied_attn=True,
                          untied_mlp=True, untied_norm=True, sparse_kernel="fused", checkpoint=True)
        model = Columnformer(cfg, geo, Connectivity.local(geo, 16), input_area="all", output_area="all")
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        x = torch.randn(8, geo.n, 32)
        losses, counts = [], []
        for _ in range(3):
            out, trace = model(x)
            loss = out.square().mean() + 0.01 * trace.wiring_cost
            loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
            counts.append(host_cache_stats() if use else {})
        w = torch.cat([p.detach().flatten() for p in model.parameters()])
        print(json.dumps({"losses": losses, "counts": counts, "wsum": w.double().sum().item(),
                          "wabs": w.double().abs().sum().item()}))
    """
    ref = _run(code.replace("sys.argv[1]", "'0'"))
    got = _run(code.replace("sys.argv[1]", "'1'"))
    assert got["losses"] == ref["losses"] and got["wsum"] == ref["wsum"] and got["wabs"] == ref["wabs"]
    second, third = got["counts"][1], got["counts"][2]
    hits, misses = third["hits"] - second["hits"], third["misses"] - second["misses"]
    assert hits > 50 and misses <= 0.3 * (hits + misses), (hits, misses)
    assert third["fresh_bytes"] == second["fresh_bytes"], "the third step mapped new memory"
    assert third["moved_bytes"] > second["moved_bytes"] or misses == 0


def test_past_its_limit_on_memory_mappings_it_stops_moving_pages_and_maps_fresh_blocks():
    """Moving pages splits memory mappings, of which a process may hold only vm.max_map_count: above the limit
    (counted every 16 misses) misses are served by fresh blocks, cached ones given back whole, and the process's
    mapping count stops growing; by default the limit is half of vm.max_map_count."""
    code = """
        import json, torch
        from columnformer import Columnformer, SheetConfig, grid
        from columnformer.connectivity import Connectivity
        from columnformer.runtime import cache_host_memory, host_cache_stats
        maps = lambda: sum(1 for _ in open("/proc/self/maps"))
        torch.manual_seed(0)
        geo = grid(32, 32)
        cfg = SheetConfig(width=32, steps=3, recurrent=True, qk_dim=16, mlp_ratio=1.0, untied_attn=True,
                          untied_mlp=True, untied_norm=True, sparse_kernel="fused")
        model = Columnformer(cfg, geo, Connectivity.local(geo, 16), input_area="all", output_area="all")
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        x = torch.randn(8, geo.n, 32)
        out, trace = model(x)  # one step without the cache: the kernels and the thread pool take their mappings
        out.square().mean().backward(); opt.zero_grad(set_to_none=True)
        LIMIT
        counts, fresh = [], []
        for _ in range(4):
            out, trace = model(x)
            (out.square().mean() + 0.01 * trace.wiring_cost).backward(); opt.step(); opt.zero_grad(set_to_none=True)
            counts.append(maps()); fresh.append(host_cache_stats()["fresh_bytes"])
        print(json.dumps({"limit": limit, "counts": counts, "fresh": fresh, **host_cache_stats()}))
    """
    low = _run(code.replace("LIMIT", "limit = maps() + 8; assert cache_host_memory(min_bytes=64 << 10, max_mappings=limit)"))
    assert low["max_mappings"] == low["limit"] and low["mappings"] > low["limit"]
    # past the limit misses are served by fresh blocks (one mapping each; the cache needs more blocks than the limit
    # left room for, so the count stays above it, but it stops growing)
    assert low["fresh"][3] > low["fresh"][2], "past the limit, misses should be served by fresh blocks"
    assert low["counts"][3] <= low["counts"][1] + 4, low["counts"]
    default = _run(code.replace("LIMIT", "assert cache_host_memory(min_bytes=64 << 10); limit = 0"))
    with open("/proc/sys/vm/max_map_count") as f:
        assert default["max_mappings"] == int(f.read()) // 2
    assert default["fresh"][3] == default["fresh"][2]  # far below it: pages moved, nothing new


def test_disable_frees_the_cache_and_new_blocks_bypass_it():
    r = _run("""
        import json, torch
        from columnformer import native
        from columnformer.runtime import cache_host_memory, host_cache_stats
        assert cache_host_memory()
        a = torch.empty(8 << 20 >> 2); del a
        before = host_cache_stats()["cached_bytes"]
        native.load().host_cache_disable()
        b = torch.empty(8 << 20 >> 2)
        print(json.dumps({"before": before, **host_cache_stats()}))
    """)
    assert r["before"] == 8 * MIB and r["cached_bytes"] == 0 and r["live_bytes"] == 0 and r["hits"] == 0


def test_the_trainer_installs_it_when_asked(tmp_path):
    r = _run(f"""
        import json
        from columnformer.config import build_config
        from columnformer.runtime import host_cache_stats
        from columnformer.train import Trainer
        from pathlib import Path
        cfg = build_config({{}}, ["preset=digits", "model.sheet.width=16", "model.sheet.steps=1", "train.epochs=1",
                                 "train.max_steps=2", "train.progress=false", "train.figures=false",
                                 "train.cache_host_memory=true", "out_dir={tmp_path}", "name=c"])
        t = Trainer(cfg, Path({str(tmp_path)!r}) / "c")
        print(json.dumps({{"cached": t.host_memory_cached, "installed": host_cache_stats() is not None}}))
    """)
    assert r["cached"] is True and r["installed"]
