"""SAMerging: free coefficients, KL distillation, and a SAM whose second pass re-merges.

The reference gradients here do not go through any engine: the merged weights
pretrained + sum_k lambda_k^l tau_k^l are built by hand from the checkpoints on disk and
evaluated with ``torch.func.functional_call``.
"""

import json

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from torch.func import functional_call
from transformers import CLIPVisionModel

from conftest import REPO_ROOT
from test_cli import _env, _run
from test_training import LabelTrap
from fusion_bench_statsmerging.engine.distillation import distillation_loss
from fusion_bench_statsmerging.engine.engines import build_engine
from fusion_bench_statsmerging.method.samerging import CLIPSAMergingAlgorithm, FreeCoefficients
from fusion_bench_statsmerging.engine.sam import SAM, OutputPerturbation, perturbation
from fusion_bench_statsmerging.modelpool.clip_suite import CLIPSuiteModelPool
from fusion_bench_statsmerging.engine.trainer import Trainer

RHO = 0.07
IMAGES_PER_TASK = 4


def _algorithm(tmp_path, **overrides):
    config = dict(num_batches_per_task=2, epochs=1, batch_size=8, merge_engine="host",
                  artifact_dir=str(tmp_path / "artifacts"), log_every=1)
    config.update(overrides)
    algorithm = CLIPSAMergingAlgorithm(**config)
    algorithm.fabric = L.Fabric(accelerator="cpu", devices=1)
    return algorithm


class Rig:
    """Task heads, one fixed batch with teacher-like targets, engines, and the hand-built reference."""

    def __init__(self, suite_dir, tmp_path):
        self.suite_dir = suite_dir
        self.pool = CLIPSuiteModelPool(suite_dir=str(suite_dir))
        self.tasks = list(self.pool.model_names)
        self.algorithm = _algorithm(tmp_path)
        self.algorithm.modelpool = self.pool
        self.algorithm.setup_task_heads(self.tasks)
        gen = torch.Generator().manual_seed(0)
        self.batch = {}
        for task in self.tasks:
            pixels = self.algorithm.fit_inputs(self.pool.load_train_dataset(task), list(range(IMAGES_PER_TASK)))
            num_classes = self.algorithm.zeroshot_weights[task].shape[0]
            self.batch[task] = (pixels, 3 * torch.randn(IMAGES_PER_TASK, num_classes, generator=gen))
        self.pretrained = self._load("pretrained")
        pre = dict(self.pretrained.named_parameters())
        experts = [dict(self._load("experts", t).named_parameters()) for t in self.tasks]
        self.names = [n for n, p in self.pretrained.named_parameters() if p.requires_grad]
        self.base = {n: pre[n].detach() for n in self.names}
        self.task_vectors = [{n: (e[n] - pre[n]).detach() for n in self.names} for e in experts]

    def _load(self, *parts):
        return CLIPVisionModel.from_pretrained(self.suite_dir.joinpath(*parts)).eval()

    def engine(self, name):
        return build_engine(name, self._load("pretrained"), [self._load("experts", t) for t in self.tasks])

    def closure(self, engine, module):
        return lambda: self.algorithm.trainer().closure_loss(engine, module, self.batch)

    def reference_loss(self, coefficients):
        """The distillation loss of the model merged by hand at ``coefficients`` (K, L)."""
        weights = {n: self.base[n] + sum(coefficients[k, l] * tv[n] for k, tv in enumerate(self.task_vectors))
                   for l, n in enumerate(self.names)}
        images = torch.cat([px for px, _ in self.batch.values()]).float()
        embeds = functional_call(self.pretrained, weights, kwargs={"pixel_values": images})[1]
        losses = []
        for i, (task, (_, targets)) in enumerate(self.batch.items()):
            logits = self.algorithm.compute_logits(None, None, task, image_embeds=embeds[i * IMAGES_PER_TASK:(i + 1) * IMAGES_PER_TASK])
            losses.append(distillation_loss(logits, targets, "soft", 2.0))
        return torch.stack(losses).mean()

    def reference_grad(self, coefficients):
        point = coefficients.detach().clone().requires_grad_(True)
        return torch.autograd.grad(self.reference_loss(point), point)[0]

    def coefficients(self, init=0.3, noise=0.1, mode="layer_wise"):
        module = FreeCoefficients(len(self.tasks), len(self.names), mode, init)
        with torch.no_grad():
            module.coefficients.add_(noise * torch.randn(module.coefficients.shape,
                                                         generator=torch.Generator().manual_seed(1)))
        return module


