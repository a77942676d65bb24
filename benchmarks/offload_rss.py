"""Where the offload run's peak RSS goes (a diagnostic, not a timed benchmark; BENCHMARKS.md,
offload, fourth session): a 0.5 ms RSS poller labelled by step phase, glibc's ``mallinfo2()``
(in use, free kept in the heap, mmapped) and arena count at the peak of steps 2-7, and the live
bytes the layout and tier account for. One rank, ``mid`` GPT (``PRESET=deep``: the 12-layer one), batch 1,
the benchmark's budget::

    PYTHONPATH=$PWD python benchmarks/offload_rss.py nvme|serial|memory|tiny
    POLICY=keep=1024,arena=1 TRIM=2 ... # claim a malloc policy first (keep/mmap/trim MB, arena
                                        # count); TRIM=N: malloc_trim(0) after the first N steps
"""
import ctypes, os, sys, threading, time, tempfile, statistics, re
os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                  MASTER_PORT=os.environ.get("PORT", "29641"))
import torch
torch.set_num_threads(1)
sys.path.insert(0, os.getcwd())
from benchmarks.offload import _model, _batch
import dtrain
from dtrain.offload import pipeline as P

libc = ctypes.CDLL("libc.so.6")
class MI2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc.mallinfo2.restype = MI2
def mi():
    m = libc.mallinfo2(); return {k: getattr(m, k) for k, _ in MI2._fields_}
def arenas():
    libc.open_memstream.restype = ctypes.c_void_p
    buf = ctypes.c_char_p(); size = ctypes.c_size_t()
    fp = libc.open_memstream(ctypes.byref(buf), ctypes.byref(size))
    libc.malloc_info(0, ctypes.c_void_p(fp)); libc.fclose(ctypes.c_void_p(fp))
    x = ctypes.string_at(buf, size.value).decode(); libc.free(buf)
    return len(re.findall(r'<heap nr=', x)), x
PAGE = os.sysconf("SC_PAGE_SIZE")
def rss():
    with open("/proc/self/statm") as f: return int(f.read().split()[1]) * PAGE
MiB = 2**20
mode = sys.argv[1] if len(sys.argv) > 1 else "nvme"
policy = os.environ.get("POLICY", "")
tmp = tempfile.mkdtemp(dir="/tmp")
model = _model("tiny" if mode == "tiny" else os.environ.get("PRESET", "mid")); n = sum(p.numel() for p in model.parameters())
budget = (8*n + 8*n/3)/2**30
cfg = {"zero": {"stage": 3}}
if mode != "memory" and mode != "tiny":
    cfg["offload"] = {"enabled": True, "optim": "nvme", "dir": tmp, "memory_budget_gb": budget, "overlap": mode != "serial"}
import dtrain.hostmem as hm
if policy:
    def apply():
        for item in policy.split(","):
            k, _, v = item.partition("=")
            if k == "arena": hm.limit_arenas(int(v))
            elif k == "keep": hm.keep_freed_memory(int(float(v) * 2**20))
            elif k == "mmap": hm.map_large_blocks(int(float(v) * 2**20))
            elif k == "trim": hm._mallopt((hm.M_TRIM_THRESHOLD, int(float(v) * 2**20)))
    hm.claim_policy("experiment", apply)
engine = dtrain.wrap(model, optimizer=lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.01), config=cfg)
phase = ["idle"]; peak = {"rss": 0}
stop = False
def poll():
    while not stop:
        r = rss()
        if r > peak["rss"]:
            peak.update(rss=r, phase=phase[0], mi=mi())
        time.sleep(0.0005)
# saved activations bytes
saved = {"bytes": 0}
def pack(t):
    saved["bytes"] += t.untyped_storage().nbytes() if t.untyped_storage().data_ptr() not in saved.setdefault("seen", set()) else 0
    saved["seen"].add(t.untyped_storage().data_ptr()); return t
model.register_forward_hook(lambda m, i, o: phase.__setitem__(0, "backward"))
plugin = next((p for p in engine.plugins if p.name == "offload"), None)
lay = engine.layout
def gathered():
    return sum(u.full.untyped_storage().nbytes() for u in lay.units if u.full is not None)
ofb = lay.finish_backward
live = {}
def fb():
    live["gathered_before_fb"] = gathered(); live["rss_end_bwd"] = rss(); ofb(); phase[0] = "after-backward"
lay.finish_backward = fb
times = []
th = threading.Thread(target=poll, daemon=True); th.start()
for s in range(8):
    if s == 2:
        peak = {"rss": 0}
    saved.clear(); saved["bytes"] = 0
    phase[0] = "forward"
    t = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        engine.train_step(_batch(s, 1, model.cfg.vocab_size))
    times.append(time.perf_counter() - t); phase[0] = "between"
    trim_at = os.environ.get("TRIM", "")
    if trim_at == "all" or (trim_at and s < int(trim_at)):
        libc.malloc_trim(0)
    if s == 1: print("after step 1: rss", round(rss()/MiB,1), "mallinfo", {k: round(v/MiB,1) for k, v in mi().items() if k in ("uordblks","fordblks","hblkhd")})
stop = True; th.join()
sb = lay.state_bytes()
print(f"mode={mode} policy={policy!r} steps median {statistics.median(times[2:]):.3f}s")
print(f"peak RSS (steps 2-7) {peak['rss']/MiB:.1f} MiB in phase {peak['phase']}; VmHWM total {int(open('/proc/self/status').read().split('VmHWM:')[1].split()[0])/1024:.1f} MiB")
m = peak["mi"]
print("mallinfo2 at peak (MiB): " + ", ".join(f"{k} {m[k]/MiB:.1f}" for k in ("arena", "uordblks", "fordblks", "hblkhd", "keepcost")) + f", hblks {m['hblks']}")
na, xml = arenas(); print("arenas", na)
print("state_bytes (MiB):", {k: round(v/MiB, 1) for k, v in sb.items()})
if plugin is not None:
    st = plugin.store
    print("pool MiB", round(st.pool_bytes()/MiB, 1), "resident state MiB", round(st.bytes_at_rest("device")/MiB, 1))
print("autograd saved bytes (unique storages, last step) MiB", round(saved["bytes"]/MiB, 1))
print("gathered at finish_backward MiB", round(live.get("gathered_before_fb", 0)/MiB, 1), "rss at end of backward", round(live.get("rss_end_bwd", 0)/MiB, 1))
engine.close()
__import__("shutil").rmtree(tmp, ignore_errors=True)
