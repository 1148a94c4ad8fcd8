"Fast checks of kdbook.experiments.mnist, the helpers exported by chapters/21_mnist.ipynb (§4.1 and the α×τ study)."
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kdbook.experiments.mnist import (classification_report, confusion_matrix, error_overlap, format_pm, kd_logit_gradients,
                          label_gradient_share, near_chance, plot_alpha_tau_heatmaps, plot_figure2, soft_label_entropy,
                          summarize_runs)


def test_confusion_matrix_counts_and_rejects_bad_input():
    y, p = np.array([0, 1, 2, 2]), np.array([0, 2, 2, 1])
    cm = confusion_matrix(y, p, 3)
    assert cm.tolist() == [[1, 0, 0], [0, 0, 1], [0, 1, 1]]
    assert cm.sum() == 4
    with pytest.raises(ValueError, match="num_classes"):
        confusion_matrix(y, p, 2)
    with pytest.raises(ValueError, match="same length"):
        confusion_matrix(y, p[:2], 3)


def test_classification_report_matches_hand_computation():
    y, p = np.array([0, 0, 1, 1]), np.array([0, 1, 1, 1])
    r = classification_report(y, p, 2)
    assert r["accuracy"] == pytest.approx(0.75)
    assert r["precision"] == pytest.approx([1.0, 2 / 3])
    assert r["recall"] == pytest.approx([0.5, 1.0])
    assert r["f1"][1] == pytest.approx(0.8)


def test_error_overlap_counts_copied_mistakes():
    y = np.array([0, 1, 2, 3])
    t = np.array([0, 5, 5, 3])
    s = np.array([0, 5, 6, 4])
    o = error_overlap(y, t, s)
    assert o["student_errors"] == 3
    assert o["shared"] == pytest.approx(2 / 3)
    assert o["copied"] == pytest.approx(1 / 3)


@pytest.mark.parametrize("tau,alpha", [(1.0, 0.0), (4.0, 0.5), (10.0, 0.9)])
def test_kd_logit_gradients_equal_autograd_of_eq1(tau, alpha):
    g = torch.Generator().manual_seed(1)
    zs, zt = torch.randn(16, 10, generator=g) * 2, torch.randn(16, 10, generator=g) * 2
    y = torch.randint(0, 10, (16,), generator=g)
    z = zs.double().clone().requires_grad_(True)
    loss = alpha * F.cross_entropy(z, y, reduction="sum") + (1 - alpha) * tau**2 * (
        -(torch.softmax(zt.double() / tau, 1) * torch.log_softmax(z / tau, 1)).sum())
    loss.backward()
    a, b = kd_logit_gradients(zs, zt, y, tau, alpha)
    assert torch.allclose(z.grad, a + b, atol=1e-9)


def test_entropy_and_label_share_limits():
    g = torch.Generator().manual_seed(2)
    zs, zt = torch.randn(32, 10, generator=g), torch.randn(32, 10, generator=g) * 5
    y = torch.randint(0, 10, (32,), generator=g)
    assert soft_label_entropy(zt, 1e5) == pytest.approx(math.log(10), abs=1e-6)
    assert soft_label_entropy(zt, 1.0) < soft_label_entropy(zt, 10.0)
    assert label_gradient_share(zs, zt, y, 4.0, 1.0)["label_share"] == 1.0
    assert label_gradient_share(zs, zt, y, 4.0, 0.0)["label_share"] == 0.0
    # a larger tau gives the KD term a larger share at fixed alpha (the chapter's argument)
    assert label_gradient_share(zs, zt, y, 10.0, 0.5)["label_share"] < label_gradient_share(zs, zt, y, 1.0, 0.5)["label_share"]


def test_plots_build_and_check_shapes():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig = plot_figure2([1000, 2000], [[90, 95]], [[80, 84]], [85], [[70, 72]])
    assert len(fig.axes) == 2
    plt.close(fig)
    with pytest.raises(ValueError, match="shape"):
        plot_alpha_tau_heatmaps([0, 1], [1, 10], {"acc": np.zeros((3, 2))})


def test_near_chance_flags_runs_below_twice_chance():
    assert near_chance([9.9, 19.99, 20.0, 97.0], 10).tolist() == [True, True, False, False]
    assert near_chance([1.0, 1.99, 2.0], 100).tolist() == [True, True, False]  # CIFAR-100 chance is 1%
    assert bool(near_chance(25.0, 10, factor=3.0))
    with pytest.raises(ValueError, match="num_classes"):
        near_chance(50.0, 1)


def test_summarize_runs_leaves_stalled_runs_out_and_uses_sample_std():
    values = np.array([[80.0, 1.0], [84.0, 3.0], [10.0, 99.0]])
    s = summarize_runs(values, stalled=[False, False, True])
    assert (s["n"], s["n_stalled"]) == (2, 1)
    assert s["mean"].tolist() == [82.0, 2.0]
    assert s["std"] == pytest.approx(np.std(values[:2], axis=0, ddof=1))  # ddof = 1, not numpy's default 0
    everything = summarize_runs(values)
    assert everything["n"] == 3 and everything["std"][0] == pytest.approx(np.std(values[:, 0], ddof=1))
    none_left = summarize_runs(values[:1], stalled=[True])
    assert none_left["n"] == 0 and np.isnan(none_left["mean"]).all()
    with pytest.raises(ValueError, match="one flag per run"):
        summarize_runs(values, stalled=[True, False])


def test_format_pm_names_n_and_drops_the_spread_of_one_run():
    assert format_pm(86.5, 1.44, 3, 2, "%") == "86.50 ± 1.44% (n = 3)"
    assert format_pm(86.5, float("nan"), 1, 1, "%") == "86.5% (n = 1)"
    assert format_pm(float("nan"), float("nan"), 0) == "no run left (n = 0)"


def test_figure2_leaves_stalled_runs_out_of_its_bands():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from kdbook.experiments.mnist import _mean_std
    mean, std = _mean_std([[90.0, np.nan], [92.0, 95.0], [94.0, 97.0]])
    assert mean.tolist() == [92.0, 96.0] and std == pytest.approx([2.0, np.sqrt(2.0)])
    fig = plot_figure2([1000, 2000], [[90, np.nan], [92, 95]], [[80, np.nan], [82, 84]], [85, 86])
    plt.close(fig)
