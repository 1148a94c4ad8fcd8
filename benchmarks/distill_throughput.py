"""Distillation and teacher-training throughput: a standard PyTorch loop against kdbook's engine, in one run on one device.

Distils an ensemble of `--members` pre-activation ResNet-`--depth` teachers into ResNet-`--depth` students
(CIFAR-100 images, batch `--batch-size`, tau = 4, SGD Nesterov) and times, one row each:
  (a) standard loop: torchvision DataLoader (PIL images, RandomCrop(32, padding=4), RandomHorizontalFlip,
      ToTensor, Normalize in `--num-workers` worker processes), eager fp32, teachers one after another;
  (b) engine, eager: uint8 data on the device, augmentation on the device, the engine's step
      (kdbook.engine.Step: bf16 autocast + channels_last on CUDA), cuda_graphs off;
  (c) engine, graphed: the same step captured whole in a CUDA graph (CUDA only);
  (d) k students trained in one graphed step (`--packing`: "loop", one after another, the default of
      distill_many; or "grouped", one packed network), k = 1, 4, 8, 16 (CPU: 1, 4), each student with
      its own batches, and with same_batches (all k students see one batch: one teacher forward labels all);
      plus k = 4 with the other packing, for comparison;
  (t) teachers: `--members` ResNet-`--depth` networks trained from scratch (batch `--teacher-batch-size`),
      one at a time and k in one step (loop and grouped);
  (s) k students with same_batches in one graphed step, members one after another (loop) beside members as
      parallel CUDA streams (kdbook.engine.LoopStack(streams=True)), k = `--stream-ks` (4, 16 on CUDA; 4 on CPU);
  (g) the SN-GAN of kdbook.experiments.gan (chapter 22_gan): seconds per generator step (`n_dis` = 5 discriminator steps and
      one generator step, batch `--gan-batch-size`) through kdbook.experiments.gan.train_gan, fp32 eager and with its faster
      options (bf16 autocast, channels_last; CUDA only).
Prints, per row, images/s per model and for all k models together, the ratio of the total to (a), and the
seconds per 50,000-image epoch per model (and amortised: 50,000 / total images/s), and writes every row to
results/benchmarks/<device-slug>[-<tag>].json (rendered by chapters/a3_training.ipynb). A row that fails
records its error and the others still run.

    python benchmarks/distill_throughput.py                           # small CPU configuration (< 2 min)
    python benchmarks/distill_throughput.py --device cuda             # 5 x ResNet-56 -> ResNet-56 (< 4 min on an H100)
    python benchmarks/distill_throughput.py --device cuda --probe     # only the rates a GPU slice needs (< 2 min)

`--probe` runs only the rows a GPU slice needs to size its work: a teacher fit (ResNet-56 and ResNet-20),
same-batch students k = 1 and 4 (ResNet-20 and ResNet-56), the (s) rows and the (g) rows, with random images
(throughput does not depend on the pixels) and few timed steps, and writes its record to `--out` (a .json
path; default results/benchmarks/<device-slug>-probe.json).
"""
import argparse
import json
import math
import os
import platform
import re
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from kdbook.data import ImageSet, load_dataset
from kdbook.engine import FunctionalOptimizer, GraphedStep, LoopStack, Step, Stream, TrainConfig, next_batch
from kdbook.losses import ensemble_logits, kd_loss
try:
    from kdbook.store import device_name, git_revision
except ImportError as e:  # kdbook.store needs the book's full environment; a bare GPU machine may lack it
    print(f"kdbook.store not importable ({e}): the record gets a plain device name and no git revision")
    device_name = platform.processor
    git_revision = lambda repo: ("unknown", None)
from kdbook.train import Ensemble, _pack, _prepare_model, make_model, make_optimizer

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


def net(args, seed, device, depth=None):
    return make_model("preresnet", seed=seed, depth=depth or args.depth, num_classes=100).to(device)


