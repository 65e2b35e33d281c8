"""Contract checks run on every learner backend (after river's estimator checks)."""

import dataclasses

import pytest
import torch

from lifelong.config import EngineConfig
from lifelong.core.hedge import smooth
from lifelong.core.learners import make_learners

BASE = EngineConfig(dim=3, dtype="float64", hidden=4, seed=7)
BACKENDS = {
    "ekf-logistic": {},
    "adagrad-logistic": {"optimizer": "adagrad"},
    "mlp": {"model": "mlp"},
    "softmax": {"task": "multiclass", "n_classes": 3},
    "linear-regression": {"task": "regression", "target_range": (-1.0, 1.0)},
    "river-logistic": {"backend": "river"},
    "river-tree": {"backend": "river", "river_model": "river.tree.HoeffdingTreeClassifier"},
}


@pytest.fixture(params=list(BACKENDS), ids=list(BACKENDS))
def make(request):
    cfg = dataclasses.replace(BASE, **BACKENDS[request.param])

    def build():
        learners = make_learners(cfg, cfg.dim, torch.device("cpu"))
        learners.ensure(3)
        return learners

    return build


def data(n=40, seed=0, task="binary"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g, dtype=torch.float64)
    x1 = torch.cat([x, torch.ones(n, 1, dtype=torch.float64)], 1)
    if task == "regression":
        return x1, (x[:, 0] / 4).clamp(-1, 1)
    return x1, (x[:, 0] > 0).long() + (task == "multiclass") * (x[:, 1] > 1).long()


def labels_for(learners):
    return data(task=learners.task)


def predictions(learners, idx, x1):
    return learners.finish(learners.forward(idx, x1))


def test_predict_before_learning_is_valid(make):
    learners = make()
    x1, _ = labels_for(learners)
    p = predictions(learners, torch.tensor([0, 1, 2]), x1[:3])
    assert torch.isfinite(p).all()
    if learners.task != "regression":
        torch.testing.assert_close(p.sum(-1), torch.ones(3, dtype=p.dtype))


def test_input_is_not_mutated(make):
    learners = make()
    x1, y = labels_for(learners)
    x_copy, y_copy = x1.clone(), y.clone()
    learners.forward(torch.tensor([0]), x1[:1], y[:1])
    assert torch.equal(x1, x_copy) and torch.equal(y, y_copy)


def test_tasks_are_independent(make):
    learners = make()
    x1, y = labels_for(learners)
    before = predictions(learners, torch.tensor([1]), x1[:1])
    for i in range(20):
        learners.forward(torch.tensor([0]), x1[i : i + 1], y[i : i + 1])
    assert torch.equal(predictions(learners, torch.tensor([1]), x1[:1]), before)
    assert not torch.equal(predictions(learners, torch.tensor([0]), x1[:1]), before)


def test_batch_equals_one_by_one(make):
    a, b = make(), make()
    x1, y = labels_for(a)
    idx = torch.tensor([0, 1, 2])
    for step in range(8):
        rows = slice(3 * step, 3 * step + 3)
        batched = a.forward(idx, x1[rows], y[rows])
        single = torch.cat([b.forward(idx[i : i + 1], x1[rows][i : i + 1], y[rows][i : i + 1]) for i in range(3)])
        torch.testing.assert_close(batched, single)
    torch.testing.assert_close(predictions(a, idx, x1[:3]), predictions(b, idx, x1[:3]))


def test_state_round_trips(make):
    a = make()
    x1, y = labels_for(a)
    for i in range(10):
        a.forward(torch.tensor([i % 3]), x1[i : i + 1], y[i : i + 1])
    b = make()
    b.load_state(a.state())
    for i in range(10, 20):
        a.forward(torch.tensor([i % 3]), x1[i : i + 1], y[i : i + 1])
        b.forward(torch.tensor([i % 3]), x1[i : i + 1], y[i : i + 1])
    idx = torch.tensor([0, 1, 2])
    assert torch.equal(predictions(a, idx, x1[:3]), predictions(b, idx, x1[:3]))


def test_seeding_is_reproducible(make):
    a, b = make(), make()
    x1, _ = labels_for(a)
    idx = torch.tensor([0, 1, 2])
    assert torch.equal(predictions(a, idx, x1[:3]), predictions(b, idx, x1[:3]))


def state_size(learners):
    return sum(v.numel() * v.element_size() for v in learners.state().values() if isinstance(v, torch.Tensor))


def test_memory_is_bounded_by_tasks_not_events(make):
    learners = make()
    x1, y = labels_for(learners)
    for i in range(40):
        learners.forward(torch.tensor([i % 3]), x1[i : i + 1], y[i : i + 1])
    size = state_size(learners)
    for i in range(400):
        learners.forward(torch.tensor([i % 3]), x1[i % 40 : i % 40 + 1], y[i % 40 : i % 40 + 1])
    if learners.__class__.__name__ == "TorchLearners":
        assert state_size(learners) == size
    else:  # river models keep statistics of their own, but not the events
        assert state_size(learners) < 2 * size


def test_members_predict_like_their_task(make):
    learners = make()
    x1, y = labels_for(learners)
    for i in range(20):
        learners.forward(torch.tensor([0]), x1[i : i + 1], y[i : i + 1])
    store = learners.new_store(2)
    learners.write_member(store, 1, 0)
    member = learners.member_predict(store, x1[:5, :-1])[:, 1]
    own = predictions(learners, torch.zeros(5, dtype=torch.long), x1[:5])
    if getattr(learners, "use_ekf", False):
        # An EKF member is the posterior mean: same decision, without the predictive's uncertainty shrinkage.
        assert torch.equal(member.argmax(-1), own.argmax(-1))
    else:
        torch.testing.assert_close(member, own)


@pytest.mark.parametrize("task", ["binary", "multiclass", "regression"])
def test_compiled_predictions_equal_the_torch_formula(task):
    """On the CPU, logits become predictions in one compiled pass; CUDA takes torch operations: same values."""
    cfg = dataclasses.replace(BASE, task=task, n_classes=3, target_range=(-1.0, 2.0))
    learners = make_learners(cfg, cfg.dim, torch.device("cpu"))
    logits = torch.randn(7, 4, 1 if task != "multiclass" else 3, generator=torch.Generator().manual_seed(3)) * 4
    got = learners.to_pred(logits.float())
    p = {"binary": torch.sigmoid, "multiclass": lambda v: torch.softmax(v, -1)}.get(task, lambda v: v.clamp(0, 1))(
        logits.float()
    ).double()
    if task == "binary":
        want = smooth(torch.cat([1 - p, p], -1))
    elif task == "multiclass":
        want = smooth(p)
    else:
        want = -1.0 + 3.0 * p
    assert got.dtype == torch.float64 and got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-15)
