"""DD-Ranking's scores (LRS, ARS) and the optional soft-label evaluation."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from diffdistill import ddranking
from diffdistill import evaluate as E
from diffdistill.convnet import ConvNet

from test_evaluate import CFG, squares


def test_label_robust_score_by_hand():
    # 10 points over random and 10 still missing to the full data: α = 0.5·0.1 − 0.5·0.1 = 0.
    s = ddranking.label_robust_score(full_real=0.9, synthetic=0.8, random_real=0.7)
    assert s["hlr"] == pytest.approx(0.1) and s["ior"] == pytest.approx(0.1) and s["alpha"] == pytest.approx(0.0)
    assert s["lrs"] == pytest.approx((1 - math.exp(-1)) / (math.e - math.exp(-1)))   # 0.2689
    # Below random and far from full (the default run's numbers today): α < 0, LRS below the midpoint.
    low = ddranking.label_robust_score(full_real=0.97778, synthetic=0.92130, random_real=0.97407)
    assert low["alpha"] == pytest.approx(0.5 * (0.92130 - 0.97407) - 0.5 * (0.97778 - 0.92130))
    assert low["lrs"] < s["lrs"]
    # The ends of the map: α = 1 → 1, α = −1 → 0.
    assert ddranking.squash(1.0) == pytest.approx(1.0) and ddranking.squash(-1.0) == pytest.approx(0.0)


def test_augmentation_robust_score_by_hand():
    s = ddranking.augmentation_robust_score(synthetic_aug=0.80, random_aug=0.70,
                                            synthetic_plain=0.60, random_plain=0.64)
    assert s["gain_with_augmentation"] == pytest.approx(0.10)
    assert s["gain_without_augmentation"] == pytest.approx(-0.04)
    assert s["beta"] == pytest.approx(0.03)
    assert s["ars"] == pytest.approx((math.exp(0.03) - math.exp(-1)) / (math.e - math.exp(-1)))


def test_percentages_are_refused_with_the_fix():
    with pytest.raises(ValueError, match="fractions, not percentages"):
        ddranking.label_robust_score(full_real=97.8, synthetic=92.1, random_real=97.4)


def test_soft_label_loss_is_t_squared_kl_and_zero_when_student_agrees():
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    t = 4.0
    p = F.softmax(teacher / t, 1)
    by_hand = (p * (p.log() - F.log_softmax(student / t, 1))).sum(1).mean() * t * t
    assert E.soft_label_loss(student, teacher, t).item() == pytest.approx(by_hand.item(), rel=1e-5)
    assert E.soft_label_loss(teacher, teacher, t).item() == pytest.approx(0.0, abs=1e-6)


def test_teacher_sees_the_batch_in_its_own_normalisation():
    net = ConvNet(3, 4, 16, depth=2, width=8)
    t_mean, t_std, e_mean, e_std = [0.1, 0.2, 0.3], [0.5, 0.4, 0.3], [0.4, 0.4, 0.4], [0.2, 0.25, 0.3]
    teacher = E.Teacher(net, t_mean, t_std, e_mean, e_std, "cpu")
    unit = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    as_eval = (unit - torch.tensor(e_mean).view(1, 3, 1, 1)) / torch.tensor(e_std).view(1, 3, 1, 1)
    as_teacher = (unit - torch.tensor(t_mean).view(1, 3, 1, 1)) / torch.tensor(t_std).view(1, 3, 1, 1)
    with torch.no_grad():
        assert torch.allclose(teacher(as_eval), net(as_teacher), atol=1e-5)


class _Always(torch.nn.Module):
    """A teacher that puts all its mass on one class, whatever it is shown."""

    def __init__(self, k, classes):
        super().__init__()
        self.k, self.classes = k, classes

    def forward(self, x):
        logits = torch.full((x.shape[0], self.classes), -10.0)
        logits[:, self.k] = 10.0
        return logits


def test_soft_labels_train_on_the_teachers_distribution_not_on_the_labels():
    train, test = squares(seed=0), squares(n_per_class=25, seed=1)
    mean, std = E.normalization(CFG, train["images"])
    hard = E.evaluate_run(train, test, CFG, seed=0, progress=False, mean=mean, std=std)
    teacher = E.Teacher(_Always(2, 4), mean, std, mean, std, "cpu", identity="always-2")
    soft = E.evaluate_run(train, test, dict(CFG, labels="soft", temperature=1.0), seed=0, progress=False,
                          mean=mean, std=std, teacher=teacher)
    assert hard["accuracy"] >= 0.85
    # The student learnt the teacher's answer (class 2 for everything): chance-level accuracy, and
    # class 2 is the only one it gets right.
    assert soft["accuracy"] == pytest.approx(0.25)
    assert soft["per_class_accuracy"] == [0.0, 0.0, 1.0, 0.0]


def test_soft_labels_need_a_teacher_and_a_known_label_mode():
    train = squares(n_per_class=4)
    with pytest.raises(ValueError, match="no teacher"):
        E.train_classifier(train, dict(CFG, labels="soft"), seed=0, progress=False)
    with pytest.raises(ValueError, match="labels must be one of"):
        E.train_classifier(train, dict(CFG, labels="fuzzy"), seed=0, progress=False)


def test_hard_label_runs_keep_their_identity():
    # The soft-label keys enter a run's identity only when soft: hard-label resume states stay valid.
    train = squares(n_per_class=4)
    args = (0, train["images"], train["labels"], [0.5] * 3, [0.2] * 3, 4)
    assert E.run_hash(CFG, *args) == E.run_hash(dict(CFG, labels="hard"), *args)
    assert E.run_hash(CFG, *args) != E.run_hash(dict(CFG, labels="soft"), *args, teacher="x")
    assert (E.run_hash(dict(CFG, labels="soft"), *args, teacher="x")
            != E.run_hash(dict(CFG, labels="soft"), *args, teacher="y"))
