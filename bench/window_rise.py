"""Largest rise of a window mean over the best window before it, past the warm-up (step 100),
from loss.csv files written with --log-every 25."""
import sys, csv
for p in sys.argv[1:]:
    rows = [(int(r["step"]), float(r["loss"])) for r in csv.DictReader(open(p))][1:]
    best, worst, at = float("inf"), 0.0, 0
    for s, l in rows:
        if s > 100 and best < float("inf") and l / best > worst:
            worst, at = l / best, s
        best = min(best, l)
    print(f"{p}: max rise {worst:.3f}x at step {at}")
