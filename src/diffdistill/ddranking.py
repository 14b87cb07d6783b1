"""DD-Ranking's scores of a distilled set (Li et al. 2025, NUS-HPC-AI-Lab/DD-Ranking), from accuracies.

The challenge ranks sets by one hard-label accuracy. DD-Ranking showed that this rewards what the
evaluation adds (soft labels from a teacher, strong augmentation) as much as what the set holds, and
scores a set by how much it beats a random real subset of the same size, with and without those aids.
All accuracies here are fractions in [0, 1]; λ = 0.5 weighs the two terms equally, as DD-Ranking does.

- Label-Robust Score (``ddranking/metrics/hard_label.py``; soft labels use the same formula):
  HLR = acc(full real) − acc(synthetic), the hard-label recovery still missing;
  IOR = acc(synthetic) − acc(random real of equal size), the improvement over random;
  α = λ·IOR − (1 − λ)·HLR, LRS = (e^α − e^−1) / (e − e^−1), which maps α ∈ [−1, 1] onto [0, 1].
- Augmentation-Robust Score (``ddranking/metrics/aug_robust.py``):
  β = λ·(syn − random, both trained with DSA) + (1 − λ)·(syn − random, both without augmentation),
  ARS = (e^β − e^−1) / (e − e^−1).
α = 0 (the gain over random equals the recovery still missing) maps to (1 − e^−1)/(e − e^−1) ≈ 0.269;
α = 1 (100 points over random, nothing missing) to 1, α = −1 to 0. Higher is better for both scores.
"""
import math

LAMBDA = 0.5


def squash(x):
    """DD-Ranking's map of a score in [−1, 1] onto [0, 1]: (e^x − e^−1) / (e − e^−1)."""
    return (math.exp(x) - math.exp(-1.0)) / (math.e - math.exp(-1.0))


def label_robust_score(full_real, synthetic, random_real, lam=LAMBDA):
    """{hlr, ior, alpha, lrs} from the three mean accuracies (fractions)."""
    _check_fractions(full_real=full_real, synthetic=synthetic, random_real=random_real)
    hlr = full_real - synthetic
    ior = synthetic - random_real
    alpha = lam * ior - (1.0 - lam) * hlr
    return {"hlr": hlr, "ior": ior, "alpha": alpha, "lrs": squash(alpha)}


def augmentation_robust_score(synthetic_aug, random_aug, synthetic_plain, random_plain, lam=LAMBDA):
    """{gain_with_augmentation, gain_without_augmentation, beta, ars} from four mean accuracies:
    synthetic and random real, each trained with the evaluation's augmentation (DSA) and without."""
    _check_fractions(synthetic_aug=synthetic_aug, random_aug=random_aug,
                     synthetic_plain=synthetic_plain, random_plain=random_plain)
    with_aug = synthetic_aug - random_aug
    without = synthetic_plain - random_plain
    beta = lam * with_aug + (1.0 - lam) * without
    return {"gain_with_augmentation": with_aug, "gain_without_augmentation": without,
            "beta": beta, "ars": squash(beta)}


def _check_fractions(**accuracies):
    for name, value in accuracies.items():
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"ddranking: {name} accuracy {value!r} is not a fraction in [0, 1]; "
                             f"DD-Ranking's scores take accuracies as fractions, not percentages.")


def _mean(summary, name):
    block = (summary or {}).get(name)
    return float(block["mean"]) if block else None


def dd_ranking(summary):
    """The scores a run's ``summary.json`` supports, as ``{"hard_label": {hlr, ior, alpha, lrs},
    "soft_label": {...}, "augmentation": {…, ars}}``; a score whose runs are missing is absent.

    ``summary`` is ``evaluate.summarize``'s output with, when those runs were made, the summaries of
    the runs without augmentation (``no_augmentation``) and with soft labels (``soft_labels``). The
    soft-label score compares soft-label synthetic and random real runs, and the full real data
    with hard labels, as DD-Ranking's soft-label evaluator does.
    """
    full, syn, rand = (_mean(summary, k) for k in ("full_real", "synthetic", "random_real"))
    out = {}
    if None not in (full, syn, rand):
        out["hard_label"] = label_robust_score(full, syn, rand)
    soft = summary.get("soft_labels")
    if full is not None and _mean(soft, "synthetic") is not None and _mean(soft, "random_real") is not None:
        out["soft_label"] = label_robust_score(full, _mean(soft, "synthetic"), _mean(soft, "random_real"))
    plain = summary.get("no_augmentation")
    if None not in (syn, rand) and _mean(plain, "synthetic") is not None and _mean(plain, "random_real") is not None:
        out["augmentation"] = augmentation_robust_score(syn, rand, _mean(plain, "synthetic"),
                                                        _mean(plain, "random_real"))
    return out