def time_standard(args, device, train):
    "(a) DataLoader with CPU transforms, fp32, teachers one after another, torch.optim.SGD."
    teachers = [net(args, i, device).eval() for i in range(args.members)]
    student = net(args, 1000, device)
    cfg = TrainConfig(batch_size=args.batch_size, lr=0.05, device=str(device), progress=False)
    opt = make_optimizer(student.parameters(), cfg)
    tf = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
                             transforms.ToTensor(), transforms.Normalize((0.5,) * 3, (0.5,) * 3)])
    loader = DataLoader(CifarPIL(train.images, train.labels, tf), batch_size=args.batch_size, shuffle=True,
                        num_workers=args.num_workers, pin_memory=device.type == "cuda", drop_last=True,
                        persistent_workers=args.num_workers > 0, generator=torch.Generator().manual_seed(0))
    student.train()
    it = iter(loader)
    t0 = None
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            sync(device)
            t0 = time.perf_counter()
        x, _ = next(it)
        x = x.to(device, non_blocking=True)
        with torch.no_grad():
            teacher_logits = ensemble_logits(torch.stack([t(x) for t in teachers]))
        loss = kd_loss(student(x), teacher_logits, tau=4.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    sync(device)
    return {"seconds": time.perf_counter() - t0, "images": args.steps * args.batch_size, "per": 1}


def time_engine(args, device, train, k=1, packed=False, same_batches=False, graphs=True, teachers=True,
                batch_size=None, packing="loop", depth=None):
    "(b)-(d), (s), (t): the engine's step (kdbook.engine.Step) on device-resident data, eager or graphed."
    batch_size = batch_size or args.batch_size
    gpu = device.type == "cuda"
    cfg = TrainConfig(batch_size=batch_size, lr=0.05, lr_min=1e-6, policy="baseline", device=str(device),
                      amp=gpu, channels_last=gpu, cuda_graphs=graphs, progress=False)
    teacher = None
    if teachers:
        teacher = _prepare_model(Ensemble([net(args, i, device, depth).eval() for i in range(args.members)]), device, cfg)
    students = [_prepare_model(net(args, 1000 + i, device, depth), device, cfg) for i in range(k)]
    if packed and packing == "streams":  # members as parallel CUDA streams inside the step (the plain loop on a CPU)
        model = LoopStack(students, shared_input=same_batches, streams=True).to(device)
    else:
        model = _pack(students, shared_input=same_batches, packing=packing).to(device) if packed else students[0]
    opt = FunctionalOptimizer(model.parameters(), cfg)
    step = Step(model, opt, k, teacher, tau=4.0, alpha=0.0, packed=packed, shared_input=same_batches,
                amp=cfg.amp, device=device)
    runner = GraphedStep(step, graphs)
    streams = [Stream(i, device) for i in range(k if packed and not same_batches else 1)]
    images, labels = train.images.to(device), train.labels.to(device)
    for s in streams:
        s.new_epoch(len(labels), device)
    use_cl = cfg.channels_last and gpu
    stacked = packed and not same_batches
    warmup = max(args.warmup, 5 if graphs and gpu else 0)  # 3 side-stream steps and the capture
    t0 = None
    for i in range(warmup + args.steps):
        if i == warmup:
            sync(device)
            t0 = time.perf_counter()
        start = (i * batch_size) % max(len(labels) - batch_size + 1, 1)
        x, y = next_batch(streams, images, labels, start, cfg, None, use_cl, stacked)
        opt.lr.fill_(0.05)
        runner(x, y)
    sync(device)
    seconds = time.perf_counter() - t0
    loss = float(step.loss_sum.sum()) / max(k * (warmup + args.steps), 1)
    if loss != loss:
        raise FloatingPointError("the timed steps produced a non-finite loss")
    return {"seconds": seconds, "images": args.steps * batch_size, "per": k, "graphed": runner.graphed,
            "graph_error": runner.error}


def time_gan(args, device, train, amp=False, channels_last=False):
    """(g) seconds per SN-GAN generator step (n_dis discriminator steps + one generator step) of kdbook.experiments.gan.train_gan
    with the given options: a warm-up call, then one timed call of `--gan-steps` generator steps."""
    from kdbook.experiments.gan import GANConfig, build_discriminator, build_generator, train_gan  # imports kdbook.store
    gpu = device.type == "cuda"
    g_width, d_width = args.gan_channels
    images = train.images[: max(4 * args.gan_batch_size, 512)]

    def cfg(steps):
        return GANConfig(g_steps=steps, batch_size=args.gan_batch_size, g_channels=g_width, d_channels=d_width,
                         device=str(device), amp=amp, channels_last=channels_last, log_every=steps, checkpoint_every=0)

    G, D = build_generator(cfg(1), seed=0), build_discriminator(cfg(1), seed=1)
    train_gan(G, D, images, cfg(args.gan_warmup), seed=0)  # cuDNN autotuning, allocator, Adam state
    sync(device)
    t0 = time.perf_counter()
    history = train_gan(G, D, images, cfg(args.gan_steps), seed=1)
    sync(device)
    seconds = time.perf_counter() - t0
    if not all(math.isfinite(v) for v in history["d_loss"] + history["g_loss"]):
        raise FloatingPointError(f"the timed generator steps produced a non-finite loss: {history}")
    return {"seconds": seconds, "g_steps": args.gan_steps, "amp": amp and gpu, "channels_last": channels_last and gpu,
            "n_dis": cfg(1).n_dis, "batch_size": args.gan_batch_size, "g_channels": g_width, "d_channels": d_width}


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def stream_rows(args, gpu):
    "(s): k students with same_batches in one step, loop beside parallel streams."
    rows = []
    for k in args.stream_ks:
        for packing in ("loop", "streams"):
            rows.append(("s", f"{k} students in one step ({packing}), same batches",
                         dict(k=k, packed=True, same_batches=True, packing=packing)))
    return rows


def gan_rows(args, gpu):
    "(g): SN-GAN generator steps, fp32 eager, then with kdbook.experiments.gan's faster options (CUDA only)."
    rows = [("g", "SN-GAN generator step, fp32", dict(fn="gan"))]
    if gpu:
        rows += [("g", "SN-GAN generator step, bf16 autocast", dict(fn="gan", amp=True)),
                 ("g", "SN-GAN generator step, bf16 autocast + channels_last", dict(fn="gan", amp=True, channels_last=True))]
    return rows


def probe_rows(args, gpu):
    "The rows a GPU slice needs to size its work (--probe)."
    tb, rows = args.teacher_batch_size, []
    for depth in args.probe_depths:
        rows.append(("t", f"1 teacher ResNet-{depth}, graphed", dict(teachers=False, batch_size=tb, depth=depth)))
    for depth in args.probe_depths:
        for k in (1, 4):
            rows.append(("d", f"{k} student{'s' * (k > 1)} ResNet-{depth} in one step (loop), same batches",
                         dict(k=k, packed=True, same_batches=True, packing="loop", depth=depth)))
    return rows + stream_rows(args, gpu) + gan_rows(args, gpu)


def rows_to_run(args, gpu):
    if args.probe:
        return probe_rows(args, gpu)
    ks = [int(v) for v in args.ks.split(",")] if args.ks else ([1, 4, 8, 16] if gpu else [1, 4])
    rows = [("a", "standard loop: DataLoader + eager fp32", dict(fn="standard")),
            ("b", "engine, eager", dict(graphs=False))]
    if gpu:
        rows.append(("c", "engine, graphed", dict(graphs=True)))
    other = "grouped" if args.packing == "loop" else "loop"
    for same in (False, True):
        for k in ks:
            rows.append(("d", f"{k} student{'s' * (k > 1)} in one step ({args.packing}){', same batches' if same else ''}",
                         dict(k=k, packed=True, same_batches=same, packing=args.packing)))
        k4 = ks[min(1, len(ks) - 1)]
        rows.append(("d", f"{k4} students in one step ({other}){', same batches' if same else ''}",
                     dict(k=k4, packed=True, same_batches=same, packing=other)))
    t, tb = args.members, args.teacher_batch_size
    rows.append(("t", "1 teacher, graphed", dict(teachers=False, batch_size=tb)))
    for packing in ("loop", "grouped"):
        rows.append(("t", f"{t} teachers in one step ({packing})", dict(k=t, packed=True, teachers=False, batch_size=tb,
                                                                        packing=packing)))
    return rows + stream_rows(args, gpu) + gan_rows(args, gpu)


def measure_gan(args, device, train, kw, key, name, row):
    "Time one (g) row into `row`."
    r = time_gan(args, device, train, amp=kw.get("amp", False), channels_last=kw.get("channels_last", False))
    row.update(s_per_generator_step=r["seconds"] / r["g_steps"], seconds=r["seconds"], graphed=False,
               **{k: r[k] for k in ("g_steps", "amp", "channels_last", "n_dis", "batch_size", "g_channels", "d_channels")})
    print(f"({key}) {name:52s} {row['s_per_generator_step']:8.4f} s per generator step")


def measure_engine(args, device, train, kw, key, name, row, base_ips):
    "Time one (a)-(d), (s) or (t) row into `row`; returns the images/s of (a) once known."
    r = time_standard(args, device, train) if kw.get("fn") == "standard" else time_engine(args, device, train, **kw)
    ips_total = r["images"] * r["per"] / r["seconds"]
    ips = ips_total / r["per"]
    row.update(images_per_s_per_model=ips, images_per_s_total=ips_total, seconds=r["seconds"],
               s_per_50k_epoch_per_model=50_000 / ips, s_per_50k_epoch_amortized=50_000 / ips_total,
               graphed=r.get("graphed", False), graph_error=r.get("graph_error"))
    if key == "a":
        base_ips = ips
    if key not in ("t", "s") and base_ips:
        row["ratio_to_a"] = ips / base_ips
        row["ratio_total_to_a"] = ips_total / base_ips
    print(f"({key}) {name:52s} {ips:8.0f}/s per model {ips_total:8.0f}/s total  "
          f"{50_000 / ips:6.1f} s/epoch per model {50_000 / ips_total:6.1f} amortised"
          + (f"  total {row['ratio_total_to_a']:5.2f}x (a)" if "ratio_total_to_a" in row else "")
          + ("" if not r.get("graph_error") else f"  [graph capture failed: {r['graph_error']}]"))
    return base_ips


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda (cuda[:i])")
    p.add_argument("--members", type=int, default=None, help="teachers in the ensemble (default: 2 on CPU, 5 on CUDA)")
    p.add_argument("--depth", type=int, default=None,
                   help="ResNet depth (default: 56 on CUDA, 20 on CPU, 8 for --probe on CPU)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--teacher-batch-size", type=int, default=256)
    p.add_argument("--ks", default="", help="packed students, comma-separated (default: 1,4,8,16 on CUDA, 1,4 on CPU)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per row (default: 2 on CPU, 30 on CUDA)")
    p.add_argument("--note", default="", help="a sentence stored in the record (e.g. what was special about this run)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 1; graphed rows >= 5)")
    p.add_argument("--num-workers", type=int, default=2, help="DataLoader workers of the standard loop")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--packing", default="loop", choices=["loop", "grouped"], help="how (d) runs k students in one step")
    p.add_argument("--synthetic", action="store_true", help="random uint8 images instead of CIFAR-100 (same speed)")
    p.add_argument("--stream-ks", default="", help="k of the (s) rows, comma-separated (default: 4,16 on CUDA, 4 on CPU)")
    p.add_argument("--gan-batch-size", type=int, default=None,
                   help="SN-GAN batch (default: 128 on CUDA, 16 on CPU, 4 for --probe on CPU)")
    p.add_argument("--gan-channels", default="",
                   help="SN-GAN widths 'G,D' (default: 256,128 on CUDA, 32,32 on CPU, 8,8 for --probe on CPU)")
    p.add_argument("--gan-steps", type=int, default=None, help="timed SN-GAN generator steps (default: 10 on CUDA, 1 on CPU)")
    p.add_argument("--probe", action="store_true",
                   help="only the rows a GPU slice needs to size its work (teacher fit, same-batch students k = 1, 4 "
                        "at ResNet-20 and -56, the (s) and (g) rows), random images, few steps (< 2 min on an H100)")
    p.add_argument("--out", default=None, help="folder of the JSON record (default results/benchmarks); with --probe "
                                               "the record's path if it ends in .json (default results/benchmarks/"
                                               "<device-slug>-probe.json)")
    p.add_argument("--tag", default="", help="suffix of the record's file name (e.g. for concurrent runs)")
    p.add_argument("--no-write", action="store_true", help="print only")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    args.members = args.members if args.members is not None else (5 if gpu else 2)
    args.depth = args.depth if args.depth is not None else (56 if gpu else (8 if args.probe else 20))
    args.steps = args.steps if args.steps is not None else ((12 if args.probe else 30) if gpu else (1 if args.probe else 2))
    args.warmup = args.warmup if args.warmup is not None else 1
    try:
        args.stream_ks = [int(v) for v in args.stream_ks.split(",")] if args.stream_ks else ([4, 16] if gpu else [4])
        args.gan_channels = ([int(v) for v in args.gan_channels.split(",")] if args.gan_channels
                             else ([256, 128] if gpu else ([8, 8] if args.probe else [32, 32])))
    except ValueError:
        p.error(f"--stream-ks and --gan-channels take comma-separated integers, got {args.stream_ks!r}, {args.gan_channels!r}")
    if len(args.gan_channels) != 2 or min(args.gan_channels + args.stream_ks) < 1:
        p.error(f"--gan-channels needs two positive widths 'G,D' and --stream-ks positive k, got "
                f"{args.gan_channels}, {args.stream_ks}")
    args.gan_batch_size = args.gan_batch_size if args.gan_batch_size is not None else (128 if gpu else (4 if args.probe else 16))
    args.gan_steps = args.gan_steps if args.gan_steps is not None else (10 if gpu else 1)
    args.gan_warmup = 2 if gpu else 1
    for name in ("members", "depth", "steps", "batch_size", "teacher_batch_size", "gan_batch_size", "gan_steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    # --probe: ResNet-20 and ResNet-56 on CUDA; on a CPU only the one --depth (a check that every row runs)
    args.probe_depths = ([20, 56] if gpu else [args.depth]) if args.probe else []
    if args.probe and not gpu:  # a check that every row runs, not a measurement: tiny batches
        args.batch_size = min(args.batch_size, 8)
        args.teacher_batch_size = min(args.teacher_batch_size, 8)
    args.synthetic = args.synthetic or args.probe  # the probe times throughput, which does not depend on the pixels
    if args.threads:
        torch.set_num_threads(args.threads)
    n_needed = max((args.warmup + args.steps + 8) * max(args.batch_size, args.teacher_batch_size), 4096 if gpu else 1024)
    data_note = "CIFAR-100 train"
    try:
        if args.synthetic:
            raise RuntimeError("--synthetic")
        train = load_dataset("cifar100", "train")
    except Exception as e:  # throughput does not depend on the pixels
        print(f"using random uint8 images ({e})")
        g = torch.Generator().manual_seed(0)
        train = ImageSet(torch.randint(0, 256, (n_needed, 3, 32, 32), generator=g, dtype=torch.uint8),
                         torch.randint(0, 100, (n_needed,), generator=g), [str(i) for i in range(100)], "random", "")
        data_note = "random uint8 images"
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:n_needed]
    train = train.subset(order)

    t_start = time.perf_counter()
    print(f"device: {device}  config: {args.members} x ResNet-{args.depth} -> ResNet-{args.depth}, batch "
          f"{args.batch_size}, {args.steps} timed steps per row{' (probe)' if args.probe else ''}")
    rows, base_ips = [], None
    for key, name, kw in rows_to_run(args, gpu):
        row = {"row": key, "name": name, "k": kw.get("k", 1), "same_batches": kw.get("same_batches", False),
               "packing": kw.get("packing", "loop") if kw.get("packed") else None}
        if kw.get("fn") != "gan":
            row["depth"] = kw.get("depth", args.depth)
        try:
            if kw.get("fn") == "gan":
                measure_gan(args, device, train, kw, key, name, row)
            else:
                base_ips = measure_engine(args, device, train, kw, key, name, row, base_ips)
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {e}"
            print(f"({key}) {name:48s} FAILED: {row['error']}")
            traceback.print_exc(limit=3)
        finally:
            if gpu:
                torch.cuda.empty_cache()
        rows.append(row)
    rev, dirty = git_revision(REPO)
    record = {
        "format": 2,
        "device_name": device_name() if not gpu else f"cuda: {torch.cuda.get_device_name(device)}",
        "config": {"members": args.members, "depth": args.depth, "batch_size": args.batch_size,
                   "teacher_batch_size": args.teacher_batch_size, "steps": args.steps, "warmup": args.warmup,
                   "num_workers": args.num_workers, "threads": torch.get_num_threads(), "device": str(device),
                   "tau": 4.0, "amp_bf16": gpu, "channels_last": gpu, "data": data_note,
                   "stream_ks": args.stream_ks, "gan_batch_size": args.gan_batch_size, "gan_channels": args.gan_channels,
                   "gan_steps": args.gan_steps, "probe_depths": args.probe_depths},
        "rows": rows, "note": args.note, "packing": args.packing, "probe": args.probe,
        "torch": torch.__version__, "torchvision": torchvision.__version__, "numpy": np.__version__,
        "python": platform.python_version(), "git_rev": rev, "dirty": dirty,
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "total_seconds": time.perf_counter() - t_start,
        "created": datetime.now(timezone.utc).isoformat(), "command": " ".join(["distill_throughput.py", *(argv or sys.argv[1:])]),
    }
    print(f"total {record['total_seconds']:.0f} s")
    if not args.no_write:
        name = f"{slug(record['device_name'])}{'-' + slug(args.tag) if args.tag else ''}{'-probe' if args.probe else ''}.json"
        out = Path(args.out) if args.out else REPO / "results" / "benchmarks"
        path = out if args.probe and out.suffix == ".json" else out / name
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, path)  # a killed run leaves no half-written record
        print(f"wrote {path}")
    return record


if __name__ == "__main__":
    main()
