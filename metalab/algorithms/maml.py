"""MAML (Finn, Abbeel & Levine, ICML 2017, arXiv:1703.03400) and its first-order variant.

Inner loop: a few SGD steps on the support loss from the meta-learned initialisation, over a
parameter dict (``torch.func.functional_call``); outer loss: the query loss of the adapted
weights. Second order differentiates through the inner steps (``create_graph=True``); first
order treats the inner gradients as constants.

For classification the head is one row (weight ``[1, D]``, bias ``[1]``) copied to every class
at the start of adaptation (Ye & Chao, ICLR 2022, "How to train your MAML to excel in few-shot
classification"), so a model meta-trained 5-way adapts to 20-way tasks and is invariant to the
order of labels. ``head="per-class"`` gives instead the original paper's (and learn2learn's) head:
a randomly initialised ``Linear(D, head_ways)`` meta-learned row by row, which adapts only to
``head_ways``-way tasks. For regression the head is a plain ``[outputs, D]`` linear layer and the loss
is the mean squared error.

Normalisation (the ``task-batch`` norm): in the inner loop each support set is normalised by its
own statistics. A prediction normalises its inputs by the *support's* statistics under the adapted
weights, fixed at adaptation, so an input's scores depend on it and the adapted model only — not
on what else is in the batch (a service client sending one image at a time gets the labels a batch
would). In meta-training the queries are normalised by their own batch (``query_stats='batch'``,
MAML's original training) or by the support's (``'support'``, as at prediction);
``benchmarks/maml_query_stats.py`` measures both (``'batch'`` trains better, and predicting with
the support's statistics costs nothing against the transductive scores).

MAML++ options (Antoniou, Edwards & Storkey, ICLR 2019, "How to train your MAML"), all off by
default: ``learned_step_sizes`` (LSLR: one learned inner step size per fast weight tensor and per
inner step, starting at ``inner_lr``); ``multi_step_loss_until`` (MSL: the outer loss weighs the
query loss after every inner step, annealed from equal weights to almost all on the last step
over this fraction of training); ``first_order_until`` (derivative-order annealing: first-order
gradients for this fraction of training, second order after). Training progress comes from the
trainer (:attr:`~metalab.algorithms.base.Algorithm.training_progress`).

Execution (``execution=``): ``"loop"`` runs tasks one after another; ``"vmap"`` batches them with
``torch.func.vmap``/``torch.func.grad``; ``"grouped"`` applies every task's weights at once as
grouped convolutions / batched matmuls (:mod:`metalab.algorithms.grouped`). ``"auto"`` picks
``loop`` on CPU (on 2 cores both ``vmap`` and ``grouped`` over per-task weights measured slower)
and ``vmap`` elsewhere. All give the same loss and gradients (tested).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.utils.checkpoint import checkpoint

from metalab.algorithms.base import Algorithm, Predictor, check_task, sub_params
from metalab.algorithms.grouped import grouped_features, supports_grouped
from metalab.algorithms.task_threads import module_for_thread, per_task_backward
from metalab.models.backbones import BatchStatNorm, normalised_biases, plain_norm_ops, reference_rows
from metalab.data.episodes import Episodes
from metalab.errors import ConfigError

Params = dict[str, torch.Tensor]


class MAML(Algorithm):
    name = "maml"

    def __init__(
        self,
        backbone: nn.Module,
        inner_lr: float = 0.4,
        inner_steps: int = 1,
        test_inner_steps: int = 10,
        first_order: bool = False,
        execution: str = "auto",
        task: str = "classification",
        outputs: int = 1,
        checkpoint_inner: bool = False,
        head: str = "row",
        head_ways: int = 5,
        query_stats: str = "batch",
        learned_step_sizes: bool = False,
        multi_step_loss_until: float = 0.0,
        first_order_until: float = 0.0,
    ) -> None:
        super().__init__(backbone)
        for key, value in (("multi_step_loss_until", multi_step_loss_until), ("first_order_until", first_order_until)):
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= value <= 1.0:
                raise ConfigError(f"{key}={value!r} is invalid; give the fraction of training (0 to 1; 0 turns it off).")
        self.multi_step_loss_until, self.first_order_until = float(multi_step_loss_until), float(first_order_until)
        if query_stats not in ("support", "batch"):
            raise ConfigError(f"query_stats='{query_stats}' is unknown; use 'support' (queries normalised by their task's "
                              "support statistics, as at prediction) or 'batch' (by the query batch's own, transductive).")
        self.query_stats = query_stats
        if execution not in ("auto", "loop", "vmap", "grouped"):
            raise ConfigError(f"execution='{execution}' is unknown; use 'auto', 'loop', 'vmap' or 'grouped'.")
        if execution == "grouped" and not supports_grouped(backbone):
            raise ConfigError("execution='grouped' needs a conv4 or MLP backbone; use 'loop' or 'vmap'.")
        if inner_steps < 1 or test_inner_steps < 1:
            raise ConfigError("inner_steps and test_inner_steps must be at least 1.")
        if task not in ("classification", "regression"):
            raise ConfigError(f"task='{task}' is unknown; use 'classification' or 'regression'.")
        if head not in ("row", "per-class"):
            raise ConfigError(f"head='{head}' is unknown; use 'row' (one shared row, any number of ways) or 'per-class'.")
        if head == "per-class" and task != "classification":
            raise ConfigError("head='per-class' applies to classification only; remove it for regression.")
        if head == "per-class" and (not isinstance(head_ways, int) or head_ways < 2):
            raise ConfigError(f"head_ways={head_ways!r} is invalid; give the number of ways of the training tasks (2 or more).")
        self.head, self.head_ways = head, head_ways
        if head == "per-class":  # nn.Linear(D, head_ways)'s initialisation
            linear = nn.Linear(backbone.out_dim, head_ways)
            self.head_weight, self.head_bias = nn.Parameter(linear.weight.data), nn.Parameter(linear.bias.data)
        else:
            rows = 1 if task == "classification" else outputs
            self.head_weight = nn.Parameter(torch.zeros(rows, backbone.out_dim))
            self.head_bias = nn.Parameter(torch.zeros(rows))
        self.inner_lr, self.inner_steps, self.test_inner_steps = inner_lr, inner_steps, test_inner_steps
        self.first_order, self.execution, self.task = first_order, execution, task
        self.checkpoint_inner = checkpoint_inner
        if task == "classification" and head == "row":
            # one row copied to every class: moving it moves every logit by the same amount, which
            # softmax ignores, so the loss does not depend on it (its gradient is round-off)
            self.invariant_params = ("head_weight", "head_bias")
        if first_order:
            self.name = "fomaml"
        self.learned_step_sizes = learned_step_sizes
        if learned_step_sizes:  # LSLR: [inner_steps] rates per fast weight tensor, in task_init's key order
            keys = self.fast_keys()
            self.step_sizes = nn.ParameterList([nn.Parameter(torch.full((inner_steps,), float(inner_lr))) for _ in keys])
            self._step_size_of = {key: f"step_sizes.{i}" for i, key in enumerate(keys)}
            # a bias that a norm cancels has an inner gradient of round-off only, and so has its rate
            cancelled = {f"backbone.{n}" for n in normalised_biases(backbone)}
            self.invariant_params = tuple(self.invariant_params) + tuple(
                name for key, name in self._step_size_of.items() if key in cancelled)

    def fast_keys(self) -> list[str]:
        """The names of the fast weights (``backbone.*``, ``head.weight``, ``head.bias``)."""
        return [f"backbone.{k}" for k, _ in self.backbone.named_parameters()] + ["head.weight", "head.bias"]

    def second_order_now(self) -> bool:
        """Whether this step differentiates through the inner loop (not first order, and past
        ``first_order_until`` of training)."""
        return not self.first_order and self.training_progress >= self.first_order_until

    def step_loss_weights(self, steps: int) -> list[float]:
        """Weights of the query losses after inner steps ``1..steps`` in the outer loss: ``[0, …, 1]``
        without MSL; with it MAML++'s annealing (equal weights at the start of training, then the
        earlier steps decay to ``0.03 / steps`` and the last takes the rest by
        ``multi_step_loss_until`` of training)."""
        if self.multi_step_loss_until <= 0 or steps == 1:
            return [0.0] * (steps - 1) + [1.0]
        f = min(1.0, self.training_progress / self.multi_step_loss_until)
        floor = 0.03 / steps
        early = [max(1.0 / steps - f / steps, floor)] * (steps - 1)
        return early + [min(1.0 / steps + f * (steps - 1) / steps, 1.0 - (steps - 1) * floor)]

    # -- functional pieces -------------------------------------------------------------------
    def task_init(self, params: Params, ways: int, support_x: torch.Tensor | None = None,
                  support_y: torch.Tensor | None = None) -> Params:
        """The starting point of adaptation: backbone weights and the head (its row copied
        ``ways`` times for classification). The support set is for methods whose start depends on
        it (Proto-MAML)."""
        fast = {k: v for k, v in params.items() if k.startswith("backbone.")}
        if self.head == "per-class":
            if ways != self.head_ways:
                raise ConfigError(f"This MAML has a {self.head_ways}-class head (head='per-class'), so it adapts to "
                                  f"{self.head_ways}-way tasks only, not {ways}-way; evaluate at {self.head_ways} ways "
                                  "or train with head='row'.")
            fast["head.weight"], fast["head.bias"] = params["head_weight"], params["head_bias"]
        elif self.task == "classification":
            fast["head.weight"] = params["head_weight"].expand(ways, -1)
            fast["head.bias"] = params["head_bias"].expand(ways)
        else:
            fast["head.weight"], fast["head.bias"] = params["head_weight"], params["head_bias"]
        return fast

    def inner_lrs(self, params: Params, step: int = 0) -> dict[str, float | torch.Tensor]:
        """Step size of each fast weight at inner step ``step`` (a constant; learned per tensor and
        step with ``learned_step_sizes``, the last learned one for steps beyond ``inner_steps``;
        learned per element in Meta-SGD)."""
        if self.learned_step_sizes:
            i = min(step, self.inner_steps - 1)
            return {k: params[name][i] for k, name in self._step_size_of.items()}
        return {k: self.inner_lr for k in self.fast_keys()}

    def forward_fast(self, fast: Params, x: torch.Tensor) -> torch.Tensor:
        """``[B, ...]`` → ``[B, ways]`` logits (or ``[B, outputs]`` predictions) under ``fast``."""
        z = functional_call(module_for_thread(self.backbone), sub_params(fast, "backbone."), (x,))
        return z @ fast["head.weight"].T + fast["head.bias"]

    def query_outputs(self, fast: Params, support_x: torch.Tensor, query_x: torch.Tensor) -> torch.Tensor:
        """The adapted model's outputs for one task's queries ``[M, ...]``. With ``query_stats='support'``
        (the default) batch-statistics norms take the support's statistics (under the adapted
        weights), as a prediction does, so each query's output depends on the support and itself
        only; ``'batch'`` normalises the queries by their own batch (MAML's original, transductive)."""
        if self.query_stats == "batch":
            return self.forward_fast(fast, query_x)
        return self.with_support_stats(fast, support_x, query_x)

    def loss_fn(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out, y) if self.task == "classification" else F.mse_loss(out, y)

    def score(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Accuracy (classification) or mean squared error (regression) of one task."""
        if self.task == "classification":
            return (out.argmax(-1) == y).float().mean()
        return F.mse_loss(out, y)

    @property
    def metric_name(self) -> str:
        return "acc" if self.task == "classification" else "mse"

    def inner_loop(self, params: Params, sx: torch.Tensor, sy: torch.Tensor, ways: int, steps: int, create_graph: bool,
                   every_step: bool = False) -> Params | list[Params]:
        """The fast weights after ``steps`` SGD steps on the support ``sx [S, ...]``, ``sy [S]``
        (``every_step``: the list of them after each step)."""
        fast = self.task_init(params, ways, sx, sy)
        keys = list(fast)
        lrs: dict = {}

        def step(*weights: torch.Tensor) -> tuple[torch.Tensor, ...]:
            # under bf16 autocast (train.precision) the support pass stays fp32: the fast weights
            # are then computed as at test time, and only the query pass runs in bfloat16
            with torch.autocast(sx.device.type, enabled=False):
                current = dict(zip(keys, weights))
                loss = self.loss_fn(self.forward_fast(current, sx), sy)
                grads = torch.autograd.grad(loss, weights, create_graph=create_graph)
                return tuple(w - lrs[k] * g for k, w, g in zip(keys, weights, grads))

        weights, trail = tuple(fast.values()), []
        for i in range(steps):
            lrs = self.inner_lrs(params, i)
            if self.checkpoint_inner and create_graph and torch.is_grad_enabled() and not self.learned_step_sizes:
                # keep only each step's fast weights; recompute its graph during the meta-backward
                weights = checkpoint(step, *weights, use_reentrant=False)
            else:
                weights = step(*weights)
            if every_step:
                trail.append(dict(zip(keys, weights)))
        return trail if every_step else dict(zip(keys, weights))

    def task_query_loss(self, params: Params, sx, sy, qx, qy, ways: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One task's outer loss and score: the query loss of the adapted weights (with MSL, the
        weighted query losses after each inner step; the score is the last step's)."""
        weights = self.step_loss_weights(self.inner_steps)
        trail = self.inner_loop(params, sx, sy, ways, self.inner_steps, self.second_order_now(), every_step=True)
        loss = 0.0
        for w, fast in zip(weights, trail):
            if w > 0:
                out = self.query_outputs(fast, sx, qx)
                loss = loss + w * self.loss_fn(out, qy)
        return loss, self.score(out.detach(), qy)

    def execution_for(self, device: torch.device) -> str:
        """The execution ``auto`` resolves to on ``device``."""
        if self.execution != "auto":
            return self.execution
        # measured on 2 CPU cores (conv4, 5w1s, 16 tasks): loop 1.0x, grouped 0.2-0.45x, vmap ~0.4x
        return "loop" if device.type == "cpu" else "vmap"

    # -- the interface ----------------------------------------------------------------------
    def meta_loss(self, params: Params, batch: Episodes):
        execution = self.execution_for(batch.support_x.device)
        if execution == "vmap":
            with plain_norm_ops():
                losses, scores = self._vmapped_losses(params, batch)
        elif execution == "grouped":
            losses, scores = self._grouped_losses(params, batch)
        else:
            losses, scores = [], []
            for t in range(batch.tasks):
                loss, score = self.task_query_loss(params, batch.support_x[t], batch.support_y[t], batch.query_x[t],
                                                   batch.query_y[t], batch.ways)
                losses.append(loss)
                scores.append(score)
            losses, scores = torch.stack(losses), torch.stack(scores)
        loss = losses.mean()
        return loss, {"loss": loss.item(), self.metric_name: scores.mean().item()}

    def meta_backward(self, params: Params, batch: Episodes):
        """Loop execution back-propagates each task's query loss as soon as it is computed, so
        memory holds one task's graph (not the meta-batch's); on CPU the tasks run side by side on
        :attr:`task_threads` threads. The gradients are the same."""
        if self.execution_for(batch.support_x.device) != "loop":
            return super().meta_backward(params, batch)
        def task_loss(t: int):
            return self.task_query_loss(params, batch.support_x[t], batch.support_y[t], batch.query_x[t],
                                        batch.query_y[t], batch.ways)

        workers = self.task_workers(batch, buffers_passed=False)
        results = per_task_backward(task_loss, batch.tasks, workers, self.trainable(), [self.backbone])
        self.drop_invariant_grads()
        loss = torch.stack([r[0] for r in results]).mean()
        return loss, {"loss": loss.item(), self.metric_name: torch.stack([r[1] for r in results]).mean().item()}

    # -- the grouped fast path ---------------------------------------------------------------
    def forward_grouped(self, fast: Params, x: torch.Tensor) -> torch.Tensor:
        """``x [T, B, ...]`` under per-task weights ``fast[k] [T, ...]`` → ``[T, B, ways]``."""
        z = grouped_features(self.backbone, fast, x)
        return torch.baddbmm(fast["head.bias"][:, None, :], z, fast["head.weight"].transpose(1, 2))

    def task_losses(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-task loss ``[T]`` of ``[T, B, ...]`` outputs."""
        if self.task == "classification":
            return F.cross_entropy(out.flatten(0, 1), y.flatten(), reduction="none").view(y.shape).mean(1)
        return (out - y).pow(2).flatten(1).mean(1)

    def task_scores(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.task == "classification":
            return (out.argmax(-1) == y).float().mean(1)
        return (out - y).pow(2).flatten(1).mean(1)

    def grouped_inner_loop(self, params: Params, sx: torch.Tensor, sy: torch.Tensor, ways: int, steps: int,
                           create_graph: bool) -> list[Params]:
        """Every task's adapted weights ``[T, ...]`` after each of ``steps`` SGD steps, in one pass per step."""
        t = sx.shape[0]
        fast = {k: v.unsqueeze(0).expand(t, *v.shape) for k, v in self.task_init(params, ways).items()}
        trail = []
        for i in range(steps):
            lrs = self.inner_lrs(params, i)
            loss = self.task_losses(self.forward_grouped(fast, sx), sy).sum()
            grads = torch.autograd.grad(loss, list(fast.values()), create_graph=create_graph)
            fast = {k: w - lrs[k] * g for (k, w), g in zip(fast.items(), grads)}
            trail.append(fast)
        return trail

    def _grouped_losses(self, params: Params, batch: Episodes):
        trail = self.grouped_inner_loop(params, batch.support_x, batch.support_y, batch.ways, self.inner_steps,
                                        create_graph=self.second_order_now())
        losses = 0.0
        for w, fast in zip(self.step_loss_weights(self.inner_steps), trail):
            if w == 0:
                continue
            if self.query_stats == "batch":
                out = self.forward_grouped(fast, batch.query_x)
            else:
                n = batch.support_x.shape[1]
                with reference_rows(n):
                    out = self.forward_grouped(fast, torch.cat([batch.support_x, batch.query_x], 1))[:, n:]
            losses = losses + w * self.task_losses(out, batch.query_y)
        return losses, self.task_scores(out.detach(), batch.query_y)

    def _vmapped_losses(self, params: Params, batch: Episodes):
        ways, steps, first_order = batch.ways, self.inner_steps, not self.second_order_now()
        weights = self.step_loss_weights(steps)

        def support_loss(fast, sx, sy):
            return self.loss_fn(self.forward_fast(fast, sx), sy)

        def task(sx, sy, qx, qy):
            fast, loss = self.task_init(params, ways, sx, sy), 0.0
            for i in range(steps):
                lrs = self.inner_lrs(params, i)
                g = grad(support_loss)(fast, sx, sy)
                if first_order:
                    g = {k: v.detach() for k, v in g.items()}
                fast = {k: w - lrs[k] * g[k] for k, w in fast.items()}
                if weights[i] > 0:
                    out = self.query_outputs(fast, sx, qx)
                    loss = loss + weights[i] * self.loss_fn(out, qy)
            return loss, self.score(out.detach(), qy)

        return vmap(task, randomness="different")(batch.support_x, batch.support_y, batch.query_x, batch.query_y)

    def adapt(self, params: Params, support_x, support_y, ways: int, steps: int | None = None) -> Predictor:
        check_task(support_x, support_y, ways)
        detached = {k: v.detach().requires_grad_() for k, v in params.items()}
        with torch.enable_grad():
            fast = self.inner_loop(detached, support_x, support_y, ways, steps or self.test_inner_steps, create_graph=False)
        fast = {k: v.detach() for k, v in fast.items()}
        support = support_x.detach()
        # batch-statistics norms take the support's statistics, fixed at adaptation (whatever
        # query_stats trained with): an input's scores depend on it and the adapted model only
        return Predictor(lambda x: self.with_support_stats(fast, support, x), fast)

    def with_support_stats(self, fast: Params, support_x: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Outputs for ``x`` with every batch-statistics norm taking ``support_x``'s statistics."""
        if not any(isinstance(m, BatchStatNorm) for m in self.backbone.modules()):
            return self.forward_fast(fast, x)
        n = len(support_x)
        with reference_rows(n):
            return self.forward_fast(fast, torch.cat([support_x, x.to(support_x.dtype)]))[n:]


def first_order_maml(backbone: nn.Module, **kwargs) -> MAML:
    return MAML(backbone, first_order=True, **kwargs)
