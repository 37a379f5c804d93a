"""PSNR of a trained GAN blender on the 56 ordered pairs of the 8 held-out logos of logos64
(the held-out set of bench/gan_curve.py), against the exact mixed blend.

    python bench/gan_eval.py BLENDER
"""
import os, sys
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__))); sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
from pathlib import Path
import gan_blend as gb
from neurimg.blender import Blender
files, imgs, names = gb.held_out_images()
pairs = [(i, j) for i in range(len(imgs)) for j in range(len(imgs)) if i != j]
sub = [(i, j) for i, j in pairs if i < 8 and j < 8]
g = Blender.load(Path(sys.argv[1]))
o = [g.blend(imgs[i], imgs[j]) for i, j in sub]
r = gb.scores(o, imgs, sub, [0.0])
print(sys.argv[1], g.step, 'logos64 held-out 56 pairs:', round(r['psnr_vs_exact'], 2), 'min', round(r['min_psnr'], 2))