@pytest.fixture(scope="module")
def rig(suite_dir, tmp_path_factory):
    return Rig(suite_dir, tmp_path_factory.mktemp("samerging_rig"))


def _adam(params):
    return torch.optim.Adam(params, lr=1e-3, weight_decay=5e-4)


@pytest.mark.parametrize("engine_name", ["host", "fused"])
def test_second_pass_gradient_is_taken_at_the_re_merged_perturbed_point(rig, engine_name):
    engine = rig.engine(engine_name)
    module = rig.coefficients()
    start = module.coefficients.detach().clone()
    sam = SAM(_adam([module.coefficients]), rho=RHO)
    sam.step(rig.closure(engine, module))
    (g1,), (g2,), (eps,) = sam.last_first_grads, sam.last_second_grads, sam.last_perturbation

    # the first gradient is the hand-merged model's; the perturbation is SAM's
    torch.testing.assert_close(g1, rig.reference_grad(start), atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(eps, RHO * g1 / g1.norm(), atol=1e-7, rtol=1e-5)
    # the second gradient is that of the model re-merged at lambda + e; it is not the first
    # one (the published code's stale merge would make them equal)
    torch.testing.assert_close(g2, rig.reference_grad(start + eps), atol=1e-6, rtol=1e-4)
    assert (g2 - g1).abs().max() > 1e-3 * g1.abs().max()
    # the update is the base optimizer's, applied at the starting point with the second gradient
    manual = start.clone().requires_grad_(True)
    adam = _adam([manual])
    manual.grad = g2.clone()
    adam.step()
    torch.testing.assert_close(module.coefficients.detach(), manual.detach(), atol=0, rtol=0)


def test_rho_zero_is_exactly_the_base_optimizer(rig):
    engine = rig.engine("fused")
    sam_module, adam_module = rig.coefficients(), rig.coefficients()
    sam, adam = SAM(_adam([sam_module.coefficients]), rho=0.0), _adam([adam_module.coefficients])
    for _ in range(2):
        sam.step(rig.closure(engine, sam_module))
        loss, _ = rig.closure(engine, adam_module)()
        adam.zero_grad()
        loss.backward()
        adam.step()
        torch.testing.assert_close(sam_module.coefficients, adam_module.coefficients, atol=0, rtol=0)
    state_sam = sam.base_optimizer.state[sam_module.coefficients]
    state_adam = adam.state[adam_module.coefficients]
    torch.testing.assert_close(state_sam["exp_avg_sq"], state_adam["exp_avg_sq"], atol=0, rtol=0)


def test_asam_perturbation_matches_its_formula(rig):
    # the formula e = rho * w^2 g / ||w g||, with one norm over all parameter tensors
    gen = torch.Generator().manual_seed(2)
    params = [torch.nn.Parameter(torch.randn(3, 5, generator=gen)), torch.nn.Parameter(torch.randn(4, generator=gen))]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    norm = torch.sqrt(sum(((p.detach() * p.grad) ** 2).sum() for p in params))
    expected = [RHO * p.detach() ** 2 * p.grad / norm for p in params]
    got = perturbation([p.detach() for p in params], [p.grad for p in params], RHO, adaptive=True)
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e)

    # in a real step, the closure's second call merges at exactly w + e
    engine = rig.engine("fused")
    module = rig.coefficients()
    start = module.coefficients.detach().clone()
    seen = []

    def closure():
        seen.append(module.coefficients.detach().clone())
        return rig.algorithm.trainer().closure_loss(engine, module, rig.batch)

    sam = SAM(_adam([module.coefficients]), rho=RHO, adaptive=True)
    sam.step(closure)
    g1 = sam.last_first_grads[0]
    e = RHO * start ** 2 * g1 / (start * g1).norm()
    torch.testing.assert_close(seen[0], start, atol=0, rtol=0)
    torch.testing.assert_close(seen[1], start + e, atol=1e-7, rtol=1e-6)

    # at coefficients 0 (SAMerging's default start) ASAM does not perturb at all
    zero = FreeCoefficients(len(rig.tasks), len(rig.names), "layer_wise", 0.0)
    sam = SAM(_adam([zero.coefficients]), rho=RHO, adaptive=True)
    sam.step(rig.closure(engine, zero))
    assert torch.count_nonzero(sam.last_perturbation[0]) == 0
    torch.testing.assert_close(sam.last_second_grads[0], sam.last_first_grads[0], atol=0, rtol=0)


