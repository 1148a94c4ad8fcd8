from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import math
import numbers
import os
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from .augment import POLICIES, augment
from .data import to_float

OPTIMIZERS = ("sgd", "adam")
_FLAGS = ("nesterov", "amp", "channels_last", "cuda_graphs", "progress")


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(float(v))


@dataclass
class TrainConfig:
    "Settings of one training run (appendix A.3); validated on creation."
    epochs: int = 1  # passes over the training (or distillation) data
    batch_size: int = 128  # examples per step (students 128, teachers 256 in the paper)
    optimizer: str = "sgd"  # "sgd" (Nesterov momentum) or "adam"
    lr: float = 0.05  # initial learning rate of the cosine schedule
    lr_min: float = 0.0  # final learning rate of the cosine schedule (students: 1e-6)
    momentum: float = 0.9  # SGD momentum
    nesterov: bool = True  # Nesterov momentum, as in the authors' code
    weight_decay: float = 1e-4  # L2 penalty added by the optimizer
    policy: str = "baseline"  # augmentation policy from kdbook.augment.POLICIES
    eval_every: int = 1  # evaluate every this many epochs (and always after the last)
    device: str = "auto"  # "auto" (CUDA if available), "cpu", "cuda", "cuda:1", ...
    amp: bool = True  # bf16 autocast for training; only ever used on CUDA (evaluation is always fp32)
    channels_last: bool = True  # NHWC memory format; only ever used on CUDA
    checkpoint_every: int = 0  # save a resumable checkpoint every this many epochs (0: never)
    eval_batch_size: int = 1000  # examples per forward pass during evaluation
    progress: bool = True  # tqdm progress bar over epochs
    cuda_graphs: bool = True  # capture whole training steps in CUDA graphs; only ever used on CUDA

    def __post_init__(self):
        for name in ("epochs", "batch_size", "eval_every", "eval_batch_size"):
            value = getattr(self, name)
            if not _is_int(value) or value <= 0:
                raise ValueError(f"TrainConfig.{name} must be a positive integer, got {value!r}")
        if not _is_int(self.checkpoint_every) or self.checkpoint_every < 0:
            raise ValueError(f"TrainConfig.checkpoint_every must be an integer >= 0 (0: never), got {self.checkpoint_every!r}")
        for name in ("lr", "lr_min", "momentum", "weight_decay"):
            if not _is_real(getattr(self, name)):
                raise ValueError(f"TrainConfig.{name} must be a finite number, got {getattr(self, name)!r}")
        for name in _FLAGS:
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"TrainConfig.{name} must be True or False, got {getattr(self, name)!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}: use one of {OPTIMIZERS}")
        if self.policy not in POLICIES:
            raise ValueError(f"unknown augmentation policy {self.policy!r}: use one of {tuple(POLICIES)}")
        if not isinstance(self.device, str):
            raise ValueError(f"TrainConfig.device must be a string such as 'auto', 'cpu' or 'cuda', got {self.device!r}")
        if not (self.lr > 0 and 0 <= self.lr_min <= self.lr):
            raise ValueError(f"need lr > 0 and 0 <= lr_min <= lr, got lr={self.lr}, lr_min={self.lr_min}")
        if self.weight_decay < 0 or not 0 <= self.momentum < 1:
            raise ValueError("need weight_decay >= 0 and 0 <= momentum < 1")

    def to_dict(self) -> dict:
        "The configuration as a JSON-serialisable dict (for the results store)."
        return asdict(self)

def cosine_lr(step: int,  # optimisation steps taken so far
              total_steps: int,  # steps of the whole run
              lr: float,  # learning rate at step 0
              lr_min: float = 0.0,  # learning rate at step total_steps
              ) -> float:
    "Cosine annealing (appendix A.3): lr_min + (lr - lr_min)(1 + cos(pi t / T)) / 2."
    t = min(max(step, 0), total_steps) / max(total_steps, 1)
    return lr_min + 0.5 * (lr - lr_min) * (1.0 + math.cos(math.pi * t))


def resolve_device(device: str = "auto") -> torch.device:
    "The torch device named by `device`; 'auto' picks CUDA when it is available."
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def batch_starts(n: int, batch_size: int) -> list[int]:
    "Start offsets of the batches of one epoch over n examples (a trailing batch of one is dropped)."
    starts = list(range(0, n, batch_size))
    if n > 1 and n - starts[-1] == 1:
        starts.pop()
    return starts


