"""Host memory of loading a pretrained Wan for training (training/backbone.py `_wan_base`); prints JSON.

    python tests/bench/wan_load.py [--layers 6] [--size 1.3B]

Writes a random-init Wan of the given width and depth as a diffusers folder in bf16 (how the 14B
is published), then loads it in fresh processes and reports each one's peak *anonymous* resident
memory above what the imports took (sampled every millisecond from /proc/self/status RssAnon; the
safetensors file's mmapped pages are page cache, shared by every worker of a node and
reclaimable, so they are left out):
* `before`: what training did until stop 26 — `from_pretrained` in fp32 on the host, then
  `.float()`; DeepSpeed later cast it to bf16 on the GPU;
* `after_bf16`: what a GPU worker does now — each tensor read in bf16 and placed as it is read.
  On the CPU, standing in for the GPU here, the bf16 tensors stay views of the mmapped file; on a
  GPU they are copied to the device one at a time: either way the host holds no copy of the model;
* `after_fp32`: what a CPU worker (tests, the demo) does now: it needs fp32 weights, 4 B/param.
Scaled to the whole model: `per_param_bytes` × the parameters of Wan 1.3B / 14B.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

CHILD = r"""
import json, sys, threading, time
sys.path.insert(0, {root!r})
import torch
from diffusers import WanTransformer3DModel
from training.backbone import _wan_base

def anon():  # private (anonymous) resident bytes: not the safetensors file's mmapped page cache
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024

base, peak, done = anon(), [0], threading.Event()
def watch():
    while not done.is_set():
        peak[0] = max(peak[0], anon())
        time.sleep(0.001)
threading.Thread(target=watch, daemon=True).start()
mode, folder = {mode!r}, {folder!r}
if mode == "before":
    model = WanTransformer3DModel.from_pretrained(folder).float()
else:
    model = _wan_base(folder, 16, 4096, seeded=False, dtype=torch.bfloat16 if mode == "after_bf16" else torch.float32)
done.set()
params = sum(p.numel() for p in model.parameters())
peak = max(peak[0], anon()) - base
print(json.dumps({{"params": params, "peak_anon_above_imports_mib": round(peak / 2**20, 1),
                   "per_param_bytes": round(peak / params, 2)}}))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--size", default="1.3B", choices=["1.3B", "14B"])
    args = ap.parse_args()
    import torch
    from diffusers import WanTransformer3DModel

    from tests.bench.gpu_check import WAN_COMMON, WAN_SIZES

    cfg = dict(WAN_COMMON, **WAN_SIZES[args.size])
    full = {}
    with torch.device("meta"):
        for size in WAN_SIZES:
            full[size] = sum(p.numel() for p in WanTransformer3DModel(**dict(WAN_COMMON, **WAN_SIZES[size])).parameters())
    cfg["num_layers"] = args.layers
    result: dict = {"model": f"Wan {args.size} width, {args.layers} layers, stored bf16"}
    with tempfile.TemporaryDirectory(prefix="ditharos-wan-load-") as tmp:
        torch.manual_seed(0)
        WanTransformer3DModel(**cfg).to(torch.bfloat16).save_pretrained(tmp)
        for mode in ("before", "after_bf16", "after_fp32"):
            out = subprocess.run([sys.executable, "-c", CHILD.format(root=str(ROOT), mode=mode, folder=tmp)],
                                 capture_output=True, text=True, check=True)
            row = json.loads(out.stdout.strip().splitlines()[-1])
            row["whole_model_host_gb"] = {s: round(row["per_param_bytes"] * n / 1e9, 1) for s, n in full.items()}
            result[mode] = row
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