class LinearCoefficients(torch.nn.Module):
    """lambda = A theta + b: a coefficient module whose parameters are not the coefficients (as a
    learner's), with a Jacobian the test knows."""

    def __init__(self, shape, width=5, seed=3):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.shape = shape
        self.A = 0.2 * torch.randn(shape.numel(), width, generator=gen)
        self.b = 0.3 + 0.05 * torch.randn(shape.numel(), generator=gen)
        self.theta = torch.nn.Parameter(torch.randn(width, generator=gen))

    def forward(self):
        return (self.A @ self.theta + self.b).view(self.shape)


def test_coefficient_space_sam_perturbs_the_output_and_reaches_the_parameters(rig):
    """sam_space: coefficients. The perturbation is rho g/||g|| of the *coefficients'* gradient, the second
    loss is the model merged at lambda + e, and its gradient reaches the parameters through lambda's
    Jacobian taken at the unperturbed parameters; the parameters move only by the base optimizer."""
    engine = rig.engine("fused")
    module = LinearCoefficients(torch.Size([len(rig.tasks), len(rig.names)]))
    start_theta = module.theta.detach().clone()
    lam = module().detach()
    output = OutputPerturbation(module)
    sam = SAM(_adam([module.theta]), rho=RHO)
    sam.step(rig.closure(engine, output), output=output)
    g_lam = rig.reference_grad(lam)
    (eps,) = sam.last_perturbation
    torch.testing.assert_close(eps, RHO * g_lam / g_lam.norm(), atol=1e-7, rtol=1e-4)
    assert output.shift is None  # nothing left perturbed after the step
    second = module.A.T @ rig.reference_grad(lam + eps).reshape(-1)
    manual = start_theta.clone().requires_grad_(True)
    adam = _adam([manual])
    manual.grad = second
    adam.step()
    torch.testing.assert_close(module.theta.detach(), manual.detach(), atol=1e-7, rtol=1e-5)


def test_coefficient_space_sam_equals_parameter_space_for_free_coefficients(rig):
    engine = rig.engine("fused")
    a, b = rig.coefficients(), rig.coefficients()
    sam_a, sam_b = SAM(_adam([a.coefficients]), rho=RHO), SAM(_adam([b.coefficients]), rho=RHO)
    for _ in range(2):
        sam_a.step(rig.closure(engine, a))
        out = OutputPerturbation(b)
        sam_b.step(rig.closure(engine, out), output=out)
        torch.testing.assert_close(a.coefficients, b.coefficients, atol=1e-7, rtol=1e-6)


def _compose(name):
    with initialize_config_dir(config_dir=str(REPO_ROOT / "config"), version_base=None):
        return compose(overrides=[f"+method={name}"]).method


