"""Trace offload steps (a diagnostic; BENCHMARKS.md, offload, fourth session): forward's end,
each unit's report (``submit``), each chunk's read / step / write interval and the join, in ms
from the step's start, for the last of ``TSTEPS`` steps (default 6). One rank, ``mid`` GPT
(``PRESET=deep``: the 12-layer one), the benchmark's budget::

    PYTHONPATH=$PWD TSTEPS=11 python benchmarks/offload_trace.py overlap|serial [batch]
"""
import os, sys, time, json, tempfile
os.environ.setdefault("RANK","0"); os.environ.setdefault("WORLD_SIZE","1"); os.environ.setdefault("LOCAL_RANK","0")
os.environ.setdefault("LOCAL_WORLD_SIZE","1"); os.environ.setdefault("MASTER_ADDR","127.0.0.1"); os.environ.setdefault("MASTER_PORT","29633")  # one rank, loopback
import torch
torch.set_num_threads(1)
sys.path.insert(0, os.getcwd())
from benchmarks.offload import _model, _batch
import dtrain
from dtrain.offload import pipeline as P
overlap = sys.argv[1] != "serial" if len(sys.argv) > 1 else True
batch = int(sys.argv[2]) if len(sys.argv) > 2 else 1
tmp = tempfile.mkdtemp(dir="/tmp")
model = _model(os.environ.get("PRESET", "mid")); n = sum(p.numel() for p in model.parameters())
budget = (8*n + 8*n/3)/2**30
cfg = {"zero":{"stage":3},"offload":{"enabled":True,"optim":"nvme","dir":tmp,"overlap":overlap,"memory_budget_gb":budget}}
engine = dtrain.wrap(model, optimizer=lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.01), config=cfg)
ev = []
T0 = [0.0]
def mark(name, **kw): ev.append((time.perf_counter()-T0[0], name, kw))
orig = {k: getattr(P.StepPipeline, k) for k in ("_read","_step","_write","submit","join")}
def wrap(k):
    f = orig[k]
    def g(self, *a, **kw):
        tag = getattr(a[0], "unit", None); tag = (tag.spec.index if tag is not None else a[0] if k=="submit" else None)
        mark(k+"+", u=tag); r = f(self, *a, **kw); mark(k+"-", u=tag); return r
    return g
for k in orig: setattr(P.StepPipeline, k, wrap(k))
plugin = next(p for p in engine.plugins if p.name=="offload")
def fwd_hook(m, i, o): mark("fwd_end")
model.register_forward_hook(fwd_hook)
ofb = engine.layout.finish_backward
def fb(): mark("finish_backward+"); ofb(); mark("finish_backward-")
engine.layout.finish_backward = fb
times=[]
for s in range(int(os.environ.get("TSTEPS", "6"))):
    ev.clear(); T0[0]=time.perf_counter()
    engine.train_step(_batch(s, batch, model.cfg.vocab_size))
    times.append(time.perf_counter()-T0[0]); mark("end")
import statistics; print("steps", [round(t,3) for t in times], "median", round(statistics.median(times[1:]),4))
print("units", [(u.spec.index, u.spec.name, u.tier, len(u.chunks), u.hi-u.lo) for u in plugin.store.units.values()])
for t, name, kw in ev:
    print(f"{t*1000:7.1f} {name} {kw.get('u','')}")
engine.close()
__import__("shutil").rmtree(tmp, ignore_errors=True)
