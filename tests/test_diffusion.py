"""VP-SDE schedule, training loss and DPM-Solver samplers.

The samplers are checked on data whose exact noise prediction is known in closed form: a Gaussian
N(μ, Σ), where ε*(x, t) = σ_t (α_t² Σ + σ_t² I)⁻¹ (x − α_t μ), and a mixture of two Gaussians, where
ε* is the responsibility-weighted sum of the components' terms. An exact ε leaves only the solver's
own error, which is what is being tested.
"""
import math

import pytest
import torch

from diffdistill.diffusion import (TIME_SCALE, alpha_sigma, dpm_solver_sample, fast_orders, inverse_lambda,
                                   lambda_t, log_alpha, network_calls, time_grid, training_loss)

F64 = torch.float64


# ---------------------------------------------------------------- schedule
def test_schedule_identities():
    t = torch.linspace(1e-5, 1.0, 1001, dtype=F64)
    alpha, sigma = alpha_sigma(t)
    assert torch.allclose(alpha ** 2 + sigma ** 2, torch.ones_like(t), atol=1e-12)
    # ᾱ(t) = exp(−(0.1 t + 9.95 t²)), the linear β schedule from 0.1 to 20.
    assert torch.allclose(alpha ** 2, torch.exp(-(0.1 * t + 9.95 * t ** 2)), rtol=1e-12)
    assert torch.allclose(lambda_t(t), torch.log(alpha / sigma), rtol=1e-10)
    assert (lambda_t(t).diff() < 0).all()  # λ decreases monotonically, so it has an inverse
    assert torch.allclose(inverse_lambda(lambda_t(t)), t, rtol=1e-9, atol=1e-12)
    lam = torch.linspace(-6, 8, 57, dtype=F64)
    assert torch.allclose(lambda_t(inverse_lambda(lam)), lam, atol=1e-9)
    # Endpoints used by the sampler: t = 1 is almost pure noise, t = 1e-4 almost clean.
    assert float(log_alpha(torch.tensor(1.0))) == pytest.approx(-5.025)
    assert float(alpha_sigma(torch.tensor(1e-4, dtype=F64))[1]) == pytest.approx(math.sqrt(-math.expm1(-(0.1e-4 + 9.95e-8))), rel=1e-9)


def test_time_grid():
    ts = time_grid(17, 1.0, 1e-4, "logSNR")
    assert len(ts) == 18 and ts[0] == 1.0 and ts[-1] == 1e-4
    lams = lambda_t(torch.tensor(ts, dtype=F64))
    steps = lams.diff()
    assert torch.allclose(steps, steps.mean().expand(17), rtol=1e-9)  # uniform in logSNR
    tu = time_grid(4, 1.0, 0.2, "time_uniform")
    assert tu == pytest.approx([1.0, 0.8, 0.6, 0.4, 0.2])


@pytest.mark.parametrize("steps,orders", [(50, [3] * 16 + [2]), (20, [3] * 6 + [2]), (10, [3] * 3 + [1]),
                                          (9, [3, 3, 2, 1]), (3, [2, 1]), (2, [2]), (1, [1])])
def test_fast_orders(steps, orders):
    assert fast_orders(steps) == orders and sum(orders) == steps
    assert len(orders) == steps // 3 + 1


# ---------------------------------------------------------------- training loss
def exact_noise_net(x0):
    """A 'network' that recovers the true noise from x_t, knowing x0: ε = (x_t − α x0)/σ."""
    def net(xt, t_scaled, y):
        alpha, sigma = alpha_sigma(t_scaled / TIME_SCALE)
        shape = (-1,) + (1,) * (xt.dim() - 1)
        return (xt - alpha.view(shape) * x0) / sigma.view(shape)
    return net


def test_training_loss_zero_for_true_noise():
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(8, 3, 4, 4, generator=g, dtype=F64) * 2 - 1
    loss = training_loss(exact_noise_net(x0), x0, generator=g)
    assert loss.dim() == 0 and float(loss) < 1e-20
    zero = training_loss(lambda xt, t, y: torch.zeros_like(xt), x0, generator=g)
    assert 0.5 < float(zero) < 2.0  # a net predicting 0 pays E[ε²] = 1


