"""The 48 check logos plus four hard 64x64 images (1-pixel stripes, a 2-pixel checkerboard,
small text, a photo crop): the worst-image probe of issue 23.

    python bench/logo_sets.py check /tmp/check48 && python bench/photos.py /tmp/photos256 --size 256
    python bench/hard_images.py /tmp/hard52 && neurimg fit /tmp/hard52 -o /tmp/rhard --json
"""
import sys, shutil, os
import numpy as np
from PIL import Image, ImageDraw, ImageFont
out = sys.argv[1]
os.makedirs(out, exist_ok=True)
for f in os.listdir('/tmp/check48'):
    shutil.copy(f'/tmp/check48/{f}', out)
# text
im = Image.new('RGB', (64, 64), 'white'); d = ImageDraw.Draw(im)
font = ImageFont.load_default()
for i in range(6):
    d.text((2, 2 + 10 * i), "neurimg SIREN"[: 6 + i], fill=(20, 20, 120), font=font)
im.save(f'{out}/zz-text.png')
# stripes, 2-pixel period, and a fine checkerboard in two colours
y, x = np.mgrid[0:64, 0:64]
s = np.where((x // 1) % 2 == 0, 255, 0).astype(np.uint8)
Image.fromarray(np.stack([s, 255 - s // 2, s // 3], -1)).save(f'{out}/zz-stripes.png')
c = (((x // 2) + (y // 2)) % 2 * 255).astype(np.uint8)
Image.fromarray(np.stack([c, c // 2, 255 - c], -1)).save(f'{out}/zz-checker.png')
# a photo crop
ph = Image.open('/tmp/photos256/astronaut.png').resize((64, 64), Image.BOX); ph.save(f'{out}/zz-photo.png')
print(len(os.listdir(out)))
