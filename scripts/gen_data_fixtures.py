"""Generate rdrop-data's golden test fixtures (small, committed) with independent tools.

Run from the repository root, with a Python that has the packages imported below:
    python3 scripts/gen_data_fixtures.py

Writes rdrop-data/tests/fixtures/:
  cifar100/py2/{train,test,meta}      2009 layout, written opcode by opcode (write_py2_pickle.py)
  cifar100/py3-p{2,3,4,5}-np{1,2}/    the same data re-pickled by Python 3's pickle at protocols
                                      2..5, numpy 1 (`numpy.core`) and numpy 2 (`numpy._core`)
                                      global names; str or bytes keys, different key orders
  cifar100/cifar-100-python.tar.gz    the py2 files in the official archive layout
  cifar10/py2/...  cifar10/cifar-10-python.tar.gz   CIFAR-10 layout (data_batch_1..5 etc.)
  expected.json                       what decoding must give (labels, names, SHA-256, stats)
  resize.json + resize.bin            Pillow / torchvision outputs for resize parity
  normalize.json                      torchvision ToTensor+Normalize of all 256 byte values
"""
import hashlib
import io
import json
import os
import pickle
import sys
import tarfile
import types

import numpy as np
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as F
from PIL import Image

sys.path.insert(0, os.path.dirname(__file__))
import write_py2_pickle as py2  # noqa: E402

OUT = os.path.join(os.path.dirname(__file__), "..", "rdrop-data", "tests", "fixtures")

FINE = (
    "apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus "
    "butterfly camel can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch "
    "crab crocodile cup dinosaur dolphin elephant flatfish forest fox girl hamster house kangaroo "
    "keyboard lamp lawn_mower leopard lion lizard lobster man maple_tree motorcycle mountain mouse "
    "mushroom oak_tree orange orchid otter palm_tree pear pickup_truck pine_tree plain plate poppy "
    "porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk skyscraper "
    "snail snake spider squirrel streetcar sunflower sweet_pepper table tank telephone television "
    "tiger tractor train trout tulip turtle wardrobe whale willow_tree wolf woman worm"
).split()
COARSE = (
    "aquatic_mammals fish flowers food_containers fruit_and_vegetables "
    "household_electrical_devices household_furniture insects large_carnivores "
    "large_man-made_outdoor_things large_natural_outdoor_scenes large_omnivores_and_herbivores "
    "medium_mammals non-insect_invertebrates people reptiles small_mammals trees vehicles_1 vehicles_2"
).split()
C10 = "airplane automobile bird cat deer dog frog horse ship truck".split()
assert len(FINE) == 100 and len(COARSE) == 20

rng = np.random.default_rng(2106)


def images(n):
    """Smooth gradients plus noise, N×3072 uint8 (R plane, G plane, B plane)."""
    y, x = np.mgrid[0:32, 0:32]
    out = []
    for _ in range(n):
        a, b, c = rng.uniform(-4, 4, 3)
        planes = [np.clip(128 + a * x + b * y + c * ch * 10 + rng.normal(0, 20, (32, 32)), 0, 255) for ch in range(3)]
        out.append(np.stack(planes).astype(np.uint8).reshape(-1))
    return np.stack(out)


def c100_split(n, name, prefix):
    data = images(n)
    fine = [int(v) for v in rng.integers(0, 100, n)]
    fine[0] = 99  # cover the top of the range
    coarse = [int(v) for v in rng.integers(0, 20, n)]
    files = [f"{prefix}_{i:05d}.png" for i in range(n)]
    return {"filenames": files, "batch_label": name, "fine_labels": fine, "coarse_labels": coarse, "data": data}


def stats(splits, fine_key, n_fine, n_coarse):
    data = np.concatenate([s["data"] for s in splits])
    fine = sum((s[fine_key] for s in splits), [])
    coarse = sum((s.get("coarse_labels", []) for s in splits), [])
    files = sum((s["filenames"] for s in splits), [])
    px = data.reshape(len(fine), 3, 1024).astype(np.float64) / 255.0
    return {
        "n": len(fine),
        "fine_labels": fine,
        "coarse_labels": coarse,
        "filenames": files,
        "fine_hist": np.bincount(fine, minlength=n_fine).tolist(),
        "coarse_hist": np.bincount(coarse, minlength=n_coarse).tolist() if n_coarse else [],
        "channel_mean": px.mean(axis=(0, 2)).tolist(),
        "labels_sha256": hashlib.sha256(bytes(fine)).hexdigest(),
        "pixels_sha256": hashlib.sha256(data.tobytes()).hexdigest(),
        "first_filename": files[0],
    }


