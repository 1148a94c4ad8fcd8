"""Distillation throughput: a standard DataLoader fp32 loop vs kdbook's engine, in one run on one device.

Distils an ensemble of `--members` pre-activation ResNet-`--depth` teachers into a ResNet-`--depth` student
(CIFAR-100, batch `--batch-size`, tau = 4, SGD Nesterov) and times:
  (a) baseline: an eager fp32 loop fed by a torchvision DataLoader (PIL images, RandomCrop(32, padding=4),
      RandomHorizontalFlip, ToTensor, Normalize on the CPU in `--num-workers` worker processes), teachers
      called one after another;
  (b) engine: kdbook.train.train_epoch with the data resident on the device as uint8, augmentation on the
      device, the teachers vmapped as one Ensemble, bf16 autocast + channels_last on CUDA.
Prints images/s for each, the ratio and the projected seconds per 50,000-image epoch, and writes the
measurement to results/benchmarks/<device-slug>[-<tag>].json (rendered by chapters/a3_training.ipynb).

    python benchmarks/distill_throughput.py                        # small CPU configuration (< 2 min)
    python benchmarks/distill_throughput.py --device cuda          # 5 x ResNet-56 -> ResNet-56, batch 128
"""
import argparse
import json
import os
import platform
import re
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from kdbook.data import load_dataset
from kdbook.losses import ensemble_logits, kd_loss
from kdbook.store import device_name, git_revision
from kdbook.train import Ensemble, TrainConfig, _prepare_model, _seeded_generators, make_model, make_optimizer, train_epoch

REPO = Path(__file__).resolve().parents[1]


class CifarPIL(Dataset):
    "CIFAR images served as torchvision.datasets.CIFAR100 serves them: HWC uint8 -> PIL -> transforms."

    def __init__(self, images_nchw: torch.Tensor, labels: torch.Tensor, transform):
        self.data = images_nchw.permute(0, 2, 3, 1).contiguous().numpy()
        self.targets = labels.numpy()
        self.transform = transform

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return self.transform(Image.fromarray(self.data[i])), int(self.targets[i])


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(args, device):
    teachers = [make_model("preresnet", seed=i, depth=args.depth, num_classes=100).to(device).eval()
                for i in range(args.members)]
    student = make_model("preresnet", seed=1000, depth=args.depth, num_classes=100).to(device)
    return teachers, student


