"""Continuous-time VP-SDE (linear β from 0.1 to 20) as U-ViT trains it, and DPM-Solver samplers.

Images live in the model's space [-1, 1]. The network sees ``t · 999`` and predicts the noise ε.
"""
import math

import torch

BETA_0, BETA_1 = 0.1, 20.0
TIME_SCALE = 999.0  # the network's time input is t·999, as in U-ViT


def log_alpha(t):
    """log α_t with x_t = α_t x_0 + σ_t ε; α_t² = ᾱ(t) = exp(-(0.1 t + 9.95 t²))."""
    return -0.25 * t ** 2 * (BETA_1 - BETA_0) - 0.5 * t * BETA_0


def alpha_sigma(t):
    la = log_alpha(t)
    return torch.exp(la), torch.sqrt(-torch.expm1(2.0 * la))


def lambda_t(t):
    """Half log-SNR, λ = log(α/σ)."""
    la = log_alpha(t)
    return la - 0.5 * torch.log(-torch.expm1(2.0 * la))


def inverse_lambda(lam):
    """t such that λ(t) = lam, in closed form for the linear schedule."""
    log_alpha_val = -0.5 * torch.logaddexp(torch.zeros_like(lam), -2.0 * lam)
    delta = BETA_0 ** 2 + 2.0 * (BETA_1 - BETA_0) * (-2.0 * log_alpha_val)
    return 2.0 * (-2.0 * log_alpha_val) / (torch.sqrt(delta) + BETA_0)


def training_loss(net, x0, y=None, t=None, noise=None, generator=None):
    """ε-prediction mean squared error at t ~ U(0, 1); returns a scalar.

    ``t`` and ``noise`` may be given so that a global batch split across processes or micro-batches
    sees exactly the draws it would have seen in one piece."""
    if t is None:
        t = torch.rand(x0.shape[0], device=x0.device, generator=generator)
    if noise is None:
        noise = torch.randn(x0.shape, device=x0.device, generator=generator, dtype=x0.dtype)
    alpha, sigma = alpha_sigma(t)
    shape = (-1,) + (1,) * (x0.dim() - 1)
    xt = alpha.view(shape) * x0 + sigma.view(shape) * noise
    pred = net(xt, t * TIME_SCALE, y)
    return (pred.float() - noise.float()).pow(2).mean()


# ----------------------------------------------------------------------------------------------
# DPM-Solver samplers (Lu et al., 2022: "DPM-Solver", NeurIPS; "DPM-Solver++", arXiv 2211.01095).
#
# The diffusion ODE is solved in the half-log-SNR λ = log(α/σ), where its linear part is exact and
# only the network term is approximated by a Taylor expansion. The state x is float32 on x_T's
# device whatever the network's dtype; the time grid and step coefficients are Python floats computed
# on the host in float64, so the loop never synchronises the device: its only cost beyond the network
# calls is a few element-wise ops per step.
# ----------------------------------------------------------------------------------------------

VARIANTS = ("fast", "multistep")
SKIP_TYPES = ("logSNR", "time_uniform")


def _schedule_at(t):
    """(log α_t, σ_t, λ_t) as Python floats, computed in float64."""
    tt = torch.tensor(float(t), dtype=torch.float64)
    return float(log_alpha(tt)), float(alpha_sigma(tt)[1]), float(lambda_t(tt))


def _t_of_lambda(lam):
    return float(inverse_lambda(torch.tensor(float(lam), dtype=torch.float64)))


def time_grid(n, t_T=1.0, t_0=1e-4, skip_type="logSNR"):
    """n + 1 decreasing times from t_T to t_0 (Python floats), uniform in λ or in t."""
    if skip_type == "logSNR":
        lam_T, lam_0 = _schedule_at(t_T)[2], _schedule_at(t_0)[2]
        lams = torch.linspace(lam_T, lam_0, n + 1, dtype=torch.float64)
        ts = [float(v) for v in inverse_lambda(lams)]
        ts[0], ts[-1] = float(t_T), float(t_0)  # exact endpoints, no round-trip error
        return ts
    if skip_type == "time_uniform":
        return [float(v) for v in torch.linspace(t_T, t_0, n + 1, dtype=torch.float64)]
    raise ValueError(f"unknown skip_type {skip_type!r}; use one of {SKIP_TYPES}")