def test_configs_carry_the_papers_defaults_and_share_one_sam():
    samerging = instantiate(_compose("samerging"))
    assert isinstance(samerging, CLIPSAMergingAlgorithm)
    expected = dict(mode="layer_wise", init_coefficient=0.0, loss="soft", temperature=2.0, optimizer="sam",
                    sam_rho=0.07, sam_adaptive=False, lr=1e-3, weight_decay=5e-4, lr_step_size=None,
                    batch_size=16, num_batches_per_task=100, epochs=10, max_steps=1000,
                    min_samples_per_task=1600, max_samples_per_task=1600, protocol="train_unlabeled")
    assert {k: getattr(samerging, k) for k in expected} == expected
    taskwise = instantiate(_compose("samerging_taskwise"))
    assert taskwise.mode == "task_wise" and taskwise.max_steps == 1000
    stats_sam = instantiate(_compose("statsmerging_sam"))
    assert type(stats_sam).__name__ == "CLIPStatsMergingAlgorithm"
    assert stats_sam.optimizer == "sam" and stats_sam.loss == "hard"
    assert (stats_sam.max_steps, stats_sam.max_epochs, stats_sam.lr_step_epochs) == (None, 500, 100)  # the paper's
    for algorithm in (samerging, stats_sam):
        optimizer = algorithm.trainer().make_optimizer([torch.nn.Parameter(torch.zeros(2))])
        assert isinstance(optimizer, SAM) and isinstance(optimizer.base_optimizer, torch.optim.Adam)
    assert optimizer.base_optimizer.param_groups[0]["weight_decay"] == 0.0  # StatsMerging keeps its own
    # an explicit step count wins over epochs; the sample budget cannot be given twice
    assert CLIPSAMergingAlgorithm(max_steps=7).max_steps == 7
    with pytest.raises(ValueError, match="num_batches_per_task fixes"):
        CLIPSAMergingAlgorithm(max_samples_per_task=10)
    with pytest.raises(ValueError, match="max_steps"):
        CLIPSAMergingAlgorithm(num_batches_per_task=None)


@pytest.mark.parametrize("mode", ["layer_wise", "task_wise"])
def test_only_coefficients_train_heads_stay_frozen_and_no_label_is_read(tmp_path, rig, mode, monkeypatch):
    pool = CLIPSuiteModelPool(suite_dir=str(rig.suite_dir))
    real = pool.load_train_dataset
    monkeypatch.setattr(pool, "load_train_dataset", lambda name: LabelTrap(real(name)))
    monkeypatch.setattr(pool, "load_test_dataset", lambda name: pytest.fail("test split was read"))
    algorithm = _algorithm(tmp_path, mode=mode)
    seen = {}
    original = Trainer.make_optimizer
    monkeypatch.setattr(Trainer, "make_optimizer",
                        lambda trainer, params: original(trainer, seen.setdefault("params", list(params))))
    merged = algorithm.run(pool)

    # the optimizer held exactly one tensor: the free coefficients, (K, L) or (K,)
    (param,) = seen["params"]
    shape = (3, len(rig.names)) if mode == "layer_wise" else (3,)
    assert tuple(param.shape) == shape and param.requires_grad
    assert param.detach().abs().max() > 0  # trained away from the start at 0
    # heads: not trainable and equal to freshly built ones
    for task, weights in algorithm.zeroshot_weights.items():
        assert not weights.requires_grad
        torch.testing.assert_close(weights, rig.algorithm.zeroshot_weights[task])
    assert not any(p.requires_grad for p in algorithm.visual_projection.parameters())
    assert isinstance(merged, CLIPVisionModel)
    report = json.loads((tmp_path / "artifacts" / "samerging_report.json").read_text())
    assert report["protocol"]["name"] == "train_unlabeled" and not report["protocol"]["uses_ground_truth_labels"]
    assert report["method"] == "SAMerging" and len(report["history"]) == 2
    assert all(info["num_samples"] == 16 for info in report["fit_data"].values())
    coefficients = torch.load(tmp_path / "artifacts" / "coefficients.pt")
    assert tuple(coefficients.shape) == shape
    torch.testing.assert_close(coefficients, param.detach())


def test_cli_runs_samerging_on_the_fixture(tmp_path, suite_dir):
    log_dir = tmp_path / "logs"
    _run(["method=samerging", "modelpool=clip_suite", "taskpool=clip_suite", "method.epochs=1",
          "method.num_batches_per_task=2", "method.batch_size=8", "fabric.accelerator=cpu",
          f"path.log_dir={log_dir}"], tmp_path, _env(tmp_path, suite_dir))
    report = json.loads((log_dir / "samerging_report.json").read_text())
    assert report["method"] == "SAMerging"
    assert report["protocol"]["name"] == "train_unlabeled"
    config = report["config"]
    assert (config["optimizer"], config["sam_rho"], config["loss"], config["temperature"]) == ("sam", 0.07, "soft", 2.0)
    assert config["max_steps"] == 2 and config["max_samples_per_task"] == 16
    assert (log_dir / "coefficients_heatmap.png").stat().st_size > 0
    assert 0.0 <= json.loads((log_dir / "program_report.json").read_text())["average"]["accuracy"] <= 1.0
