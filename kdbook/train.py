from __future__ import annotations

import contextlib
import copy
import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .augment import augment
from .data import ImageSet, to_float
from .engine import (OPTIMIZERS, Run, TrainConfig, autocast, batch_starts, cosine_lr, data_fingerprint, resolve_device,
                     train_loop)
from .losses import check_alpha, check_tau, ensemble_logits, kd_loss
from .metrics import accuracy, ece, nll, predictive_kl, top1_agreement
from .packing import can_pack, pack

PROFILES = ("smoke", "quick", "paper")
_MISSING = object()


def by_profile(profile: str,  # one of "smoke", "quick", "paper"
               smoke=_MISSING,  # value used by the CPU smoke run
               quick=_MISSING,  # value used by the one-GPU quick run
               paper=_MISSING,  # the paper's value
               ):
    "Return the value given for `profile`; ValueError for an unknown profile or a missing value."
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}: valid profiles are {', '.join(PROFILES)}")
    value = {"smoke": smoke, "quick": quick, "paper": paper}[profile]
    if value is _MISSING:
        raise ValueError(f"by_profile: no value given for profile {profile!r}; pass {profile}=...")
    return value

def make_optimizer(params, cfg: TrainConfig) -> torch.optim.Optimizer:
    "torch.optim's SGD (Nesterov momentum) or Adam with the configured settings (the engine uses its own, same math)."
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                               nesterov=cfg.nesterov and cfg.momentum > 0, weight_decay=cfg.weight_decay)
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def make_model(name: str,  # a kdbook.models name: "lenet5", "resnet20", "resnet56", ...
               seed: int,  # seed of the weight initialisation
               **kwargs,  # passed on to kdbook.models.get_model
               ) -> nn.Module:
    "Build a model with weights drawn from `seed`, leaving the global RNG untouched."
    from kdbook.models import get_model
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return get_model(name, **kwargs)

