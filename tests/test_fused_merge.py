"""The fused engine against the host's LayerWiseMergedModel (via HostLayerWiseEngine) on the tiny CLIP suite."""

from pathlib import Path
from typing import List, Tuple

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel

from fusion_bench_statsmerging.fixtures.clip import build_tiny_clip_suite
from fusion_bench_statsmerging.engine.fused import FusedLayerWiseEngine, enable_activation_checkpointing
from fusion_bench_statsmerging.engine.spectra import krylov_top_eigenvalues, top_gram_eigenvalues
from fusion_bench_statsmerging.engine.merge import ArchitectureMismatchError, HostLayerWiseEngine
from fusion_bench_statsmerging.engine.stats import (
    DEFAULT_FEATURES as FEATURES, as_matrix, layer_wise_statistics, top_singular_values,
)

# bf16 task vectors: the merged weights' task-vector part is within this fraction of its fp32
# value (storage rounding + rounding of the weighted sum, each <= 2^-9 relative)...
BF16_DELTA_RTOL = 1e-2
# ...and the model's outputs within this relative error of the fp32 engine's.
BF16_OUTPUT_RTOL = 1e-3


@pytest.fixture(scope="module")
def suite(tmp_path_factory) -> Path:
    return build_tiny_clip_suite(tmp_path_factory.mktemp("fused_suite"))


def load(root: Path) -> Tuple[CLIPVisionModel, List[CLIPVisionModel]]:
    """Fresh copies every time: both engines consume the models they are given."""
    pretrained = CLIPVisionModel.from_pretrained(root / "pretrained")
    experts = [CLIPVisionModel.from_pretrained(d) for d in sorted((root / "experts").iterdir())]
    return pretrained, experts