class Numpy1Pickler(pickle._Pickler):
    """Python's pickler writing numpy 1.x global names (`numpy.core.*`) as numpy 1 did."""

    def save_global(self, obj, name=None):
        module = getattr(obj, "__module__", "") or ""
        if module.startswith("numpy._core"):
            name = name or obj.__qualname__
            module = "numpy.core" + module[len("numpy._core"):]
            if self.proto >= 4:
                self.save(module)
                self.save(name)
                self.write(pickle.STACK_GLOBAL)
            else:
                self.write(pickle.GLOBAL + module.encode() + b"\n" + name.encode() + b"\n")
            self.memoize(obj)
        else:
            super().save_global(obj, name)

    # Python functions (numpy's `_frombuffer`) are dispatched by type, not through the method
    dispatch = dict(pickle._Pickler.dispatch)
    dispatch[types.FunctionType] = save_global


def py3_dump(obj, proto, numpy1):
    if numpy1:
        f = io.BytesIO()
        Numpy1Pickler(f, protocol=proto).dump(obj)
        b = f.getvalue()
        assert b"numpy._core" not in b
        return b
    return pickle.dumps(obj, protocol=proto)


def as_py3(obj, bytes_keys, reverse):
    """The dict as Python 3 loads the 2009 pickle: encoding='bytes' (bytes keys and strings)
    or encoding='latin1' (str), optionally with another key order."""
    conv = (lambda s: s.encode("latin-1")) if bytes_keys else (lambda s: s)
    items = list(obj.items())
    if reverse:
        items.reverse()
    out = {}
    for k, v in items:
        if isinstance(v, list) and v and isinstance(v[0], str):
            v = [conv(s) for s in v]
        elif isinstance(v, str):
            v = conv(v)
        out[conv(k)] = v
    return out


def write_py2_obj(path, d):
    d = {k: (py2.Array(v) if isinstance(v, np.ndarray) else v) for k, v in d.items()}
    py2.write(path, d)


def tar_gz(path, folder, files):
    with tarfile.open(path, "w:gz", format=tarfile.GNU_FORMAT) as t:
        info = tarfile.TarInfo(folder)
        info.type = tarfile.DIRTYPE
        info.mode = 0o755
        t.addfile(info)
        extra = b"not part of the dataset\n"
        info = tarfile.TarInfo(folder + "/file.txt~")
        info.size = len(extra)
        t.addfile(info, io.BytesIO(extra))
        for name, data in files:
            info = tarfile.TarInfo(f"{folder}/{name}")
            info.size = len(data)
            info.mode = 0o644
            t.addfile(info, io.BytesIO(data))


