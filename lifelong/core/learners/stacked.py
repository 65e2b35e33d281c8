"""Torch backend: logistic/softmax/linear regression and small MLPs for many tasks as stacked tensors."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from lifelong.config import EngineConfig
from lifelong.core.learners import ekf
from lifelong.core.learners.base import Learners, rows_not_finite
from lifelong.core.tasks import grow_rows, grown
from lifelong.errors import ConfigError

EKF_MAX_DIM = 256  # optimizer "auto" uses the EKF up to this many features (its state is quadratic in them)

ADAGRAD_INIT = 0.1  # initial AdaGrad accumulator: keeps the first steps of a new task moderate


class TorchLearners(Learners):
    """One learner per task; parameters of all tasks are stacked along dimension 0.

    Linear models learn by EKF steps (``optimizer: ekf``, a Bayesian online update with a Gaussian prior
    of variance ``prior_var``) or by AdaGrad; MLPs by AdaGrad. One event at a time per task; rows of one
    call are distinct tasks, so a batched update equals the same updates made one by one.

    Examples
    --------
    >>> from lifelong.config import EngineConfig
    >>> ls = TorchLearners(EngineConfig(), dim=2, device=torch.device("cpu"))
    >>> ls.ensure(1)
    >>> idx, x1 = torch.tensor([0]), torch.tensor([[1.0, -1.0, 1.0]])
    >>> for _ in range(20):
    ...     _ = ls.forward(idx, x1, torch.tensor([1]))
    >>> bool(ls.finish(ls.forward(idx, x1))[0, 1] > 0.9)
    True
    """

    def __init__(self, cfg: EngineConfig, dim: int, device: torch.device):
        super().__init__(cfg, dim, device)
        self.linear = cfg.model == "logistic"
        self.shareable = True
        opt = cfg.optimizer
        if opt == "auto":
            opt = "ekf" if self.linear and dim <= EKF_MAX_DIM else "adagrad"
        self.use_ekf = opt == "ekf"
        if self.use_ekf and not self.linear:
            raise ConfigError("engine.optimizer: ekf needs engine.model: logistic")
        self._n = 0
        self.params: dict[str, torch.Tensor] = {
            name: torch.zeros((0, *shape), dtype=self.dtype, device=device) for name, shape in self._shapes()
        }
        # AdaGrad's squared-gradient sums; the EKF keeps its own curvature in S.
        self.accum = {} if self.use_ekf else {name: torch.zeros_like(p) for name, p in self.params.items()}
        self.eye_S = torch.eye(dim + 1, dtype=self.dtype, device=device) * cfg.prior_var  # the plain EKF prior
        self.bias = ekf.start_bias(cfg.task)  # the output bias of a learner before any population prior
        self.plain_mu = torch.zeros(self.n_out, dim + 1, dtype=self.dtype, device=device)  # the plain EKF mean
        self.plain_mu[:, -1] = self.bias

    def _shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        d, c, h = self.dim, self.n_out, self.cfg.hidden
        if self.use_ekf:
            return [("mu", (c, d + 1)), ("S", (c, d + 1, d + 1))]
        if self.linear:
            return [("w", (d, c)), ("b", (c,))]
        return [("w1", (d, h)), ("b1", (h,)), ("w2", (h, c)), ("b2", (c,))]

    def ensure(self, n_tasks: int) -> None:
        """Grow the stacked tensors (doubling) and initialise the new tasks' rows."""
        if n_tasks <= self._n:
            return
        cap = self.params[next(iter(self.params))].shape[0]
        if n_tasks > cap:
            new_cap = grown(n_tasks, cap, self.cfg.max_resident_tasks)
            for store in (self.params, self.accum):
                for name, old in store.items():
                    store[name] = grow_rows(old, new_cap)  # rows past ``_n``: set up below
        new = slice(self._n, n_tasks)
        for name, p in self.params.items():
            p[new] = self._init(name, self._n, n_tasks - self._n)
        for acc in self.accum.values():
            acc[new] = ADAGRAD_INIT
        self._n = n_tasks

    def _init(self, name: str, first: int, n: int) -> torch.Tensor | float:
        if name == "mu":
            return (self.plain_mu if self.prior_mu is None else self.prior_mu).expand(n, -1, -1)
        if name == "S" and self.prior_S is not None:
            return self.prior_S.expand(n, -1, -1, -1)
        if name == "S":
            return self.eye_S.expand(n, self.n_out, -1, -1)
        if name in ("b", "b2"):  # the output's
            return self.bias
        if self.linear or name.startswith("b"):
            return 0.0
        fan_in = self.dim if name == "w1" else self.cfg.hidden
        shape = self.params[name].shape[1:]
        # One generator per task and weight, seeded from (seed, task): a task's initial weights do not
        # depend on how many tasks were created together.
        seeds = [(self.cfg.seed * 1_000_003 + task) * 2 + (name == "w2") for task in range(first, first + n)]
        rows = [torch.randn(shape, generator=torch.Generator().manual_seed(s), dtype=self.dtype) for s in seeds]
        return (torch.stack(rows) / fan_in**0.5).to(self.device)  # type: ignore[no-any-return]

    def _logits(self, p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """Logits ``[n, C]`` for per-row parameters (leading dim n) and inputs ``[n, d]``."""
        if self.linear:
            return torch.einsum("nd,ndc->nc", x, p["w"]) + p["b"]
        h = torch.relu(torch.einsum("nd,ndh->nh", x, p["w1"]) + p["b1"])
        return torch.einsum("nh,nhc->nc", h, p["w2"]) + p["b2"]

    def forward(self, idx: torch.Tensor, x1: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Raw outputs of the rows' tasks for inputs with a trailing 1 (``x1 [n, d + 1]``), before
        learning; with ``y``, each row then learns its label. ``finish`` maps raw outputs to predictions."""
        if self.use_ekf:
            return ekf.forward(
                self.params["mu"],
                self.params["S"],
                idx,
                x1,
                None if y is None else self._scaled(y, x1.dtype),
                self.task,
            )
        x = x1[:, :-1]
        p = {k: v[idx] for k, v in self.params.items()}
        logits = self._logits(p, x)
        if y is not None:
            self._adagrad(idx, p, x, logits, y)
        return logits

    def forward_new(self, tasks: np.ndarray, x1: torch.Tensor) -> torch.Tensor:
        """Raw outputs of freshly initialised parameters for each row's would-be task."""
        params = self.fresh(tasks)
        if self.use_ekf:
            return ekf.forward(
                params["mu"], params["S"], torch.arange(len(tasks), device=self.device), x1, None, self.task
            )
        return self._logits(params, x1[:, :-1])

    def fresh(self, tasks: np.ndarray) -> dict[str, torch.Tensor]:
        """The parameters tasks not created yet would start with, one row per would-be index in ``tasks``."""
        return {
            name: torch.cat(
                [
                    torch.zeros((1, *v.shape[1:]), dtype=self.dtype, device=self.device) + self._init(name, int(i), 1)
                    for i in tasks.tolist()
                ]
            )
            for name, v in self.params.items()
        }

    @property
    def can_sequence(self) -> bool:
        """EKF learners on the CPU can run a segment event by event in compiled code (``sequence``)."""
        return self.use_ekf and self.device.type == "cpu"

    def sequence(
        self, tasks: np.ndarray, x1: torch.Tensor, y: np.ndarray, labelled: np.ndarray, snap_row: np.ndarray
    ) -> tuple[torch.Tensor, np.ndarray]:
        """Raw outputs of a whole segment, event by event in order, and the ``mu`` snapshots it asked for."""
        target = (y - self.lo) / (self.hi - self.lo) if self.task == "regression" else y
        return ekf.sequence(self.params["mu"], self.params["S"], tasks, x1, target, labelled, self.task, snap_row)

    def members_from_ekf(self, mu: np.ndarray) -> list[dict[str, torch.Tensor]]:
        """One-slot member stores from EKF posterior means ``[m, C, d + 1]`` (views of ``mu``: it is not reused)."""
        m = torch.from_numpy(mu).to(self.device, self.dtype)
        w, b = m[:, :, :-1].transpose(1, 2), m[:, :, -1]
        return [{"w": w[i : i + 1], "b": b[i : i + 1]} for i in range(len(m))]

    def finish(self, raw: torch.Tensor) -> torch.Tensor:
        """Class probabilities (probit-corrected for the EKF) or values in the target range."""
        return self.to_pred(ekf.predictive_logits(raw, self.task) if self.use_ekf else raw)

    def _scaled(self, y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return (y.to(dtype) - self.lo) / (self.hi - self.lo) if self.task == "regression" else y

    def _grad_logits(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """d loss / d logits: log loss for classification, half squared loss on the scaled target."""
        if self.task == "binary":
            return torch.sigmoid(logits) - y.to(logits.dtype).unsqueeze(-1)
        if self.task == "multiclass":
            return torch.softmax(logits, -1) - torch.nn.functional.one_hot(y.long(), self.n_out).to(logits.dtype)
        return logits - self._scaled(y, logits.dtype).unsqueeze(-1)

    def _adagrad(
        self, idx: torch.Tensor, p: dict[str, torch.Tensor], x: torch.Tensor, logits: torch.Tensor, y: torch.Tensor
    ) -> None:
        if self.linear:
            g_out = self._grad_logits(logits, y)
            grads = {"w": x.unsqueeze(-1) * g_out.unsqueeze(1), "b": g_out}
        else:
            leaves = {k: v.detach().requires_grad_() for k, v in p.items()}
            with torch.enable_grad():
                out = self._logits(leaves, x)
                gs = torch.autograd.grad(out, list(leaves.values()), grad_outputs=self._grad_logits(logits, y))
            grads = dict(zip(leaves, gs, strict=True))
        lr = self.cfg.lr
        for name, g in grads.items():
            acc = self.accum[name][idx] + g * g
            self.accum[name][idx] = acc
            self.params[name][idx] = p[name] - lr * g / acc.sqrt()

    # --- knowledge-base members: frozen copies of task parameters, stacked by slot ---

    def new_store(self, capacity: int) -> dict[str, torch.Tensor]:
        """Member slots: weights and biases (EKF members are posterior means), or all parameters."""
        shapes = (
            [("w", (self.dim, self.n_out)), ("b", (self.n_out,))]
            if self.use_ekf
            else [(k, tuple(v.shape[1:])) for k, v in self.params.items()]
        )
        return {k: torch.zeros((capacity, *shape), dtype=self.dtype, device=self.device) for k, shape in shapes}

    def write_member(self, store: dict[str, torch.Tensor], slot: int, task: int) -> None:
        """Freeze the task's parameters (the posterior mean for the EKF) into ``slot``."""
        if self.use_ekf:  # a member is the posterior mean
            mu = self.params["mu"][task]
            store["w"][slot], store["b"][slot] = mu[:, :-1].T, mu[:, -1]
            return
        for k, v in self.params.items():
            store[k][slot] = v[task]

    def copy_member(self, store: dict[str, torch.Tensor], slot: int, one: dict[str, torch.Tensor]) -> None:
        """Copy the one member of ``one`` into ``slot``."""
        for k in store:
            store[k][slot] = one[k][0]

    def member_vector(self, store: dict[str, torch.Tensor], slot: int) -> torch.Tensor:
        """All of a member's parameters as one vector."""
        return torch.cat([v[slot].reshape(-1) for v in store.values()])

    def member_vectors(self, stores: list[dict[str, torch.Tensor]]) -> torch.Tensor:
        """``member_vector`` of each one-slot store, stacked ``[m, D]``: one operation per parameter."""
        return torch.cat([torch.cat([one[k] for one in stores]).flatten(1) for k in stores[0]], dim=1)

    def copy_members(
        self, store: dict[str, torch.Tensor], slots: list[int], stores: list[dict[str, torch.Tensor]]
    ) -> None:
        """``copy_member`` of each one-slot store into its slot (distinct slots), one operation per parameter."""
        at = torch.as_tensor(slots, device=self.device)
        for k, v in store.items():
            v[at] = torch.cat([one[k] for one in stores])

    def store_state(self, store: dict[str, torch.Tensor]) -> dict[str, Any]:
        """The store's tensors, on the CPU."""
        return {k: v.cpu() for k, v in store.items()}

    def load_store(self, state: dict[str, Any]) -> dict[str, torch.Tensor]:
        """A store from ``store_state`` output, on this device."""
        return {k: v.to(self.device) for k, v in state.items()}

    def member_predict(
        self, store: dict[str, torch.Tensor], x: torch.Tensor, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Predictions ``[n, K, P]`` of every member slot for inputs ``[n, d]``: one batched operation."""
        if self.linear:  # one matrix product over all slots
            k, d, c = store["w"].shape
            flat = torch.addmm(store["b"].reshape(-1), x, store["w"].permute(1, 0, 2).reshape(d, k * c))
            logits = flat.view(len(x), k, c)
        else:
            h = torch.relu(torch.einsum("nd,kdh->nkh", x, store["w1"]) + store["b1"])
            logits = torch.einsum("nkh,khc->nkc", h, store["w2"]) + store["b2"]
        return self.to_pred(logits, out)

    def linear_weights(self, store: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """Members as ``[K, d + 1, C]`` (weights with the bias last), or None for non-linear models."""
        if not self.linear:
            return None
        return torch.cat([store["w"], store["b"].unsqueeze(1)], dim=1)

    def not_finite(self, tasks: np.ndarray) -> np.ndarray:
        """Which of ``tasks`` hold a NaN or infinity in any parameter."""
        return rows_not_finite(list(self.params.values()), tasks)

    def task_state(self, task: int) -> dict[str, torch.Tensor]:
        """One task's parameters (and AdaGrad sums) as tensors."""
        out = {f"param.{k}": v[task].cpu() for k, v in self.params.items()}
        out.update({f"accum.{k}": v[task].cpu() for k, v in self.accum.items()})
        return out

    def columns(self) -> dict[str, torch.Tensor]:
        """Parameters (and AdaGrad sums), row i: task i."""
        return {**{f"param.{k}": v for k, v in self.params.items()}, **{f"accum.{k}": v for k, v in self.accum.items()}}

    def reset(self, rows: torch.Tensor) -> None:
        """Tasks ``rows`` back to their initial parameters."""
        for name, p in self.params.items():
            if self.linear or name.startswith("b"):
                p[rows] = self._init(name, 0, len(rows))
            else:  # an MLP's initial weights are drawn per row
                for row in rows.tolist():
                    p[row : row + 1] = self._init(name, row, 1)
        for acc in self.accum.values():
            acc[rows] = ADAGRAD_INIT

    def load_task(self, task: int, state: dict[str, torch.Tensor] | None) -> None:
        """Set one task from ``task_state`` output, or back to its initial parameters (None)."""
        for name, p in self.params.items():
            p[task : task + 1] = self._init(name, task, 1) if state is None else state[f"param.{name}"].to(self.device)
        for name, acc in self.accum.items():
            acc[task : task + 1] = ADAGRAD_INIT if state is None else state[f"accum.{name}"].to(self.device)

    def state(self) -> dict[str, Any]:
        """Parameters (and AdaGrad sums) of every task, on the CPU."""
        out: dict[str, Any] = {f"param.{k}": v[: self._n].cpu() for k, v in self.params.items()}
        out.update({f"accum.{k}": v[: self._n].cpu() for k, v in self.accum.items()})
        return out

    def load_state(self, state: dict[str, Any]) -> None:
        """Restore every task from ``state`` output."""
        n = state[f"param.{next(iter(self.params))}"].shape[0]
        self._n = 0
        self.params = {k: v[:0] for k, v in self.params.items()}
        self.accum = {k: v[:0] for k, v in self.accum.items()}
        self.ensure(n)
        for k in self.params:
            self.params[k][:n] = state[f"param.{k}"].to(self.device)
        for k in self.accum:
            self.accum[k][:n] = state[f"accum.{k}"].to(self.device)