def coefficients(engine, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(engine.num_models, len(engine.param_names), generator=gen)


def pixels(n: int = 6, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def engines(suite):
    return HostLayerWiseEngine(*load(suite)), FusedLayerWiseEngine(*load(suite))


def loss_of(engine, coef: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The same differentiable loss for either engine: CE of a fixed head on the pooled output."""
    engine.set_coefficients(coef)
    pooled = engine(pixel_values=x)[1]
    head = torch.randn(pooled.shape[-1], 4, generator=torch.Generator().manual_seed(2))
    return F.cross_entropy(pooled @ head, torch.arange(len(x)) % 4)


# --------------------------------------------------------------------------- (a)-(d)
def test_same_interface_and_layout(engines):
    host, fused = engines
    assert fused.param_names == host.param_names
    assert fused.num_models == host.num_models == 3
    tv_h, tv_f = host.task_vector(1), fused.task_vector(1)
    assert list(tv_f) == list(tv_h)
    for name in tv_h:
        torch.testing.assert_close(tv_f[name], tv_h[name], rtol=0, atol=1e-7)
    # one buffer per (numel, dtype) group, far fewer than tensors x experts
    assert len(fused.groups) < len(fused.param_names) / 4
    # the pretrained module's merged parameters are views of the group buffers (no second copy)
    base_ptrs = {fused.get_buffer(f"base_{i}").untyped_storage().data_ptr() for i in range(len(fused.groups))}
    assert all(fused.model.get_parameter(n).untyped_storage().data_ptr() in base_ptrs for n in fused.param_names)


def test_experts_are_released(suite):
    pretrained, experts = load(suite)
    engine = FusedLayerWiseEngine(pretrained, experts)
    for expert in experts:  # consumed: their merged tensors no longer hold memory
        assert all(expert.get_parameter(n).numel() == 0 for n in engine.param_names)


def test_merged_parameters_match_host(engines):
    host, fused = engines
    coef = coefficients(fused)
    host.set_coefficients(coef)
    ours = fused.merge(coef)
    for name in fused.param_names:
        torch.testing.assert_close(ours[name], host.wrapper._merged_state_dict[name], rtol=0, atol=1e-6)


def test_outputs_match_host(engines):
    host, fused = engines
    x = pixels()
    for seed in (0, 3):
        coef = coefficients(fused, seed)
        host.set_coefficients(coef)
        fused.set_coefficients(coef)
        out_h, out_f = host(pixel_values=x), fused(pixel_values=x)
        torch.testing.assert_close(out_f.last_hidden_state, out_h.last_hidden_state, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out_f.pooler_output, out_h.pooler_output, rtol=1e-5, atol=1e-5)


def test_gradients_match_host_and_are_nonzero(engines):
    host, fused = engines
    x = pixels()
    grads = []
    for engine in (host, fused):
        coef = coefficients(fused).requires_grad_(True)
        loss_of(engine, coef, x).backward()
        grads.append(coef.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)
    assert (grads[1] != 0).all(), "every (expert, tensor) coefficient should receive a gradient"


def test_gradients_reach_the_coefficient_producer(suite):
    """set_coefficients keeps the graph: a module producing the coefficients gets gradients."""
    fused = FusedLayerWiseEngine(*load(suite))
    producer = nn.Linear(1, len(fused.param_names))
    coef = torch.sigmoid(producer(torch.ones(fused.num_models, 1)))
    fused.set_coefficients(coef)
    fused(pixel_values=pixels())[1].square().sum().backward()
    assert producer.weight.grad is not None and producer.weight.grad.abs().sum() > 0


def test_merge_and_unload_matches_host(suite):
    host, fused = HostLayerWiseEngine(*load(suite)), FusedLayerWiseEngine(*load(suite))
    coef = coefficients(fused, 5)
    expected = host.merge_and_unload(coef).state_dict()
    engine_out = fused.set_coefficients(coef) or fused(pixel_values=pixels())[1]
    model = fused.merge_and_unload(coef)
    assert type(model) is CLIPVisionModel
    state = model.state_dict()
    assert state.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=1e-6)
    # plain tensors: own storage each (safe for save_pretrained), no gradients
    ptrs = [p.untyped_storage().data_ptr() for p in model.parameters()]
    assert len(set(ptrs)) == len(ptrs)
    assert not any(p.requires_grad for p in model.parameters())
    torch.testing.assert_close(model(pixel_values=pixels())[1], engine_out, rtol=1e-5, atol=1e-5)
    # the engine still merges from the pretrained weights afterwards
    fused.set_coefficients(torch.zeros_like(coef))
    pretrained, _ = load(suite)
    torch.testing.assert_close(fused(pixel_values=pixels())[1], pretrained(pixel_values=pixels())[1])


def test_strict_mode_and_moving_the_engine(suite):
    fused = FusedLayerWiseEngine(*load(suite), strict=True)
    coef = coefficients(fused)
    fused.set_coefficients(coef)
    out = fused(pixel_values=pixels())[1]
    reference = FusedLayerWiseEngine(*load(suite))
    reference.set_coefficients(coef)
    torch.testing.assert_close(out, reference(pixel_values=pixels())[1])
    # _apply (here a dtype change) re-links the parameters to the moved buffers and re-merges
    fused.double()
    assert fused.model.get_parameter(fused.param_names[0]).dtype == torch.float64
    assert fused.model.get_parameter(fused.param_names[0]).untyped_storage().data_ptr() == \
        fused.get_buffer("base_0").untyped_storage().data_ptr()
    torch.testing.assert_close(fused(pixel_values=pixels().double())[1].float(), out, rtol=1e-4, atol=1e-5)


def test_tied_weights_follow_the_merge():
    """tie_weights=True: an alias of a merged tensor sees the merged value (also under strict)."""

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = self.a  # alias: one parameter, two names

        def forward(self, x):
            return self.b(self.a(x))

    torch.manual_seed(0)
    pre = Tied()
    experts = [Tied() for _ in range(2)]
    for e in experts:
        e.load_state_dict({k: v + 0.1 * torch.randn_like(v) for k, v in pre.state_dict().items()})
    plain = Tied()
    coef = torch.tensor([[0.3, 0.5], [0.7, 0.2]])
    x = torch.randn(3, 4)
    with torch.no_grad():
        for i, name in enumerate(["a.weight", "a.bias"]):
            merged = pre.get_parameter(name) + sum(
                coef[k, i] * (experts[k].get_parameter(name) - pre.get_parameter(name)) for k in range(2))
            plain.get_parameter(name).copy_(merged)
    for strict in (False, True):
        p2, e2 = Tied(), [Tied(), Tied()]
        p2.load_state_dict(pre.state_dict())
        for dst, src in zip(e2, experts):
            dst.load_state_dict(src.state_dict())
        engine = FusedLayerWiseEngine(p2, e2, tie_weights=True, strict=strict)
        engine.set_coefficients(coef)
        torch.testing.assert_close(engine(x), plain(x))


@pytest.mark.parametrize("fraction,strict", [(1.0, False), (0.5, True)])
def test_activation_checkpointing_recomputes_with_merged_weights(suite, fraction, strict):
    x = pixels()
    grads = []
    for checkpointing in (False, True):
        fused = FusedLayerWiseEngine(*load(suite), strict=strict).train()
        if checkpointing:
            assert enable_activation_checkpointing(fused, fraction) == round(2 * fraction)  # 2 layers
        coef = coefficients(fused).requires_grad_(True)
        loss_of(fused, coef, x).backward()
        grads.append(coef.grad)
        # recomputation restored the module's own tensors
        assert fused.model.get_parameter(fused.param_names[0]).untyped_storage().data_ptr() == \
            fused.get_buffer("base_0").untyped_storage().data_ptr()
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)


def test_checkpointing_without_the_recompute_context_fails(suite):
    """Why recompute_context exists: plain recomputation runs with the pretrained tensors."""
    from torch.utils.checkpoint import CheckpointError

    fused = FusedLayerWiseEngine(*load(suite)).train()
    fused.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    coef = coefficients(fused).requires_grad_(True)
    with pytest.raises(CheckpointError):
        loss_of(fused, coef, pixels()).backward()


# --------------------------------------------------------------------------- (e) statistics
def test_grouped_statistics_match_reference(engines):
    host, fused = engines
    task_vectors = [host.task_vector(k) for k in range(3)]
    for features, rank in ((list(FEATURES), 3), (["singular_values", "mean"], 5)):
        reference = layer_wise_statistics(task_vectors, features, rank)
        torch.testing.assert_close(fused.layer_wise_statistics(features, rank), reference, rtol=1e-4, atol=1e-7)
    # the method the algorithms look up (pool_statistics) is the same computation
    torch.testing.assert_close(fused.layer_wise_statistics(["singular_values", "mean"], 5), reference,
                               rtol=1e-4, atol=1e-7)


class Wide(nn.Module):
    """Big enough matrices (min side > 128) to take the Krylov path of the spectra."""

    def __init__(self):
        super().__init__()
        self.up = nn.Linear(160, 400)
        self.down = nn.Linear(400, 160)
        self.norm = nn.LayerNorm(160)

    def forward(self, x):
        return self.norm(self.down(self.up(x)))


def perturbed(pre: nn.Module, seed: int, low_rank: bool) -> nn.Module:
    """pretrained + a low-rank-plus-noise (like real task vectors) or pure-noise update."""
    gen = torch.Generator().manual_seed(seed)
    model = Wide()
    state = {}
    for name, value in pre.state_dict().items():
        if value.dim() == 2 and low_rank:
            u = torch.randn(value.shape[0], 6, generator=gen)
            v = torch.randn(6, value.shape[1], generator=gen)
            delta = (u * torch.tensor([3.0, 2.0, 1.5, 1.0, 0.7, 0.5])) @ v / value.shape[1]
            delta = delta + 1e-3 * torch.randn(value.shape, generator=gen)
        else:
            delta = 1e-2 * torch.randn(value.shape, generator=gen)
        state[name] = value + delta
    model.load_state_dict(state)
    return model


@pytest.mark.parametrize("low_rank", [True, False], ids=["low_rank", "noise"])
def test_grouped_statistics_match_on_the_krylov_path(low_rank):
    torch.manual_seed(0)
    pre = Wide()
    experts = [perturbed(pre, s, low_rank) for s in range(3)]
    reference = layer_wise_statistics(
        [{n: p.detach() - pre.get_parameter(n).detach() for n, p in e.named_parameters()} for e in experts],
        list(FEATURES), 3)
    fused = FusedLayerWiseEngine(pre, experts)
    torch.testing.assert_close(fused.layer_wise_statistics(list(FEATURES), 3), reference, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("shape", [(50,), (64, 64), (300, 20), (20, 300), (1, 77), (8, 3, 4, 4), (200, 600)])
def test_top_singular_values_match_svdvals(shape):
    t = torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))
    m = as_matrix(t)
    reference = torch.linalg.svdvals(m.double())[:4]
    ours = top_singular_values(m, 4)
    torch.testing.assert_close(ours[: len(reference)].double(), reference, rtol=1e-4, atol=0)
    assert (ours[len(reference):] == 0).all()  # zero padding past min(m, n)
    gram = (m @ m.T if m.shape[0] <= m.shape[1] else m.T @ m).double()[None]
    fast = top_gram_eigenvalues(gram, 4)[0].sqrt()
    torch.testing.assert_close(fast[: len(reference)], reference, rtol=1e-4, atol=0)


def test_krylov_converges_on_decaying_spectra_and_flags_the_rest():
    gen = torch.Generator().manual_seed(0)
    u = torch.linalg.qr(torch.randn(300, 300, generator=gen, dtype=torch.float64))[0]
    decaying = (u * torch.logspace(0, -6, 300, dtype=torch.float64)) @ u.T
    noise = torch.randn(300, 900, generator=gen, dtype=torch.float64)
    flat = noise @ noise.T / 900  # Marchenko-Pastur: top eigenvalues clustered, slow for Krylov
    values, ok = krylov_top_eigenvalues(torch.stack([decaying, flat]), 3)
    exact = torch.linalg.eigvalsh(torch.stack([decaying, flat])).flip(-1)[:, :3]
    assert bool(ok[0])
    torch.testing.assert_close(values[0], exact[0], rtol=1e-8, atol=0)
    if bool(ok[1]):  # if it did claim convergence, it must be right
        torch.testing.assert_close(values[1], exact[1], rtol=1e-6, atol=0)
    torch.testing.assert_close(top_gram_eigenvalues(torch.stack([decaying, flat]), 3), exact, rtol=1e-8, atol=0)


# --------------------------------------------------------------------------- (f) bf16 storage
def test_bf16_task_vectors_stay_close_to_fp32(suite):
    fp32 = FusedLayerWiseEngine(*load(suite))
    bf16 = FusedLayerWiseEngine(*load(suite), task_vector_dtype=torch.bfloat16)
    assert bf16.get_buffer("tv_0").dtype == torch.bfloat16 and bf16.get_buffer("base_0").dtype == torch.float32
    coef = coefficients(fp32)
    exact, approx = fp32.merge(coef), bf16.merge(coef)
    pretrained = fp32.pretrained_tensors()
    for name in fp32.param_names:
        assert approx[name].dtype == torch.float32
        delta = exact[name] - pretrained[name]
        err = (approx[name] - exact[name]).abs().max()
        assert err <= BF16_DELTA_RTOL * delta.abs().max() + 1e-7, name
    x = pixels()
    fp32.set_coefficients(coef)
    bf16.set_coefficients(coef)
    out32, out16 = fp32(pixel_values=x)[1], bf16(pixel_values=x)[1]
    assert ((out16 - out32).norm() / out32.norm()) < BF16_OUTPUT_RTOL
    # gradients flow (through the hi part of the coefficients) and agree closely
    g = []
    for engine in (fp32, bf16):
        c = coef.clone().requires_grad_(True)
        loss_of(engine, c, x).backward()
        g.append(c.grad)
    assert ((g[1] - g[0]).norm() / g[0].norm()) < 2e-2


@pytest.mark.parametrize("base_dtype", [torch.float32, torch.float16])
def test_low_precision_weighted_sum_gradient(base_dtype):
    """The custom backward: d/dcoef of base + coef @ tv, computed by one GEMM in the storage dtype."""
    from fusion_bench_statsmerging.engine.fused import weighted_sum

    gen = torch.Generator().manual_seed(0)
    tv = torch.randn(3, 4, 50, generator=gen).to(torch.bfloat16)
    base = torch.randn(3, 50, generator=gen).to(base_dtype)
    coef = torch.rand(3, 1, 4, generator=gen, requires_grad=True)
    grad_out = torch.randn(3, 50, generator=gen)
    out = weighted_sum(base, coef, tv)
    assert out.dtype == base_dtype
    (out.float() * grad_out).sum().backward()
    exact = torch.einsum("ns,nks->nk", grad_out, tv.float()).unsqueeze(1)
    torch.testing.assert_close(coef.grad, exact, rtol=2e-2, atol=2e-2)
    reference = base.float() + (coef.detach() @ tv.float()).squeeze(1)
    torch.testing.assert_close(out.float(), reference, rtol=1e-2, atol=1e-2)


def test_bf16_coefficients_are_not_rounded():
    """hi + lo coefficients: with bf16-exact task vectors, the merge is exact up to output rounding."""
    base = torch.zeros(1, 4)
    tv = torch.ones(1, 2, 4, dtype=torch.bfloat16)
    coef = torch.tensor([[[0.3001, 0.0]]])  # not representable in bf16 (0.30078 is the nearest)
    from fusion_bench_statsmerging.engine.fused import weighted_sum

    merged = weighted_sum(base, coef, tv)
    assert (merged - 0.3001).abs().max() < 1e-5


# --------------------------------------------------------------------------- (g) errors
def test_mismatched_architecture_raises(suite):
    config = CLIPVisionConfig.from_pretrained(suite / "pretrained")
    config.intermediate_size = 48  # every MLP matrix has another shape
    for engine_cls in (FusedLayerWiseEngine, HostLayerWiseEngine):
        pretrained, experts = load(suite)
        experts[1] = CLIPVisionModel(config)
        with pytest.raises(ArchitectureMismatchError, match=r"Expert #1 .*shape"):
            engine_cls(pretrained, experts)


def test_bad_coefficients_and_dtype_are_rejected(suite):
    fused = FusedLayerWiseEngine(*load(suite))
    with pytest.raises(ValueError, match="shape"):
        fused.set_coefficients(torch.zeros(2, len(fused.param_names)))
    with pytest.raises(ValueError, match="task_vector_dtype"):
        FusedLayerWiseEngine(*load(suite), task_vector_dtype="int8")