def main():
    os.makedirs(OUT, exist_ok=True)
    expected = {}

    # ---- CIFAR-100 layout
    train = c100_split(8, "training batch 1 of 1", "bos_taurus")
    test = c100_split(5, "testing batch 1 of 1", "apple")
    meta = {"fine_label_names": FINE, "coarse_label_names": COARSE}
    files = {"train": train, "test": test, "meta": meta}
    d = os.path.join(OUT, "cifar100", "py2")
    os.makedirs(d, exist_ok=True)
    blobs = {}
    for name, obj in files.items():
        write_py2_obj(os.path.join(d, name), obj)
        blobs[name] = open(os.path.join(d, name), "rb").read()
    tar_gz(os.path.join(OUT, "cifar100", "cifar-100-python.tar.gz"), "cifar-100-python",
           [(n, blobs[n]) for n in ("meta", "test", "train")])
    for proto in (2, 3, 4, 5):
        for np1 in (True, False):
            d = os.path.join(OUT, "cifar100", f"py3-p{proto}-np{1 if np1 else 2}")
            os.makedirs(d, exist_ok=True)
            for name, obj in files.items():
                o = as_py3(obj, bytes_keys=np1, reverse=proto % 2 == 1)
                with open(os.path.join(d, name), "wb") as f:
                    f.write(py3_dump(o, proto, np1))
    expected["cifar100"] = {
        "format": "cifar100",
        "train": stats([train], "fine_labels", 100, 20),
        "test": stats([test], "fine_labels", 100, 20),
        "fine_label_names": FINE,
        "coarse_label_names": COARSE,
    }

    # ---- CIFAR-10 layout
    batches = []
    for b in range(1, 6):
        n = 2
        data = images(n)
        labels = [int(v) for v in rng.integers(0, 10, n)]
        batches.append({"data": data, "labels": labels, "batch_label": f"training batch {b} of 5",
                        "filenames": [f"b{b}_{i}.png" for i in range(n)]})
    tb = {"data": images(3), "labels": [9, 0, 4], "batch_label": "testing batch 1 of 1",
          "filenames": ["t0.png", "t1.png", "t2.png"]}
    bmeta = {"num_cases_per_batch": 2, "label_names": C10, "num_vis": 3072}
    d = os.path.join(OUT, "cifar10", "py2")
    os.makedirs(d, exist_ok=True)
    c10files = [(f"data_batch_{i + 1}", b) for i, b in enumerate(batches)] + [("test_batch", tb), ("batches.meta", bmeta)]
    blobs = []
    for name, obj in c10files:
        write_py2_obj(os.path.join(d, name), obj)
        blobs.append((name, open(os.path.join(d, name), "rb").read()))
    tar_gz(os.path.join(OUT, "cifar10", "cifar-10-python.tar.gz"), "cifar-10-batches-py", blobs)
    expected["cifar10"] = {
        "format": "cifar10",
        "train": stats(batches, "labels", 10, 0),
        "test": stats([tb], "labels", 10, 0),
        "fine_label_names": C10,
        "coarse_label_names": [],
    }
    with open(os.path.join(OUT, "expected.json"), "w") as f:
        json.dump(expected, f, indent=1)

    # ---- resize parity: Pillow and torchvision on PIL images
    imgs = [np.clip(rng.normal(128, 60, (32, 32, 3)), 0, 255).astype(np.uint8) for _ in range(3)]
    y, x = np.mgrid[0:32, 0:32]
    imgs.append(np.stack([x * 8, y * 8, (x + y) * 4], axis=-1).astype(np.uint8))
    pil = [Image.fromarray(a) for a in imgs]
    blob = bytearray()
    cases = []

    def add(kind, img, out, **kw):
        arr = np.asarray(out, dtype=np.uint8).transpose(2, 0, 1)  # CHW
        cases.append({"kind": kind, "image": img, "offset": len(blob), "out_h": arr.shape[1],
                      "out_w": arr.shape[2], **kw})
        blob.extend(arr.tobytes())

    # Image.resize((w, h), BILINEAR, box=...) on the whole image
    for img, box, w, h in [(0, (0, 0, 32, 32), 224, 224), (1, (3, 5, 20, 29), 57, 57),
                           (2, (0.5, 1.25, 31.5, 30.75), 40, 17), (3, (0, 0, 32, 32), 8, 8),
                           (1, (2, 2, 30, 26), 5, 7), (2, (10, 0, 32, 32), 31, 31),
                           (0, (4, 4, 12, 12), 100, 100), (3, (0, 0, 32, 32), 16, 48),
                           (3, (7.3, 0.1, 25.9, 31.7), 13, 64), (1, (0, 0, 32, 32), 21, 9)]:
        add("box", img, pil[img].resize((w, h), Image.BILINEAR, box=box), box=list(box))
    # torchvision RandomResizedCrop's resize: F.resized_crop (crop, then Pillow bilinear)
    for img, i, j, h, w, s in [(1, 3, 5, 20, 11, 224), (2, 0, 0, 32, 32, 64), (3, 10, 12, 4, 9, 96),
                               (0, 1, 1, 30, 30, 24), (2, 20, 3, 7, 28, 33), (3, 0, 31, 1, 1, 17),
                               (1, 0, 10, 30, 8, 20), (0, 2, 0, 29, 12, 16), (2, 1, 5, 30, 20, 12)]:
        out = F.resized_crop(pil[img], i, j, h, w, [s, s], interpolation=T.InterpolationMode.BILINEAR)
        add("crop", img, out, top=i, left=j, height=h, width=w, size=s)
    # torchvision Resize((S, S)) (the test transform)
    for img, s in [(1, 224), (3, 20), (0, 96)]:
        add("test", img, T.Resize((s, s))(pil[img]), size=s)
    with open(os.path.join(OUT, "resize.bin"), "wb") as f:
        f.write(bytes(blob))
    with open(os.path.join(OUT, "resize.json"), "w") as f:
        json.dump({"images_hwc": [a.tobytes().hex() for a in imgs], "cases": cases}, f, indent=1)

    # ---- ToTensor + Normalize for every byte value
    ramp = Image.fromarray(np.stack([np.arange(256, dtype=np.uint8).reshape(16, 16)] * 3, axis=-1))
    norm = {}
    for name, mean, std in [("default", [0.5] * 3, [0.5] * 3),
                            ("imagenet", [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])]:
        t = T.Normalize(mean, std)(T.ToTensor()(ramp)).reshape(3, 256)
        norm[name] = {"mean": mean, "std": std, "values": t.numpy().astype(np.float32).view(np.uint32).tolist()}
    with open(os.path.join(OUT, "normalize.json"), "w") as f:
        json.dump(norm, f)
    print("fixtures written to", os.path.normpath(OUT), "torch", torch.__version__)


if __name__ == "__main__":
    main()