class Ensemble(nn.Module):
    "Teachers evaluated together in eval mode; calling it returns ensemble logits (paper §3)."

    def __init__(self, members,  # an nn.Module or a list of them
                 vectorize: bool = True,  # on CUDA, run the members as one packed network when they can be packed
                 ):
        super().__init__()
        members = list(members) if isinstance(members, (list, tuple, nn.ModuleList)) else [members]
        if not members:
            raise ValueError("Ensemble needs at least one member")
        self.members = nn.ModuleList(members)
        self.vectorize = bool(vectorize) and len(members) > 1 and can_pack(members) is None
        self._packed = None  # (Packed, device): a snapshot of the members' weights, taken on first use

    def refresh(self):
        "Forget the packed snapshot of the weights (call after changing the members)."
        self._packed = None
        return self

    def _pack(self, device):
        if self._packed is None or self._packed[1] != device:
            packed = pack(list(self.members), shared_input=True).to(device).eval()
            for p in packed.parameters():
                p.requires_grad_(False)
            self._packed = (packed, device)
        return self._packed[0]

    @torch.no_grad()
    def member_logits(self, x: torch.Tensor,
                      vectorize: bool | None = None,  # None: packed on CUDA, a loop on CPU (faster there)
                      ) -> torch.Tensor:
        "Logits of every member, shape (m, N, C)."
        vec = self.vectorize and (x.device.type == "cuda" if vectorize is None else vectorize)
        if vec:
            return self._pack(x.device)(x)
        was_training = [m.training for m in self.members]
        for m in self.members:
            m.eval()
        try:
            return torch.stack([m(x) for m in self.members])
        finally:
            for m, t in zip(self.members, was_training):
                m.train(t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        "Ensemble logits log mean_i softmax(z_i), shape (N, C); a single member gives its own logits."
        if len(self.members) == 1:
            with torch.no_grad():
                m = self.members[0]
                was = m.training
                m.eval()
                try:
                    return m(x)
                finally:
                    m.train(was)
        return ensemble_logits(self.member_logits(x))

def _as_float_images(images, device) -> torch.Tensor:
    x = images.images if isinstance(images, ImageSet) else images
    x = x.to(device)
    return to_float(x) if x.dtype == torch.uint8 else x.float()


def _model_device(model) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def predict_logits(model_or_models,  # an nn.Module, an Ensemble, or a list of modules (an ensemble)
                   images,  # an ImageSet, a uint8 batch (N, C, H, W) or float images in [-1, 1]
                   batch_size: int = 1000,  # examples per forward pass
                   device=None,  # where to compute; default: the model's device
                   amp: bool = False,  # bf16 autocast (CUDA only); evaluation in the book is fp32
                   return_members: bool = False,  # for ensembles: (m, N, C) member logits
                   ) -> torch.Tensor:
    "Logits of a model (or an ensemble's log mean probabilities) in eval mode, as a float32 CPU tensor."
    model = model_or_models
    if isinstance(model, (list, tuple)):
        model = Ensemble(model)
    device = torch.device(device) if device is not None else _model_device(model)
    model = model.to(device)
    x_all = images.images if isinstance(images, ImageSet) else images
    outs = []
    was = model.training
    model.eval()
    try:
        for start in range(0, len(x_all), batch_size):
            x = _as_float_images(x_all[start:start + batch_size], device)
            with autocast(device, amp):
                if return_members:
                    z = model.member_logits(x) if isinstance(model, Ensemble) else model(x)[None]
                else:
                    z = model(x)
            outs.append(z.float())  # stays on the device: one copy to the host at the end
    finally:
        model.train(was)
    return torch.cat(outs, dim=1 if return_members else 0).cpu()


def evaluate(student_logits: torch.Tensor,  # (N, C) logits of the model being judged
             teacher_logits: torch.Tensor | None = None,  # (N, C) teacher logits: adds agreement and KL
             labels: torch.Tensor | None = None,  # (N,) true labels: adds accuracy, NLL, ECE
             ) -> dict:
    "Generalization (acc, nll, ece) and fidelity (agreement Eq. 2, kl Eq. 3 at τ = 1) as floats."
    out = {}
    if labels is not None:
        labels = labels.to(student_logits.device)
        out.update(acc=float(accuracy(student_logits, labels)), nll=float(nll(student_logits, labels)),
                   ece=float(ece(student_logits, labels)))
    if teacher_logits is not None:
        teacher_logits = teacher_logits.to(student_logits.device)
        out.update(agreement=float(top1_agreement(teacher_logits, student_logits)),
                   kl=float(predictive_kl(teacher_logits, student_logits)))
    return out

def ce_loss(model, x, y):
    "Supervised step loss: cross-entropy of the model's logits against the labels."
    if y is None:
        raise ValueError("the augmentation policy added unlabelled images to the batch ('ood', 'synthetic'): "
                         "fit needs a label for every image; use these policies with distill")
    return F.cross_entropy(model(x).float(), y)


def kd_step_loss(teacher: nn.Module,  # the (ensemble) teacher; evaluated without gradients
                 tau: float = 4.0,  # softmax temperature
                 alpha: float = 0.0,  # weight of the NLL term (Eq. 1); 0 in the paper's main text
                 ):
    "Distillation step loss (Eq. 1) with teacher logits computed online on the same augmented batch."
    def loss(model, x, y):
        if alpha > 0 and y is None:
            raise ValueError("alpha > 0 needs a label for every image, but the augmentation policy added "
                             "unlabelled ones ('ood', 'synthetic'): use alpha=0")
        with torch.no_grad():
            teacher_logits = teacher(x).float()
        return kd_loss(model(x).float(), teacher_logits, labels=y if alpha > 0 else None, tau=tau, alpha=alpha)
    return loss


def train_epoch(model, optimizer, images, labels, loss_fn, cfg: TrainConfig, shuffle_gen, aug_gen, step: int,
                total_steps: int, augment_kw: dict | None = None) -> tuple[float, int]:
    "A plain eager epoch with a torch.optim optimizer (a reference for the engine); returns (mean loss, steps)."
    device = images.device
    order = torch.randperm(len(labels), generator=shuffle_gen).to(device)
    model.train()
    loss_sum = torch.zeros((), device=device)
    starts = batch_starts(len(labels), cfg.batch_size)
    for start in starts:
        idx = order[start:start + cfg.batch_size]
        x = augment(to_float(images[idx]), cfg.policy, aug_gen, **(augment_kw or {}))
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, total_steps, cfg.lr, cfg.lr_min)
        with autocast(device, cfg.amp):
            loss = loss_fn(model, x, labels[idx] if x.shape[0] == idx.numel() else None)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += loss.detach().float()
        step += 1
    return float(loss_sum) / max(len(starts), 1), step

def _prepare_model(model: nn.Module, device: torch.device, cfg: TrainConfig) -> nn.Module:
    model = model.to(device)
    if cfg.channels_last and device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model


def _check_images(name, data):
    if not isinstance(data, ImageSet):
        raise ValueError(f"{name} must be a kdbook.data.ImageSet, got {type(data).__name__}")
    if len(data) == 0:
        raise ValueError(f"{name} is empty")


def _check_seed(seed):
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    return seed


