#!/usr/bin/env python3
"""torchvision reference for `rdrop data bench`: the R-Drop ViT recipe's training input pipeline
(PIL image -> RandomResizedCrop(S, scale=(0.05, 1)) -> ToTensor -> Normalize(0.5, 0.5)) over
random 32x32 RGB images (CIFAR-sized, already decoded), through a DataLoader with W worker
processes. Prints one JSON line with images/s.

usage: torchvision_loader.py [--image-size 224] [--workers W (default: all CPUs)]
                             [--batch-size 64] [--images 3072] [--json-out FILE]
"""
import argparse
import json
import os
import time

import numpy as np
import torch
import torchvision
import torchvision.transforms as T
from PIL import Image

p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
p.add_argument("--image-size", type=int, default=224)
p.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
p.add_argument("--batch-size", type=int, default=64)
p.add_argument("--images", type=int, default=3072, help="images timed (after 2 warm-up batches)")
p.add_argument("--json-out")
a = p.parse_args()

S, W = a.image_size, a.workers
torch.set_num_threads(1)
rng = np.random.default_rng(0)
pix = rng.integers(0, 256, size=(50000, 32, 32, 3), dtype=np.uint8)
tf = T.Compose([T.RandomResizedCrop((S, S), scale=(0.05, 1.0)), T.ToTensor(),
                T.Normalize([0.5] * 3, [0.5] * 3)])


class DS(torch.utils.data.Dataset):
    def __len__(self):
        return len(pix)

    def __getitem__(self, i):
        return tf(Image.fromarray(pix[i])), int(i % 100)


dl = torch.utils.data.DataLoader(DS(), batch_size=a.batch_size, shuffle=True, num_workers=W,
                                 persistent_workers=W > 0)
it = iter(dl)
next(it)
next(it)
t = time.perf_counter()
n = 0
while n < a.images:
    x, y = next(it)
    n += x.shape[0]
dt = time.perf_counter() - t
line = json.dumps({"impl": "torchvision", "torchvision": torchvision.__version__, "image_size": S,
                   "workers": W, "batch_size": a.batch_size, "images": n, "images_per_s": n / dt})
print(line, flush=True)
if a.json_out:
    with open(a.json_out, "w") as f:
        f.write(line + "\n")
