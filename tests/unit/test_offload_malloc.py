"""dtrain/hostmem.py's one malloc policy: a layout's default applies unless a plugin claimed the
policy (the offload tier's ``malloc_mmap_mb``), whichever runs first; the offload plugin states
its policy there, not by the layout looking the plugin up."""
import dtrain.hostmem as hostmem


def test_claimed_policy_wins_over_the_default(monkeypatch):
    monkeypatch.setattr(hostmem, "_claimed", None)
    calls = []
    assert hostmem.default_policy(lambda: calls.append("default")) is True
    hostmem.claim_policy("offload", lambda: calls.append("offload"))
    assert hostmem.default_policy(lambda: calls.append("default again")) is False
    assert calls == ["default", "offload"] and hostmem._claimed == "offload"


def test_offload_lean_policy_is_claimed_and_the_layout_keeps_its_default(monkeypatch, tmp_path):

    import dtrain
    from tests.dist.workloads import make_model, optimizer_factory

    monkeypatch.setattr(hostmem, "_claimed", None)
    applied = []
    monkeypatch.setattr(hostmem, "keep_freed_memory", lambda n: applied.append(("keep", n)))
    monkeypatch.setattr(hostmem, "map_large_blocks", lambda n: applied.append(("map", n)))
    import dtrain.offload.plugin as plugin
    import dtrain.plugins.zero as zero
    monkeypatch.setattr(zero, "keep_freed_memory", hostmem.keep_freed_memory)
    monkeypatch.setattr(plugin, "map_large_blocks", hostmem.map_large_blocks)
    monkeypatch.setattr(plugin, "limit_arenas", lambda n: applied.append(("arenas", n)))
    cfg = {"zero": {"stage": 3, "malloc_keep_mb": 64},
           "offload": {"enabled": True, "optim": "host", "malloc_mmap_mb": 2}}
    engine = dtrain.wrap(make_model(), optimizer=optimizer_factory, config=cfg)
    engine.close()
    assert applied == [("keep", 64 << 20), ("arenas", 1), ("map", 2 << 20)], applied