def _run(name, model, models, images, labels, cfg, seeds, device, **kw) -> list:
    "Build the engine's Run and execute it with the caller's CPU RNG restored afterwards."
    fingerprint = data_fingerprint(images, labels)
    run = Run(name=name, model=model, models=models, images=images, labels=labels, cfg=cfg, seeds=list(seeds),
              device=device, fingerprint=fingerprint, **kw)
    with torch.random.fork_rng(devices=[]):
        return train_loop(run)


def fit(model: nn.Module,  # the network to train (its initial weights are the caller's: see make_model)
        train: ImageSet,  # labelled training images (uint8)
        test: ImageSet,  # labelled test images (uint8)
        cfg: TrainConfig,  # optimisation settings
        seed: int,  # seed of the data order, the augmentation and dropout
        checkpoint: str | Path | None = None,  # resumable checkpoint file (saved every cfg.checkpoint_every epochs)
        callback=None,  # called as callback(epoch, history) after every epoch
        augment_kw: dict | None = None,  # extra arguments of kdbook.augment.augment
        ) -> dict:
    "Supervised training (appendix A.3) → history of lists: epoch, lr, train_loss, test_acc/nll/ece."
    _check_images("train", train)
    _check_images("test", test)
    _check_seed(seed)
    device = resolve_device(cfg.device)
    model = _prepare_model(model, device, cfg)
    test_images, test_labels = test.images.to(device), test.labels.cpu()

    def evaluate_fn(i):
        z = predict_logits(model, test_images, cfg.eval_batch_size, device)
        return {f"test_{k}": v for k, v in evaluate(z, labels=test_labels).items()}

    return _run(f"fit of a {type(model).__name__} (seed {seed})", model, [model], train.images.to(device),
                train.labels.to(device), cfg, [seed], device, evaluate=evaluate_fn, copy_back=lambda: None,
                histories=[{}], checkpoint=checkpoint, callback=callback, augment_kw=augment_kw)[0]


def _distill_inputs(distill_data, extra_data, device):
    images, labels = distill_data.images.to(device), distill_data.labels.to(device)
    if extra_data is not None:
        _check_images("extra_data", extra_data)
        if extra_data.images.shape[1:] != distill_data.images.shape[1:]:
            raise ValueError(f"extra_data images {tuple(extra_data.images.shape[1:])} differ in shape from "
                             f"distill_data images {tuple(distill_data.images.shape[1:])}")
        images = torch.cat([images, extra_data.images.to(device)])
        labels = torch.cat([labels, torch.full((len(extra_data),), -1, dtype=labels.dtype, device=device)])
    return images, labels


def _distill_eval(teacher, images, n_distill, test, cfg, device):
    "Teacher scores and a function scoring a student on the test set and the clean distillation images."
    test_images, test_labels = test.images.to(device), test.labels.cpu()
    teacher_test = predict_logits(teacher, test_images, cfg.eval_batch_size, device)
    teacher_train = predict_logits(teacher, images[:n_distill], cfg.eval_batch_size, device)
    first = {f"teacher_test_{k}": [v] for k, v in evaluate(teacher_test, labels=test_labels).items()}

    def score(m):
        z = predict_logits(m, test_images, cfg.eval_batch_size, device)
        zd = predict_logits(m, images[:n_distill], cfg.eval_batch_size, device)
        out = {f"test_{k}": v for k, v in evaluate(z, teacher_test, test_labels).items()}
        # distill_*: the un-augmented distillation images, eval mode (not the paper's train agreement)
        out.update({f"distill_{k}": v for k, v in evaluate(zd, teacher_train).items()})
        return out

    return first, score


def distill(student: nn.Module,  # the network to train
            teachers,  # an nn.Module, a list of them (an ensemble, paper §3) or an Ensemble
            distill_data: ImageSet,  # the distillation data (its labels are used only when alpha > 0)
            test: ImageSet,  # labelled test images
            cfg: TrainConfig,  # optimisation settings
            seed: int,  # seed of the data order, the augmentation and dropout
            tau: float = 4.0,  # softmax temperature of the KD term
            alpha: float = 0.0,  # weight of the NLL term (Eq. 1)
            extra_data: ImageSet | None = None,  # extra unlabelled images mixed into the distillation data
            checkpoint: str | Path | None = None,  # resumable checkpoint file
            callback=None,  # called as callback(epoch, history) after every epoch
            augment_kw: dict | None = None,  # extra arguments of kdbook.augment.augment
            ) -> dict:
    "Knowledge distillation (Eq. 1) → history: test acc/nll/ece/agreement/kl, train_agreement/train_kd_loss, distill_*."
    _check_images("distill_data", distill_data)
    _check_images("test", test)
    _check_seed(seed)
    tau, alpha = check_tau(tau), check_alpha(alpha)
    if alpha > 0 and extra_data is not None:
        raise ValueError("alpha > 0 needs true labels for every example, but extra_data is unlabelled: use alpha=0")
    device = resolve_device(cfg.device)
    student = _prepare_model(student, device, cfg)
    teacher = _prepare_model(teachers if isinstance(teachers, Ensemble) else Ensemble(teachers), device, cfg)
    images, labels = _distill_inputs(distill_data, extra_data, device)
    first, score = _distill_eval(teacher, images, len(distill_data), test, cfg, device)
    return _run(f"distillation of a {type(student).__name__} (seed {seed}, tau {tau}, alpha {alpha})", student,
                [student], images, labels, cfg, [seed], device, teacher=teacher, tau=tau, alpha=alpha,
                evaluate=lambda i: score(student), copy_back=lambda: None, histories=[first],
                checkpoint=checkpoint, callback=callback, augment_kw=augment_kw)[0]