def autocast(device: torch.device, amp: bool):
    "bf16 autocast on CUDA when `amp` (weight cache off, as CUDA graphs require); nothing on CPU."
    if amp and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16, cache_enabled=False)
    return contextlib.nullcontext()

class FunctionalOptimizer:
    "SGD (Nesterov momentum) or Adam as foreach ops whose learning rate is a 0-d tensor (CUDA-graph safe)."

    def __init__(self, params,  # the parameters to update (those that require grad)
                 cfg: TrainConfig,  # optimizer, lr, momentum, nesterov, weight_decay
                 betas=(0.9, 0.999), eps: float = 1e-8):  # Adam's constants (torch's defaults)
        self.params = [p for p in params if p.requires_grad]
        if not self.params:
            raise ValueError("no parameters to optimise")
        self.kind, self.wd, self.momentum = cfg.optimizer, float(cfg.weight_decay), float(cfg.momentum)
        self.nesterov = cfg.nesterov and self.momentum > 0
        self.betas, self.eps = betas, eps
        self.lr = torch.tensor(float(cfg.lr), device=self.params[0].device)  # updated with fill_ every step
        zeros = lambda: [torch.zeros_like(p, memory_format=torch.preserve_format) for p in self.params]
        # a zero momentum buffer gives torch.optim.SGD's first step (buffer = gradient) exactly
        self.state = {"momentum_buffer": zeros()} if self.kind == "sgd" and self.momentum > 0 else {}
        if self.kind == "adam":
            self.state = {"exp_avg": zeros(), "exp_avg_sq": zeros(),
                          "step": torch.zeros((), device=self.params[0].device)}

    def zero_grad(self):
        "Set existing gradients to zero in place (their addresses stay fixed, as graph replay needs)."
        grads = [p.grad for p in self.params if p.grad is not None]
        if grads:
            torch._foreach_zero_(grads)

    @torch.no_grad()
    def step(self):
        "One update with the current value of `self.lr`."
        idx = [i for i, p in enumerate(self.params) if p.grad is not None]
        params = [self.params[i] for i in idx]
        grads = [self.params[i].grad for i in idx]
        d_p = torch._foreach_add(grads, params, alpha=self.wd) if self.wd != 0 else grads
        if self.kind == "sgd":
            if self.momentum > 0:
                bufs = [self.state["momentum_buffer"][i] for i in idx]
                torch._foreach_mul_(bufs, self.momentum)
                torch._foreach_add_(bufs, d_p)
                d_p = torch._foreach_add(d_p, bufs, alpha=self.momentum) if self.nesterov else bufs
            torch._foreach_sub_(params, torch._foreach_mul(d_p, self.lr))
            return
        beta1, beta2 = self.betas
        m = [self.state["exp_avg"][i] for i in idx]
        v = [self.state["exp_avg_sq"][i] for i in idx]
        step = self.state["step"]
        step.add_(1)
        torch._foreach_lerp_(m, d_p, 1 - beta1)
        torch._foreach_mul_(v, beta2)
        torch._foreach_addcmul_(v, d_p, d_p, value=1 - beta2)
        bc1 = 1 - torch.pow(beta1, step)
        bc2_sqrt = torch.sqrt(1 - torch.pow(beta2, step))
        denom = torch._foreach_sqrt(v)
        torch._foreach_mul_(denom, 1 / bc2_sqrt)
        torch._foreach_add_(denom, self.eps)
        update = torch._foreach_div(m, denom)
        torch._foreach_mul_(update, self.lr / bc1)
        torch._foreach_sub_(params, update)

    def state_dict(self) -> dict:
        return {"kind": self.kind, "lr": self.lr.detach().cpu().clone(),
                "state": {k: ([t.detach().cpu().clone() for t in v] if isinstance(v, list) else v.detach().cpu().clone())
                          for k, v in self.state.items()}}

    @torch.no_grad()
    def load_state_dict(self, sd: dict):
        "Copy a saved state in place (tensors keep their addresses)."
        if sd.get("kind") != self.kind or set(sd["state"]) != set(self.state):
            raise ValueError(f"optimizer state of kind {sd.get('kind')!r} cannot be loaded into a {self.kind!r} optimizer")
        self.lr.copy_(sd["lr"])
        for k, v in self.state.items():
            if isinstance(v, list):
                if len(v) != len(sd["state"][k]):
                    raise ValueError("optimizer state has a different number of parameters")
                for dst, src in zip(v, sd["state"][k]):
                    dst.copy_(src)
            else:
                v.copy_(sd["state"][k])