def test_training_loss_given_draws_and_labels():
    x0 = torch.randn(4, 1, 2, 2)
    t = torch.tensor([0.1, 0.5, 0.9, 1e-3])
    noise = torch.randn_like(x0)
    seen = {}

    def net(xt, t_scaled, y):
        seen.update(xt=xt, t=t_scaled, y=y)
        return torch.zeros_like(xt)

    y = torch.tensor([1, 2, 3, 0])
    loss = training_loss(net, x0, y=y, t=t, noise=noise)
    alpha, sigma = alpha_sigma(t)
    assert torch.allclose(seen["xt"], alpha.view(-1, 1, 1, 1) * x0 + sigma.view(-1, 1, 1, 1) * noise)
    assert torch.allclose(seen["t"], t * 999) and seen["y"] is y
    assert torch.allclose(loss, noise.pow(2).mean())


def test_training_loss_deterministic_for_a_generator():
    x0 = torch.randn(4, 1, 2, 2)
    net = lambda xt, t, y: 0.5 * xt  # noqa: E731
    a = training_loss(net, x0, generator=torch.Generator().manual_seed(3))
    b = training_loss(net, x0, generator=torch.Generator().manual_seed(3))
    c = training_loss(net, x0, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


# ---------------------------------------------------------------- closed-form data
MU = torch.tensor([0.5, -1.0, 2.0], dtype=F64)
_A = torch.tensor([[1.0, 0.3, 0.0], [0.0, 0.5, 0.2], [0.1, 0.0, 0.2]], dtype=F64)
SIGMA = _A @ _A.T + 0.01 * torch.eye(3, dtype=F64)  # eigenvalues ≈ 0.048, 0.27, 1.14


def gaussian_marginal(t, mu=MU, cov=SIGMA):
    alpha, sigma = alpha_sigma(torch.tensor(t, dtype=F64))
    return alpha * mu, alpha ** 2 * cov + sigma ** 2 * torch.eye(len(mu), dtype=F64)


class Counting:
    """Wraps a closed-form ε so calls, times and labels can be checked."""

    def __init__(self, fn):
        self.fn, self.calls, self.times, self.labels = fn, 0, [], []

    def __call__(self, x, t_scaled, y):
        self.calls += 1
        self.times.append(float(t_scaled[0]))
        self.labels.append(y)
        assert torch.all(t_scaled == t_scaled[0])
        return self.fn(x, t_scaled, y)


def gaussian_eps(x, t_scaled, y=None, mu=MU, cov=SIGMA):
    t = float(t_scaled[0]) / TIME_SCALE
    alpha, sigma = alpha_sigma(torch.tensor(t, dtype=F64))
    mean, c = gaussian_marginal(t, mu, cov)
    return (sigma * torch.linalg.solve(c, (x.double() - mean).T).T).to(x.dtype)


def whitened_start(n, seed=0):
    """x_T with EXACTLY the mean and covariance of the true marginal at t = 1 (not N(0, I): α_1 ≈ 0.0066
    would otherwise shift the result by ≈ 0.01·μ, a start-up error and not the solver's).

    ε* is affine in x for Gaussian data, so every solver step, and the whole sampler, is an affine map
    of x_T; the sample mean and covariance of the output are then exactly the map applied to those of
    x_T. Whitening x_T removes all sampling error: what remains is the solver's discretisation error."""
    z = torch.randn(n, 3, generator=torch.Generator().manual_seed(seed), dtype=F64)
    z = z - z.mean(0)
    chol = torch.linalg.cholesky(z.T @ z / (n - 1))
    z = torch.linalg.solve_triangular(chol, z.T, upper=False).T
    mean, cov = gaussian_marginal(1.0)
    return (mean + z @ torch.linalg.cholesky(cov).T).float()


def covariance_error(x, cov):
    """Largest covariance error relative to the target's scale sqrt(Σ_ii Σ_jj)."""
    scale = torch.sqrt(torch.outer(cov.diagonal(), cov.diagonal()))
    return float(((torch.cov(x.double().T) - cov) / scale).abs().max())


@pytest.fixture(scope="module")
def gaussian_runs():
    x_T = whitened_start(4000)
    target_mean, target_cov = gaussian_marginal(1e-4)  # the marginal at t = eps = 1e-4 (≈ N(μ, Σ))
    out = {}
    for variant, steps in [("fast", 50), ("fast", 20), ("multistep", 50), ("multistep", 20)]:
        net = Counting(gaussian_eps)
        x = dpm_solver_sample(net, x_T, steps=steps, variant=variant)
        out[variant, steps] = dict(
            calls=net.calls, x=x, mean_err=float((x.double().mean(0) - target_mean).abs().max()),
            cov_err=covariance_error(x, target_cov))
    return out


@pytest.mark.parametrize("variant,cov_tol", [("fast", 3e-3), ("multistep", 2e-2)])
def test_gaussian_moments_at_50_calls(gaussian_runs, variant, cov_tol):
    # No sampling error (see whitened_start): only float32 round-off in the mean; the covariance
    # carries the discretisation error, measured ≈ 1e-3 (fast, 3rd order) and ≈ 6e-3 (2M) relative.
    r = gaussian_runs[variant, 50]
    assert r["calls"] == 50
    assert r["mean_err"] < 1e-5
    assert r["cov_err"] < cov_tol


def exact_gaussian_flow(x_s, s, t):
    """The probability-flow ODE's exact solution for Gaussian data: every marginal covariance
    C_t = α_t² Σ + σ_t² I shares Σ's eigenvectors, and x_t − α_t μ = C_t^½ C_s^−½ (x_s − α_s μ)."""
    evals, vecs = torch.linalg.eigh(SIGMA)

    def var(u):
        alpha, sigma = alpha_sigma(torch.tensor(u, dtype=F64))
        return alpha ** 2 * evals + sigma ** 2

    flow = vecs @ torch.diag(torch.sqrt(var(t) / var(s))) @ vecs.T
    return gaussian_marginal(t)[0] + (x_s - gaussian_marginal(s)[0]) @ flow.T


@pytest.mark.parametrize("order", [1, 2, 3])
def test_singlestep_local_error_order(order):
    # One DPM-Solver-k step of size h in λ has local error O(h^(k+1)): halving h divides it by
    # 2^(k+1) (measured 2^2.2, 2^3.3, 2^4.6). Float64 so round-off stays far below the errors.
    from diffdistill.diffusion import _singlestep_update

    def eps(x, t):
        return gaussian_eps(x, torch.full((x.shape[0],), t * TIME_SCALE, dtype=F64))

    s = 0.5
    x_s = gaussian_marginal(s)[0] + torch.randn(64, 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    lam_s = float(lambda_t(torch.tensor(s, dtype=F64)))
    errors = []
    for h in (0.4, 0.2):
        t = float(inverse_lambda(torch.tensor(lam_s + h, dtype=F64)))
        errors.append(float((_singlestep_update(eps, x_s, s, t, order) - exact_gaussian_flow(x_s, s, t)).abs().max()))
    assert math.log2(errors[0] / errors[1]) > order + 0.6


@pytest.mark.parametrize("variant,min_order", [("fast", 2.5), ("multistep", 1.5)])
def test_convergence_order(gaussian_runs, variant, min_order):
    # Going from 20 to 50 calls shrinks a p-th order solver's error by about 2.5^p: DPM-Solver-fast is
    # third order (measured ≈ 3.2), DPM-Solver++(2M) second order (≈ 1.9). A wrong coefficient in a
    # higher-order update would drop the order and fail here.
    ratio = gaussian_runs[variant, 20]["cov_err"] / gaussian_runs[variant, 50]["cov_err"]
    assert math.log(ratio) / math.log(2.5) > min_order


def test_gaussian_with_plain_noise_within_sampling_error():
    # The usual use: x_T a plain draw. With n = 20,000, a mean has standard error sqrt(Σ_ii / n) and a
    # covariance entry sqrt(Var[(x_i − m_i)(x_j − m_j)] / n), both estimated from the samples; the
    # sampler must land within 4.5 standard errors (a 1-in-150,000 chance per statistic for a correct
    # sampler). x_T ~ N(0, I) also adds the start-up error α_1·μ-ish (≈ 0.01), well within tolerance.
    n = 20_000
    x_T = torch.randn(n, 3, generator=torch.Generator().manual_seed(1))
    x = dpm_solver_sample(gaussian_eps, x_T, steps=50, variant="fast").double()
    assert_moments_within(x, MU, SIGMA, z=4.5)


def assert_moments_within(x, mean, cov, z):
    n = x.shape[0]
    m = x.mean(0)
    se_mean = x.std(0) / math.sqrt(n)
    assert ((m - mean).abs() < z * se_mean).all(), ((m - mean) / se_mean)
    xc = x - m
    prods = xc[:, :, None] * xc[:, None, :]
    se_cov = prods.std(0) / math.sqrt(n)
    assert ((torch.cov(x.T) - cov).abs() < z * se_cov).all(), ((torch.cov(x.T) - cov) / se_cov)


# Mixture of two 2-D Gaussians, weights 0.3 / 0.7.
MIX_W = torch.tensor([0.3, 0.7], dtype=F64)
MIX_MU = torch.tensor([[-1.5, 0.5], [1.0, -0.5]], dtype=F64)
MIX_COV = torch.stack([torch.tensor([[0.10, 0.03], [0.03, 0.05]], dtype=F64),
                       torch.tensor([[0.20, -0.05], [-0.05, 0.10]], dtype=F64)])


def mixture_components(t):
    alpha, sigma = alpha_sigma(torch.as_tensor(t, dtype=F64))
    return alpha * MIX_MU, alpha ** 2 * MIX_COV + sigma ** 2 * torch.eye(2, dtype=F64)


def mixture_eps(x, t_scaled, y=None):
    """ε* = σ Σ_k γ_k(x) C_k⁻¹ (x − α μ_k), γ_k the posterior responsibility of component k at t."""
    t = float(t_scaled[0]) / TIME_SCALE
    alpha, sigma = alpha_sigma(torch.tensor(t, dtype=F64))
    means, covs = mixture_components(t)
    diff = x.double()[:, None, :] - means[None]
    sol = torch.einsum("kij,nkj->nki", torch.linalg.inv(covs), diff)
    logp = torch.log(MIX_W) - 0.5 * (diff * sol).sum(-1) - 0.5 * torch.logdet(covs)
    resp = torch.softmax(logp, -1)
    return (sigma * (resp[..., None] * sol).sum(1)).to(x.dtype)


@pytest.mark.parametrize("variant", ["fast", "multistep"])
def test_mixture_within_sampling_error(variant):
    n = 20_000
    g = torch.Generator().manual_seed(2)
    # x_T drawn from the exact mixture marginal at t = 1.
    means, covs = mixture_components(1.0)
    k = (torch.rand(n, generator=g, dtype=F64) < MIX_W[1]).long()
    z = torch.randn(n, 2, generator=g, dtype=F64)
    x_T = means[k] + torch.einsum("nij,nj->ni", torch.linalg.cholesky(covs)[k], z)
    x = dpm_solver_sample(mixture_eps, x_T.float(), steps=50, variant=variant).double()

    means0, covs0 = mixture_components(1e-4)
    mean = MIX_W @ means0
    second = (MIX_W[:, None, None] * (covs0 + torch.einsum("ki,kj->kij", means0, means0))).sum(0)
    assert_moments_within(x, mean, second - torch.outer(mean, mean), z=4.5)
    # The modes keep their weights: the share right of the gap at x = −0.25 is a binomial proportion.
    share = float((x[:, 0] > -0.25).double().mean())
    assert abs(share - 0.7) < 4.5 * math.sqrt(0.7 * 0.3 / n)


# ---------------------------------------------------------------- calls, times, determinism
@pytest.mark.parametrize("variant,steps", [("fast", 50), ("fast", 20), ("fast", 10), ("fast", 9),
                                           ("multistep", 50), ("multistep", 7)])
def test_network_called_exactly_steps_times(variant, steps):
    net = Counting(gaussian_eps)
    dpm_solver_sample(net, torch.randn(5, 3), steps=steps, variant=variant)
    assert net.calls == steps == network_calls(steps)
    assert net.times[0] == pytest.approx(999.0)  # the first call is at t = 1
    assert min(net.times) > 0


def test_fast_evaluates_at_thirds_of_each_logsnr_segment():
    net = Counting(gaussian_eps)
    dpm_solver_sample(net, torch.randn(2, 3), steps=50, variant="fast", eps=1e-4)
    ts = time_grid(17, 1.0, 1e-4)
    lam = lambda_t(torch.tensor(ts, dtype=F64))
    h = float(lam[1] - lam[0])
    expected = []
    for i in range(16):  # 16 third-order segments: s, then λ_s + h/3, λ_s + 2h/3
        expected += [float(lam[i]), float(lam[i]) + h / 3, float(lam[i]) + 2 * h / 3]
    expected += [float(lam[16]), float(lam[16]) + h / 2]  # the final second-order segment, r1 = 1/2
    got = lambda_t(torch.tensor(net.times, dtype=F64) / TIME_SCALE)
    assert torch.allclose(got, torch.tensor(expected, dtype=F64), atol=1e-6)


def test_multistep_time_uniform_grid():
    net = Counting(gaussian_eps)
    dpm_solver_sample(net, torch.randn(2, 3), steps=10, variant="multistep", skip_type="time_uniform")
    expected = [999.0 * t for t in time_grid(10, 1.0, 1e-4, "time_uniform")[:-1]]
    assert net.times == pytest.approx(expected)


@pytest.mark.parametrize("variant", ["fast", "multistep"])
def test_deterministic_and_input_untouched(variant):
    x_T = torch.randn(6, 2, generator=torch.Generator().manual_seed(5))
    keep = x_T.clone()
    a = dpm_solver_sample(mixture_eps, x_T, steps=12, variant=variant)
    b = dpm_solver_sample(mixture_eps, x_T, steps=12, variant=variant)
    assert torch.equal(a, b) and torch.equal(x_T, keep)
    assert a.dtype == torch.float32 and not a.requires_grad


def test_runs_without_grad_and_in_network_dtype():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones((), dtype=torch.bfloat16))
            self.seen = set()

        def forward(self, x, t, y):
            self.seen.add((x.dtype, torch.is_grad_enabled()))
            return x * self.scale

    net = Net()
    out = dpm_solver_sample(net, torch.randn(2, 3, 4, 4), steps=6)
    assert net.seen == {(torch.bfloat16, False)}  # the net gets its own dtype, no autograd graph
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    x_T = torch.randn(64, 3, generator=torch.Generator().manual_seed(0))

    def net(x, t, y):
        return gaussian_eps(x.cpu(), t.cpu()).to(x.device)

    cpu = dpm_solver_sample(net, x_T, steps=20)
    gpu = dpm_solver_sample(net, x_T.cuda(), steps=20)
    assert gpu.is_cuda and torch.allclose(gpu.cpu(), cpu, atol=1e-5)


# ---------------------------------------------------------------- classifier-free guidance
def label_net(x, t_scaled, y):
    # A label-dependent ε: the Gaussian's, offset by 0.1 per label index.
    return gaussian_eps(x, t_scaled) + 0.1 * y[:, None].to(x.dtype)


@pytest.mark.parametrize("variant", ["fast", "multistep"])
def test_guidance_combines_conditional_and_null(variant):
    y = torch.tensor([0, 1, 2, 1])
    x_T = torch.randn(4, 3, generator=torch.Generator().manual_seed(7))
    s, null = 1.5, 3
    net = Counting(label_net)
    guided = dpm_solver_sample(net, x_T, y=y, steps=10, variant=variant, guidance_scale=s, null_class=null)
    assert net.calls == network_calls(10, s) == 20  # conditional and null call at every evaluation
    assert all(torch.equal(lab, y) for lab in net.labels[0::2])
    assert all(torch.equal(lab, torch.full_like(y, null)) for lab in net.labels[1::2])

    def combined(x, t, yy):  # the guided ε written out: (1 + s)·ε(x, y) − s·ε(x, ∅)
        return (1 + s) * label_net(x, t, yy) - s * label_net(x, t, torch.full_like(yy, null))

    reference = dpm_solver_sample(combined, x_T, y=y, steps=10, variant=variant)
    assert torch.allclose(guided, reference, atol=1e-6)
    unguided = dpm_solver_sample(label_net, x_T, y=y, steps=10, variant=variant)
    assert not torch.allclose(guided, unguided, atol=1e-3)


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize("kwargs,match", [
    (dict(variant="ddim"), "unknown sampler variant"),
    (dict(steps=0), "positive integer"),
    (dict(steps=2.5), "positive integer"),
    (dict(eps=0.0), "eps"),
    (dict(guidance_scale=1.0), "null_class"),
    (dict(guidance_scale=-1.0), "guidance_scale"),
    (dict(skip_type="time_uniform"), "logSNR-uniform"),
    (dict(variant="multistep", skip_type="quadratic"), "skip_type"),
    (dict(y=torch.zeros(3, dtype=torch.long)), "length 2"),
])
def test_bad_arguments(kwargs, match):
    net = Counting(gaussian_eps)
    with pytest.raises(ValueError, match=match):
        dpm_solver_sample(net, torch.randn(2, 3), **kwargs)
    assert net.calls == 0