def fast_orders(steps):
    """Orders of the K = steps//3 + 1 segments of DPM-Solver-fast; they sum to ``steps``."""
    K = steps // 3 + 1
    if steps % 3 == 0:
        return [3] * (K - 2) + [2, 1]
    if steps % 3 == 1:
        return [3] * (K - 1) + [1]
    return [3] * (K - 1) + [2]


def network_calls(steps, guidance_scale=0.0):
    """Network forward passes one ``dpm_solver_sample`` makes: ``steps`` solver evaluations, each one
    network call on the batch, or two (conditional + null class) with classifier-free guidance."""
    return steps * (2 if guidance_scale > 0 else 1)


def _net_dtype(net, fallback):
    for p in getattr(net, "parameters", lambda: iter(()))():
        if p.is_floating_point():
            return p.dtype
    return fallback


def _noise_model(net, y, guidance_scale, null_class, in_dtype):
    """ε̂(x, t) in float32 from the network, with optional classifier-free guidance."""
    y_null = None
    if guidance_scale > 0:
        y_null = torch.full_like(y, int(null_class))

    def eps(x, t):
        t_in = torch.full((x.shape[0],), t * TIME_SCALE, dtype=torch.float32, device=x.device)
        x_in = x.to(in_dtype)
        out = net(x_in, t_in, y).float()
        if y_null is not None:
            # U-ViT's convention: ε = ε(x, y) + s·(ε(x, y) − ε(x, ∅)) = (1 + s)·ε(x, y) − s·ε(x, ∅).
            # Two separate calls, as U-ViT's eval.py does: memory stays that of one batch.
            out_null = net(x_in, t_in, y_null).float()
            out = (1.0 + guidance_scale) * out - guidance_scale * out_null
        return out

    return eps


def _singlestep_update(eps, x, s, t, order):
    """One DPM-Solver-{1,2,3} step from s to t (noise-prediction form; paper Algorithms 1–2 with
    r1 = 1/2 for order 2 and r1 = 1/3, r2 = 2/3 for order 3). Uses ``order`` network calls."""
    la_s, _, lam_s = _schedule_at(s)
    la_t, sig_t, lam_t = _schedule_at(t)
    h = lam_t - lam_s
    e_s = eps(x, s)
    # The exact linear part (α_t/α_s)·x and the 0-th order term σ_t (e^h − 1) ε(x_s, s).
    lin = math.exp(la_t - la_s)
    c1 = sig_t * math.expm1(h)
    if order == 1:
        return lin * x - c1 * e_s
    if order == 2:
        r1 = 0.5
        s1 = _t_of_lambda(lam_s + r1 * h)
        la_1, sig_1, _ = _schedule_at(s1)
        u1 = math.exp(la_1 - la_s) * x - (sig_1 * math.expm1(r1 * h)) * e_s
        e_1 = eps(u1, s1)
        # First-order difference (ε(u1, s1) − ε(x, s)) / (r1 h) approximates dε/dλ.
        return lin * x - c1 * e_s - (c1 / (2.0 * r1)) * (e_1 - e_s)
    if order == 3:
        r1, r2 = 1.0 / 3.0, 2.0 / 3.0
        s1 = _t_of_lambda(lam_s + r1 * h)
        s2 = _t_of_lambda(lam_s + r2 * h)
        la_1, sig_1, _ = _schedule_at(s1)
        la_2, sig_2, _ = _schedule_at(s2)
        u1 = math.exp(la_1 - la_s) * x - (sig_1 * math.expm1(r1 * h)) * e_s
        d1 = eps(u1, s1) - e_s
        phi_22 = math.expm1(r2 * h) / (r2 * h) - 1.0
        u2 = (math.exp(la_2 - la_s) * x - (sig_2 * math.expm1(r2 * h)) * e_s
              - (sig_2 * r2 / r1 * phi_22) * d1)
        d2 = eps(u2, s2) - e_s
        phi_2 = math.expm1(h) / h - 1.0
        return lin * x - c1 * e_s - (sig_t / r2 * phi_2) * d2
    raise ValueError(f"solver order must be 1, 2 or 3, got {order}")