def ce_terms(z: torch.Tensor,  # (k, B, C) logits of k models
             y: torch.Tensor | None,  # (k, B) labels
             ) -> torch.Tensor:
    "Per-model mean cross-entropy, shape (k,)."
    if y is None:
        raise ValueError("the augmentation policy added unlabelled images to the batch ('ood', 'synthetic'): "
                         "fit needs a label for every image; use these policies with distill")
    k, b, c = z.shape
    return F.cross_entropy(z.reshape(k * b, c), y.reshape(k * b), reduction="none").view(k, b).mean(1)


def kd_terms(z: torch.Tensor,  # (k, B, C) student logits
             zt: torch.Tensor,  # (k, B, C) teacher logits
             tau: float) -> torch.Tensor:
    "Per-model tau^2 * CE(softmax(zt/tau), softmax(z/tau)), batch mean, shape (k,) (the KD term of Eq. 1)."
    return tau ** 2 * -(F.softmax(zt / tau, dim=-1) * F.log_softmax(z / tau, dim=-1)).sum(-1).mean(-1)

class Step:
    """One training step of k models packed as one: forward, loss, backward and update, with the
    loss, the tau^2 CE term and the top-1 agreement with the teacher summed into device tensors."""

    def __init__(self, model: nn.Module,  # maps x to (B, C) logits, or (k, B, C) when k > 1 or `packed`
                 opt: FunctionalOptimizer,
                 k: int,  # models trained at once
                 teacher=None,  # callable x -> (B', C) logits (no grad); None for supervised training
                 tau: float = 4.0, alpha: float = 0.0,
                 packed: bool = False,  # the model takes and returns a leading k axis
                 shared_input: bool = False,  # x is one (B, ...) batch for all k models
                 amp: bool = False, device=torch.device("cpu")):
        self.model, self.opt, self.k, self.teacher = model, opt, k, teacher
        self.tau, self.alpha, self.packed, self.shared, self.amp, self.device = tau, alpha, packed, shared_input, amp, device
        zeros = lambda: torch.zeros(k, device=device)
        self.loss_sum, self.kd_sum, self.agree_sum, self.seen = zeros(), zeros(), zeros(), zeros()

    def reset(self):
        for t in (self.loss_sum, self.kd_sum, self.agree_sum, self.seen):
            t.zero_()

    def _teacher_logits(self, x):
        with torch.no_grad():
            if not self.packed:
                return self.teacher(x).float()[None]
            if self.shared:  # one teacher forward labels all k students
                return self.teacher(x).float().expand(self.k, -1, -1)
            zt = self.teacher(x.flatten(0, 1)).float()
            return zt.view(self.k, x.shape[1], -1)

    def __call__(self, x: torch.Tensor, y: torch.Tensor | None):
        self.opt.zero_grad()
        with autocast(self.device, self.amp):
            z = self.model(x).float()
            if not self.packed:
                z = z[None]
            if y is not None and y.dim() == 1:
                y = y.expand(self.k, -1)
            if self.teacher is None:
                losses = ce_terms(z, y)
                kd = torch.zeros_like(losses)
                agree = torch.zeros_like(losses)
            else:
                zt = self._teacher_logits(x)
                kd = kd_terms(z, zt, self.tau)
                losses = (1 - self.alpha) * kd
                if self.alpha > 0:
                    losses = losses + self.alpha * ce_terms(z, y)
                agree = (z.argmax(-1) == zt.argmax(-1)).float().sum(-1)
        losses.sum().backward()
        self.opt.step()
        with torch.no_grad():
            self.loss_sum.add_(losses.detach())
            self.kd_sum.add_(kd.detach() * z.shape[1])
            self.agree_sum.add_(agree)
            self.seen.add_(z.shape[1])

