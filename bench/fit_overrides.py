"""fit a folder once per setting of `TrainConfig` overrides, through the library; one line each.

    python bench/fit_overrides.py FOLDER default lr=1e-3 adam_b2=0.999,lr=3e-3 edge_share=0

Each line: mean and min PSNR, the guard's rollbacks and restarts, seconds, its first events
(the sweep of issue 23, "One failure policy" in bench/RESULTS.md).
"""
import dataclasses
import sys
import tempfile
import time

from neurimg.config import Config
from neurimg.fit import fit
from neurimg import guard
folder = sys.argv[1]
for spec in sys.argv[2:]:
    kw = dict(kv.split("=") for kv in spec.split(",")) if spec != "default" else {}
    t = Config().train
    tr = {k: (type(getattr(t, k) if getattr(t, k) is not None else 1.0))(v) for k, v in kw.items()}
    cfg = Config(Config().model, dataclasses.replace(t, **tr))
    msgs = []
    class Rep:
        def start(s,*a): pass
        def update(s,*a,**k): pass
        def stop(s): pass
        def message(s,m): msgs.append(m)
    t0 = time.time()
    try:
        r = fit([folder], tempfile.mkdtemp() + "/run", cfg, overwrite=True, reporter=Rep())
        ev = [m for m in msgs if "redoing" in m or "starting again" in m]
        print(f"{spec}: {r.mean_psnr:.2f} dB min {r.worst['psnr']:.2f} rb {r.rollbacks} rs {r.restarts} {time.time()-t0:.0f}s {ev[:2]}", flush=True)
    except guard.TrainingFailed as e:
        print(f"{spec}: FAILED {e.reason}", flush=True)