def _pack(models, shared_input: bool):
    "k models as one packed network (kdbook.packing) taking (k, B, ...) (or a shared (B, ...)), returning (k, B, C)."
    reason = can_pack(list(models))
    if reason is not None:
        raise ValueError(f"these models cannot be trained together ({reason}); loop over fit/distill instead")
    return pack(list(models), shared_input=shared_input)


def _check_seeds(seeds, k):
    if len(seeds) != k:
        raise ValueError(f"need one seed per model: got {len(seeds)} seeds for {k} models")
    for s in seeds:
        _check_seed(s)


def fit_many(models: list,  # k models of one architecture
             train: ImageSet, test: ImageSet, cfg: TrainConfig,
             seeds: list,  # one seed per model (data order and augmentation, as fit's seed)
             augment_kw: dict | None = None,
             ) -> list:
    "fit for k models at once (packed as one network, one step); the caller's modules get the weights; k histories."
    _check_images("train", train)
    _check_images("test", test)
    _check_seeds(seeds, len(models))
    device = resolve_device(cfg.device)
    models = [_prepare_model(m, device, cfg) for m in models]
    packed = _pack(models, shared_input=False).to(device)
    test_images, test_labels = test.images.to(device), test.labels.cpu()

    def evaluate_fn(i):
        z = predict_logits(models[i], test_images, cfg.eval_batch_size, device)
        return {f"test_{k}": v for k, v in evaluate(z, labels=test_labels).items()}

    return _run(f"fit_many of {len(models)} x {type(models[0]).__name__} (seeds {list(seeds)})", packed, models,
                train.images.to(device), train.labels.to(device), cfg, seeds, device, k=len(models), packed=True,
                evaluate=evaluate_fn, copy_back=lambda: packed.copy_to(models), histories=[{} for _ in models],
                augment_kw=augment_kw)


def distill_many(students: list,  # k students of one architecture
                 teachers,  # one teacher (module, list of modules or Ensemble) shared by all students
                 distill_data: ImageSet, test: ImageSet, cfg: TrainConfig,
                 seeds: list,  # one seed per student (data order and augmentation, as distill's seed)
                 tau: float = 4.0, alpha: float = 0.0,
                 augment_kw: dict | None = None,
                 same_batches: bool = False,  # all students see the batches of seeds[0]: one teacher call labels all
                 ) -> list:
    "distill for k students at once (packed as one network, one step); k histories."
    _check_images("distill_data", distill_data)
    _check_images("test", test)
    _check_seeds(seeds, len(students))
    if not isinstance(same_batches, bool):
        raise ValueError(f"same_batches must be True or False, got {same_batches!r}")
    tau, alpha = check_tau(tau), check_alpha(alpha)
    device = resolve_device(cfg.device)
    students = [_prepare_model(m, device, cfg) for m in students]
    packed = _pack(students, shared_input=same_batches).to(device)
    teacher = _prepare_model(teachers if isinstance(teachers, Ensemble) else Ensemble(teachers), device, cfg)
    images, labels = distill_data.images.to(device), distill_data.labels.to(device)
    first, score = _distill_eval(teacher, images, len(distill_data), test, cfg, device)
    first["same_batches"] = same_batches
    return _run(f"distill_many of {len(students)} x {type(students[0]).__name__} (seeds {list(seeds)}, tau {tau}, "
                f"alpha {alpha})", packed, students, images, labels, cfg, seeds, device, k=len(students), packed=True,
                shared_input=same_batches, teacher=teacher, tau=tau, alpha=alpha,
                evaluate=lambda i: score(students[i]), copy_back=lambda: packed.copy_to(students),
                histories=[copy.deepcopy(first) for _ in students], augment_kw=augment_kw)