class GraphedStep:
    """Runs a `Step` eagerly (CPU, or cuda_graphs off) or, on CUDA, warms it up on a side stream,
    captures it whole in a CUDA graph and replays it with the batch copied into static buffers.
    A batch of another shape (the last, partial one) runs eagerly. If capture fails, it warns
    naming the exception and stays eager: `graphed` tells which happened."""

    def __init__(self, step: Step, use_graphs: bool, warmup: int = 3):
        self.step, self.warmup = step, warmup
        self.use_graphs = bool(use_graphs) and step.device.type == "cuda"
        self.graph, self.static_x, self.static_y, self.n_warm, self.error = None, None, None, 0, None

    @property
    def graphed(self) -> bool:
        return self.graph is not None

    def _fits(self, x, y):
        return (self.static_x is not None and x.shape == self.static_x.shape and x.stride() == self.static_x.stride()
                and (y is None) == (self.static_y is None) and (y is None or y.shape == self.static_y.shape))

    def _capture(self, x, y):
        self.static_x = torch.empty_like(x).copy_(x)
        self.static_y = None if y is None else y.clone()
        torch.cuda.synchronize(self.step.device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.step(self.static_x, self.static_y)
        torch.cuda.synchronize(self.step.device)
        self.graph = graph

    def __call__(self, x, y):
        if not self.use_graphs or self.error is not None:
            return self.step(x, y)
        if self.graph is not None:
            if not self._fits(x, y):
                return self.step(x, y)
            self.static_x.copy_(x)
            if y is not None:
                self.static_y.copy_(y)
            self.graph.replay()
            return
        if self.static_x is not None and not self._fits(x, y):
            return self.step(x, y)
        if self.n_warm < self.warmup:  # real steps, on a side stream as the capture recipe asks
            if self.static_x is None:
                self.static_x = torch.empty_like(x)
                self.static_y = None if y is None else torch.empty_like(y)
            side = torch.cuda.Stream(self.step.device)
            side.wait_stream(torch.cuda.current_stream(self.step.device))
            with torch.cuda.stream(side):
                self.step(x, y)
            torch.cuda.current_stream(self.step.device).wait_stream(side)
            self.n_warm += 1
            return
        try:
            self._capture(x, y)
        except Exception as e:  # fall back loudly: the run goes on eagerly with the same math
            self.graph, self.error = None, f"{type(e).__name__}: {e}"
            warnings.warn(f"CUDA graph capture failed ({self.error}); this run continues eagerly "
                          "(history['graphed'] = False). Set TrainConfig(cuda_graphs=False) to skip the attempt.",
                          RuntimeWarning, stacklevel=2)
            torch.cuda.synchronize(self.step.device)
            return self.step(x, y)
        self.static_x.copy_(x)
        if y is not None:
            self.static_y.copy_(y)
        self.graph.replay()

class Stream:
    "The shuffled, augmented batches of one model: its own order generator (CPU) and augmentation generator."

    def __init__(self, seed: int, device: torch.device):
        self.shuffle_gen = torch.Generator().manual_seed(seed)
        self.aug_gen = torch.Generator(device=device).manual_seed(seed + 1_000_003)
        self.order = None

    def new_epoch(self, n: int, device):
        self.order = torch.randperm(n, generator=self.shuffle_gen).to(device)

    def batch(self, images, labels, start, batch_size, policy, augment_kw, channels_last):
        idx = self.order[start:start + batch_size]
        x = augment(to_float(images[idx]), policy, self.aug_gen, **(augment_kw or {}))
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        # 'ood' and 'synthetic' append unlabelled rows: the batch then has no labels
        y = labels[idx] if x.shape[0] == idx.numel() else None
        return x, y


def next_batch(streams, images, labels, start, cfg, augment_kw, channels_last, stacked):
    "One batch: (B, ...) from a single stream, or (k, B, ...) stacked from k streams."
    pairs = [s.batch(images, labels, start, cfg.batch_size, cfg.policy, augment_kw, channels_last) for s in streams]
    if not stacked:
        return pairs[0]
    x = torch.stack([p[0] for p in pairs])
    y = None if any(p[1] is None for p in pairs) else torch.stack([p[1] for p in pairs])
    return x, y

def data_fingerprint(images: torch.Tensor, labels: torch.Tensor) -> str:
    "sha256 over shapes, all labels and a strided sample of about 2^20 image bytes."
    h = hashlib.sha256()
    h.update(repr((tuple(images.shape), tuple(labels.shape), str(images.dtype))).encode())
    h.update(labels.detach().cpu().contiguous().numpy().tobytes())
    flat = images.detach().reshape(-1)
    h.update(flat[::max(1, flat.numel() // (1 << 20))].cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def param_shapes(models) -> list:
    return [[[n, list(t.shape)] for n, t in m.state_dict().items()] for m in models]


def save_checkpoint(path, state: dict):
    "Write `state` atomically (unique temp file in the same folder, then rename), with a sha256 of the payload."
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save(state, buf)
    payload = buf.getvalue()
    wrapper = {"format": "kdbook-checkpoint-2", "sha256": hashlib.sha256(payload).hexdigest(),
               "payload": torch.frombuffer(bytearray(payload), dtype=torch.uint8)}
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(wrapper, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def load_checkpoint(path) -> dict:
    "Read a checkpoint written by save_checkpoint; a damaged or foreign file is a ValueError naming it."
    remedy = f"delete {path} to restart the run from scratch"
    try:
        wrapper = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"checkpoint {path} cannot be read ({type(e).__name__}); it is damaged: {remedy}") from e
    if not isinstance(wrapper, dict) or wrapper.get("format") != "kdbook-checkpoint-2":
        raise ValueError(f"checkpoint {path} is not a kdbook checkpoint of this version: {remedy}")
    payload = wrapper["payload"].numpy().tobytes()
    if hashlib.sha256(payload).hexdigest() != wrapper["sha256"]:
        raise ValueError(f"checkpoint {path} fails its sha256 check (the file is corrupt): {remedy}")
    return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)

def seed_global_rng(seed: int, device: torch.device):
    "Seed the global RNGs that layers draw from (dropout) from the run's seed."
    torch.manual_seed(seed + 2_000_029)
    if device.type == "cuda":
        torch.cuda.manual_seed(seed + 2_000_029)


def rng_state(streams, device) -> dict:
    out = {"cpu": torch.get_rng_state(), "shuffle": [s.shuffle_gen.get_state() for s in streams],
           "aug": [s.aug_gen.get_state() for s in streams]}
    if device.type == "cuda":
        out["cuda"] = torch.cuda.get_rng_state(device)
    return out


def set_rng_state(state, streams, device):
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
    for s, a, b in zip(streams, state["shuffle"], state["aug"]):
        s.shuffle_gen.set_state(a)
        s.aug_gen.set_state(b)

@dataclass
class Run:
    "Everything one training loop needs; built by kdbook.train's fit/distill/fit_many/distill_many."
    name: str  # what is trained, for messages ("fit lenet5 seed 3", ...)
    model: nn.Module  # the network, or k packed networks
    models: list  # the caller's k modules (weights copied back into them)
    images: torch.Tensor  # uint8 training images on the device
    labels: torch.Tensor  # their labels (-1 for unlabelled extra images)
    cfg: TrainConfig
    seeds: list  # one per stream
    device: torch.device
    k: int = 1  # models trained at once
    packed: bool = False  # model takes a leading k axis
    shared_input: bool = False  # one batch stream for all k models
    teacher: object = None
    tau: float = 4.0
    alpha: float = 0.0
    evaluate: object = None  # evaluate(i) -> dict of scores of model i (after copy-back)
    copy_back: object = None  # callable() copying the packed weights into `models`
    histories: list = None  # k dicts (may hold teacher scores already)
    checkpoint: object = None
    fingerprint: str = ""
    callback: object = None
    augment_kw: dict = None


def _check_finite(run: Run, values: dict, epoch: int, steps: str, lr: float):
    bad = {k: v for k, v in values.items() if not math.isfinite(v)}
    if bad:
        raise FloatingPointError(
            f"{run.name}: {', '.join(f'{k} = {v}' for k, v in bad.items())} in epoch {epoch} (steps {steps}); the run "
            f"diverged, most likely because the learning rate (lr={run.cfg.lr}, now {lr:.3g}) is too high for this "
            "model and batch size. Nothing was returned or stored; lower TrainConfig.lr and run again.")


def _checkpoint_state(run, opt, streams, epoch, step):
    run.copy_back()
    return {"models": [m.state_dict() for m in run.models], "optimizer": opt.state_dict(),
            "rng": rng_state(streams, run.device), "epoch": epoch, "step": step,
            "histories": json.dumps(run.histories), "config": json.dumps(run.cfg.to_dict()),
            "seeds": list(run.seeds), "fingerprint": run.fingerprint, "param_shapes": json.dumps(param_shapes(run.models))}


def _resume(run, opt, streams):
    state = load_checkpoint(run.checkpoint)
    path = run.checkpoint
    saved, mine = json.loads(state["config"]), run.cfg.to_dict()
    differ = sorted(k for k in mine if k not in ("progress", "device", "cuda_graphs") and saved.get(k) != mine[k])
    if differ:
        raise ValueError(f"checkpoint {path} was written with different settings ({', '.join(differ)}); "
                         "delete it or pass another checkpoint path")
    for what, a, b in [("seeds", list(state["seeds"]), list(run.seeds)), ("data", state["fingerprint"], run.fingerprint),
                       ("parameter shapes", json.loads(state["param_shapes"]), param_shapes(run.models))]:
        if a != b:
            raise ValueError(f"checkpoint {path} belongs to another run (its {what} differ from this run's); "
                             "delete it or pass another checkpoint path")
    with torch.no_grad():
        for m, sd in zip(run.models, state["models"]):
            m.load_state_dict(sd)  # copies in place: the parameters keep their addresses
    opt.load_state_dict(state["optimizer"])
    set_rng_state(state["rng"], streams, run.device)
    return int(state["epoch"]), int(state["step"]), json.loads(state["histories"])


def train_loop(run: Run) -> list:
    "The epoch loop shared by fit, distill, fit_many and distill_many; returns k histories."
    cfg, device = run.cfg, run.device
    use_cl = cfg.channels_last and device.type == "cuda" and run.images.dim() == 4
    opt = FunctionalOptimizer(run.model.parameters(), cfg)
    step = Step(run.model, opt, run.k, run.teacher, run.tau, run.alpha, run.packed, run.shared_input,
                cfg.amp, device)
    runner = GraphedStep(step, cfg.cuda_graphs)
    seed_global_rng(run.seeds[0], device)
    streams = [Stream(s, device) for s in (run.seeds[:1] if run.shared_input or not run.packed else run.seeds)]
    n = len(run.labels)
    starts = batch_starts(n, cfg.batch_size)
    total_steps = cfg.epochs * len(starts)
    epoch, step_count = 0, 0
    for h in run.histories:
        h.update({key: [] for key in ("epoch", "step", "lr", "train_loss", "wall_time_s")})
    if run.checkpoint is not None and run.packed:
        raise ValueError(f"{run.name}: checkpoints are supported for one model at a time (fit, distill), not packed runs")
    if run.checkpoint is not None and Path(run.checkpoint).exists():
        epoch, step_count, run.histories[:] = _resume(run, opt, streams)
    t0 = time.perf_counter() - (run.histories[0]["wall_time_s"][-1] if run.histories[0]["wall_time_s"] else 0.0)
    stacked = run.packed and not run.shared_input
    bar = tqdm(range(epoch, cfg.epochs), initial=epoch, total=cfg.epochs, disable=not cfg.progress,
               desc=f"epochs ({run.k} models)" if run.k > 1 else "epochs")
    for epoch in bar:
        run.model.train()
        step.reset()
        for s in streams:
            s.new_epoch(n, device)
        first = step_count
        for start in starts:
            x, y = next_batch(streams, run.images, run.labels, start, cfg, run.augment_kw, use_cl, stacked)
            opt.lr.fill_(cosine_lr(step_count, total_steps, cfg.lr, cfg.lr_min))
            runner(x, y)
            step_count += 1
        done = epoch + 1
        lr_now = cosine_lr(step_count, total_steps, cfg.lr, cfg.lr_min)
        loss = (step.loss_sum / max(len(starts), 1)).tolist()
        kd = (step.kd_sum / step.seen.clamp(min=1)).tolist()
        agree = (step.agree_sum / step.seen.clamp(min=1)).tolist()
        for i in range(run.k):
            _check_finite(run, {"train_loss": loss[i]} | ({"train_kd_loss": kd[i]} if run.teacher is not None else {}),
                          done, f"{first}-{step_count - 1}", lr_now)
        if done % cfg.eval_every == 0 or done == cfg.epochs:
            run.copy_back()
            for i, h in enumerate(run.histories):
                scores = run.evaluate(i)
                _check_finite(run, scores, done, f"{first}-{step_count - 1}", lr_now)
                extra = {"train_agreement": agree[i], "train_kd_loss": kd[i]} if run.teacher is not None else {}
                for key, value in {"epoch": done, "step": step_count, "lr": lr_now, "train_loss": loss[i],
                                   "wall_time_s": time.perf_counter() - t0, **extra, **scores}.items():
                    h.setdefault(key, []).append(value)
                h["graphed"] = runner.graphed
            bar.set_postfix(loss=f"{loss[0]:.3f}")
        if run.checkpoint is not None and cfg.checkpoint_every and (done % cfg.checkpoint_every == 0 or done == cfg.epochs):
            save_checkpoint(run.checkpoint, _checkpoint_state(run, opt, streams, done, step_count))
        if run.callback is not None:
            run.callback(done, run.histories[0] if run.k == 1 else run.histories)
    run.copy_back()
    for m in run.models:
        m.eval()
    if runner.error is not None:
        for h in run.histories:
            h["graph_error"] = runner.error
    return run.histories