def _check_sampler_args(x_T, y, steps, variant, eps, guidance_scale, null_class, skip_type):
    if variant not in VARIANTS:
        raise ValueError(f"unknown sampler variant {variant!r}; use one of {VARIANTS}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer (network calls), got {steps!r}")
    if not 0.0 < eps < 1.0:
        raise ValueError(f"eps (final time) must lie in (0, 1), got {eps}; U-ViT uses 1e-4")
    if skip_type is not None and skip_type not in SKIP_TYPES:
        raise ValueError(f"unknown skip_type {skip_type!r}; use one of {SKIP_TYPES}")
    if variant == "fast" and skip_type not in (None, "logSNR"):
        raise ValueError("DPM-Solver-fast is defined on a logSNR-uniform grid; drop skip_type or use "
                         "variant='multistep'")
    if y is not None and (y.dim() != 1 or y.shape[0] != x_T.shape[0]):
        raise ValueError(f"y must be a 1-D label tensor of length {x_T.shape[0]} (the batch), "
                         f"got shape {tuple(y.shape)}")
    if guidance_scale < 0:
        raise ValueError(f"guidance_scale must be >= 0 (0 turns guidance off), got {guidance_scale}")
    if guidance_scale > 0 and (y is None or null_class is None):
        raise ValueError("classifier-free guidance needs labels y and the null_class index the model "
                         "was trained with for dropped labels; pass both or set guidance_scale=0")


@torch.no_grad()
def dpm_solver_sample(net, x_T, y=None, steps=50, variant="fast", eps=1e-4, guidance_scale=0.0,
                      null_class=None, skip_type=None):
    """Solve the diffusion ODE from t = 1 (``x_T`` ~ N(0, I)) to t = ``eps``; returns x₀ in the
    model's space, float32, not clamped.

    ``net(x, t·999, y)`` predicts ε. It is called exactly ``steps`` times (``2·steps`` with
    classifier-free guidance, see :func:`network_calls`), in the dtype of its parameters.

    - ``variant="fast"``: DPM-Solver-fast as U-ViT ran it: K = steps//3 + 1 segments, uniform in
      λ, of singlestep DPM-Solver-3 (…,3, then 2,1 / 1 / 2 by steps mod 3) in noise prediction.
    - ``variant="multistep"``: DPM-Solver++(2M) in data prediction on ``steps`` intervals, uniform
      in λ by default (``skip_type="time_uniform"`` for uniform t); first step first order, and
      the last one too when steps < 10 (the reference's ``lower_order_final``, for stability).
    - ``guidance_scale`` s > 0: ε = (1 + s)·ε(x, y) − s·ε(x, null_class), U-ViT's convention.
    """
    _check_sampler_args(x_T, y, steps, variant, eps, guidance_scale, null_class, skip_type)
    x = x_T.float()  # the solver's state lives in float32 whatever the network's dtype
    noise = _noise_model(net, y, guidance_scale, null_class, _net_dtype(net, x.dtype))

    if variant == "fast":
        return _fast_solve(noise, x, steps, eps)
    return _multistep_solve(noise, x, steps, eps, skip_type or "logSNR")


def _fast_solve(noise, x, steps, eps):
    """DPM-Solver-fast: singlestep segments of orders fast_orders(steps) on a logSNR-uniform grid."""
    orders = fast_orders(steps)
    ts = time_grid(len(orders), 1.0, eps, "logSNR")
    for i, order in enumerate(orders):
        x = _singlestep_update(noise, x, ts[i], ts[i + 1], order)
    return x


def _multistep_solve(noise, x, steps, eps, skip_type):
    """DPM-Solver++(2M): x_t = (σ_t/σ_s)·x_s − α_t (e^{−h} − 1)·D, with D the data prediction
    x̂₀ = (x − σ ε̂)/α at s, corrected by a backward difference with the previous x̂₀."""
    ts = time_grid(steps, 1.0, eps, skip_type)
    x0_prev, h_prev = None, None
    for i in range(steps):
        s, t = ts[i], ts[i + 1]
        la_s, sig_s, lam_s = _schedule_at(s)
        la_t, sig_t, lam_t = _schedule_at(t)
        h = lam_t - lam_s
        x0 = (x - sig_s * noise(x, s)) / math.exp(la_s)
        if x0_prev is None or (steps < 10 and i == steps - 1):
            d = x0
        else:
            r = h_prev / h
            d = (1.0 + 0.5 / r) * x0 - (0.5 / r) * x0_prev
        x = (sig_t / sig_s) * x - (math.exp(la_t) * math.expm1(-h)) * d
        x0_prev, h_prev = x0, h
    return x