def time_baseline(args, device, train):
    "(a) the standard loop: DataLoader with CPU transforms, fp32, teachers one after another."
    teachers, student = build(args, device)
    cfg = TrainConfig(epochs=1, batch_size=args.batch_size, lr=0.05, device=str(device), progress=False)
    opt = make_optimizer(student.parameters(), cfg)
    tf = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
                             transforms.ToTensor(), transforms.Normalize((0.5,) * 3, (0.5,) * 3)])
    loader = DataLoader(CifarPIL(train.images, train.labels, tf), batch_size=args.batch_size, shuffle=True,
                        num_workers=args.num_workers, pin_memory=device.type == "cuda", drop_last=True,
                        persistent_workers=args.num_workers > 0, generator=torch.Generator().manual_seed(0))
    student.train()
    n_total = args.warmup + args.steps
    it = iter(loader)
    t0 = None
    for step in range(n_total):
        if step == args.warmup:
            sync(device)
            t0 = time.perf_counter()
        x, y = next(it)
        x = x.to(device, non_blocking=True)
        with torch.no_grad():
            teacher_logits = ensemble_logits(torch.stack([t(x) for t in teachers]))
        loss = kd_loss(student(x), teacher_logits, tau=4.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    sync(device)
    return time.perf_counter() - t0


def time_engine(args, device, train):
    "(b) kdbook: uint8 data on the device, device-side augmentation, vmapped ensemble, bf16 + NHWC on CUDA."
    teachers, student = build(args, device)
    cfg = TrainConfig(epochs=1, batch_size=args.batch_size, lr=0.05, lr_min=1e-6, policy="baseline",
                      device=str(device), progress=False)
    student = _prepare_model(student, device, cfg)
    teacher = _prepare_model(Ensemble(teachers), device, cfg)
    opt = make_optimizer(student.parameters(), cfg)
    shuffle_gen, aug_gen = _seeded_generators(0, device)
    images, labels = train.images.to(device), train.labels.to(device)
    from kdbook.train import kd_step_loss
    loss_fn = kd_step_loss(teacher, tau=4.0)
    warm = args.warmup * args.batch_size
    total = (args.warmup + args.steps) * args.batch_size
    train_epoch(student, opt, images[:warm], labels[:warm], loss_fn, cfg, shuffle_gen, aug_gen, 0, 10**6)
    sync(device)
    t0 = time.perf_counter()
    train_epoch(student, opt, images[warm:total], labels[warm:total], loss_fn, cfg, shuffle_gen, aug_gen, 0, 10**6)
    sync(device)
    return time.perf_counter() - t0


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda (cuda[:i])")
    p.add_argument("--members", type=int, default=None, help="teachers in the ensemble (default: 2 on CPU, 5 on CUDA)")
    p.add_argument("--depth", type=int, default=None, help="ResNet depth (default: 20 on CPU, 56 on CUDA)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=None, help="timed steps (default: 3 on CPU, 100 on CUDA)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 1 on CPU, 10 on CUDA)")
    p.add_argument("--num-workers", type=int, default=2, help="DataLoader workers of the baseline")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--out", default=str(REPO / "results" / "benchmarks"), help="folder of the JSON record")
    p.add_argument("--tag", default="", help="suffix of the record's file name (e.g. for concurrent runs)")
    p.add_argument("--no-write", action="store_true", help="print only")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    args.members = args.members or (5 if gpu else 2)
    args.depth = args.depth or (56 if gpu else 20)
    args.steps = args.steps or (100 if gpu else 3)
    args.warmup = args.warmup if args.warmup is not None else (10 if gpu else 1)
    if args.threads:
        torch.set_num_threads(args.threads)
    n_needed = (args.warmup + args.steps) * args.batch_size
    train = load_dataset("cifar100", "train")
    if len(train) < n_needed:
        sys.exit(f"need {n_needed} images, the training set has {len(train)}: lower --steps")
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:n_needed]
    train = train.subset(order)

    base_s = time_baseline(args, device, train)
    eng_s = time_engine(args, device, train)
    n = args.steps * args.batch_size
    base_ips, eng_ips = n / base_s, n / eng_s
    rev, dirty = git_revision(REPO)
    record = {
        "device_name": device_name() if not gpu else f"cuda: {torch.cuda.get_device_name(device)}",
        "config": {"members": args.members, "depth": args.depth, "batch_size": args.batch_size, "steps": args.steps,
                   "warmup": args.warmup, "num_workers": args.num_workers, "threads": torch.get_num_threads(),
                   "device": str(device)},
        "baseline": {"images_per_s": base_ips, "seconds": base_s, "s_per_50k_epoch": 50_000 / base_ips},
        "engine": {"images_per_s": eng_ips, "seconds": eng_s, "s_per_50k_epoch": 50_000 / eng_ips,
                   "amp_bf16": gpu, "channels_last": gpu, "vmapped_teachers": args.members > 1},
        "ratio": eng_ips / base_ips,
        "torch": torch.__version__, "torchvision": torchvision.__version__, "numpy": np.__version__,
        "python": platform.python_version(), "git_rev": rev, "dirty": dirty,
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "created": datetime.now(timezone.utc).isoformat(), "command": " ".join(["distill_throughput.py", *(argv or sys.argv[1:])]),
    }
    print(f"device: {record['device_name']}")
    print(f"config: {args.members} x ResNet-{args.depth} -> ResNet-{args.depth}, batch {args.batch_size}, "
          f"{args.steps} timed steps")
    print(f"(a) DataLoader + eager fp32 : {base_ips:9.1f} images/s  ({50_000 / base_ips:8.1f} s per 50k epoch)")
    print(f"(b) kdbook engine           : {eng_ips:9.1f} images/s  ({50_000 / eng_ips:8.1f} s per 50k epoch)")
    print(f"ratio (b)/(a)               : {record['ratio']:9.2f}x")
    if not args.no_write:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"{slug(record['device_name'])}{'-' + slug(args.tag) if args.tag else ''}.json"
        path.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
        print(f"wrote {path}")
    return record


if __name__ == "__main__":
    main()
