"""tensor_importance: the paper's loss-reduction measure, with the model and the training optimizer left
exactly as they were."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils.flop_counter import FlopCounterMode

from greencore import importance_flops, profile_model, tensor_importance, tentative_optimizer_factory
from greencore.importance import Spill, importance_pass
from tests.tiny_models import batch_for, tiny_model

BATCH, SEQ = 2, 16


def bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bit pattern (equal floats such as 0.0 and -0.0 differ here)."""
    return t.detach().reshape(-1).contiguous().view(torch.uint8).clone()


def adamw(lr: float = 1e-2):
    return lambda params: torch.optim.AdamW(params, lr=lr)


def trained_llama() -> tuple[torch.nn.Module, torch.optim.Optimizer, list[dict]]:
    """A tiny Llama after three real AdamW steps, with gradients of a fourth batch left in .grad."""
    model = tiny_model("llama")
    batches = [batch_for(model, BATCH, SEQ, seed=s) for s in range(4)]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for batch in batches[:3]:
        opt.zero_grad()
        model(**batch).loss.backward()
        opt.step()
    opt.zero_grad()
    model(**batches[3]).loss.backward()
    return model, opt, batches


def test_model_and_training_optimizer_are_left_exactly_as_they_were() -> None:
    model, opt, batches = trained_llama()
    frozen = "model.layers.0.mlp.up_proj.weight"
    params = dict(model.named_parameters())
    params[frozen].requires_grad_(False)
    model.train()
    weights = {n: bits(p) for n, p in params.items()}
    grads = {n: p.grad for n, p in params.items()}
    grad_bits = {n: bits(g) for n, g in grads.items()}
    state = copy.deepcopy(opt.state_dict())

    scores = tensor_importance(model, batches[:2], adamw())

    assert set(scores) == {
        n for n, p in params.items() if p.requires_grad
    }  # the frozen one is not a candidate
    assert all(isinstance(v, float) for v in scores.values()) and any(v != 0.0 for v in scores.values())
    assert model.training
    for n, p in model.named_parameters():
        assert torch.equal(bits(p), weights[n]), f"{n} changed"
        assert p.grad is grads[n] and torch.equal(bits(p.grad), grad_bits[n]), f"{n}.grad changed"
        assert p.requires_grad == (n != frozen)
    after = opt.state_dict()
    assert after["param_groups"] == state["param_groups"]
    assert after["state"].keys() == state["state"].keys()
    for key, entry in state["state"].items():
        for field, value in entry.items():
            assert torch.equal(bits(after["state"][key][field]), bits(value)), (
                f"optimizer state {key}.{field}"
            )


def test_eval_mode_is_kept_and_none_gradients_stay_none() -> None:
    model = tiny_model("gpt2")
    model.eval()
    batches = [batch_for(model, BATCH, SEQ)]
    scores = tensor_importance(model, batches, adamw())
    assert not model.training
    assert all(p.grad is None for p in model.parameters())
    # A tied weight appears once, under the name named_parameters() gives it.
    assert "lm_head.weight" not in scores and "transformer.wte.weight" in scores
    assert len(scores) == len(list(model.parameters()))


def test_only_candidates_are_trainable_stepped_and_copied(monkeypatch: pytest.MonkeyPatch) -> None:
    model, _, batches = trained_llama()
    names = [
        "model.layers.1.self_attn.k_proj.weight",
        "model.layers.1.mlp.down_proj.weight",
        "lm_head.weight",
    ]
    params = dict(model.named_parameters())
    pointers = {p.data_ptr(): n for n, p in params.items()}
    seen: dict[str, list] = {"params": [], "trainable": []}

    def factory(ps):
        # One tensor per tentative optimizer: its state never exists for every candidate at once.
        assert len(ps) == 1
        seen["params"] += list(ps)
        seen["trainable"].append({n for n, p in params.items() if p.requires_grad})
        return torch.optim.SGD(ps, lr=1e-2)

    class CloneSpy(TorchFunctionMode):
        """Notes which parameters are cloned (the saved copies of the weights)."""

        cloned: list[tuple[str, torch.device]] = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func is torch.Tensor.clone and args[0].data_ptr() in pointers:
                self.cloned.append((pointers[args[0].data_ptr()], out.device))
            return out

    with CloneSpy() as spy:  # kept where the model is: copies of the candidates' weights
        scores = importance_pass(model, batches[:1], factory, names=names, offload=False).scores
    assert set(scores) == set(names)
    assert [id(p) for p in seen["params"]] == [id(params[n]) for n in names]
    assert all(trainable == set(names) for trainable in seen["trainable"])
    assert sorted(n for n, _ in spy.cloned) == sorted(names)
    assert all(device == params[n].device for n, device in spy.cloned)

    # By default on a CPU the copies are spilled to a file, the candidates' weights and first gradients only.
    spilled: list[str] = []
    put = Spill.put

    def spy_put(self, t):
        spilled.append(pointers.get(t.data_ptr(), "gradient"))
        return put(self, t)

    monkeypatch.setattr(Spill, "put", spy_put)
    seen["params"].clear()
    assert importance_pass(model, batches[:1], factory, names=names).scores == scores
    assert sorted(n for n in spilled if n != "gradient") == sorted(names)
    assert spilled.count("gradient") == len(names)


def test_importance_agrees_with_the_loss_change_of_undoing_each_update() -> None:
    # With a small SGD step in double precision (where the trapezoid rule and the paper's first-order reading
    # agree), undoing tensor k's update alone must raise the loss by I_k, and undoing all of them by their
    # sum.
    model = tiny_model("llama").double()
    model.eval()
    batches = [batch_for(model, BATCH, SEQ, seed=s) for s in range(2)]
    lr = 1e-3

    def loss() -> float:
        with torch.no_grad():
            return sum(float(model(**b).loss) for b in batches) / len(batches)

    scores = tensor_importance(model, batches, lambda ps: torch.optim.SGD(ps, lr=lr))
    params = dict(model.named_parameters())
    old = {n: p.detach().clone() for n, p in params.items()}
    model.zero_grad()
    for b in batches:
        (model(**b).loss / len(batches)).backward()
    with torch.no_grad():
        for p in params.values():
            p -= lr * p.grad
    new_loss = loss()
    top = sorted(scores, key=lambda n: -abs(scores[n]))[:4]
    for name in top:
        p = params[name]
        stepped = p.detach().clone()
        with torch.no_grad():
            p.copy_(old[name])
            undo = loss() - new_loss
            p.copy_(stepped)
        assert undo == pytest.approx(scores[name], rel=0.05), name
        assert (undo > 0) == (scores[name] > 0)
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(old[n])
    assert loss() - new_loss == pytest.approx(sum(scores.values()), rel=0.05)


def test_non_finite_importance_is_reported_as_zero_and_weights_restored() -> None:
    model = tiny_model("llama")
    weights = {n: bits(p) for n, p in model.named_parameters()}
    batches = [batch_for(model, BATCH, SEQ)]
    with pytest.warns(RuntimeWarning, match="not finite"):
        scores = tensor_importance(model, batches, lambda ps: torch.optim.SGD(ps, lr=float("inf")))
    assert scores and all(v == 0.0 for v in scores.values())
    for n, p in model.named_parameters():
        assert torch.equal(bits(p), weights[n])


def test_importance_flops_equal_what_the_passes_cost() -> None:
    model = tiny_model("llama")
    batches = [batch_for(model, BATCH, SEQ, seed=s) for s in range(3)]
    profile = profile_model(model, BATCH, SEQ)
    names = ["model.layers.1.self_attn.q_proj.weight", "model.layers.1.mlp.gate_proj.weight"]
    with FlopCounterMode(display=False) as counter:
        tensor_importance(model, batches, adamw(), names=names)
    predicted = importance_flops(profile, names, len(batches))
    assert predicted == profile.step_flops(names).scaled(6)
    assert predicted.total == counter.get_total_flops()
    assert importance_flops(profile, [], 3).total == 0


def test_bad_arguments() -> None:
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="at least one batch"):
        tensor_importance(model, [], adamw())
    with pytest.raises(KeyError, match="not parameters"):
        tensor_importance(model, [batch_for(model, BATCH, SEQ)], adamw(), names=["no.such.weight"])
    unlabeled = {k: v for k, v in batch_for(model, BATCH, SEQ).items() if k != "labels"}
    weights = {n: bits(p) for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="labels"):
        tensor_importance(model, [unlabeled], adamw())
    for n, p in model.named_parameters():
        assert torch.equal(bits(p), weights[n]) and p.requires_grad and p.grad is None


class _Regression(torch.nn.Module):
    """Least squares: a loss exactly quadratic in the weight and the bias."""

    def __init__(self, w: torch.Tensor, b: float) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(w.numel(), 1).double()
        with torch.no_grad():
            self.linear.weight.copy_(w.reshape(1, -1))
            self.linear.bias.fill_(b)

    def forward(self, x: torch.Tensor, y: torch.Tensor):
        return type("Out", (), {"loss": ((self.linear(x).squeeze(-1) - y) ** 2).mean()})()


def test_an_update_that_passes_the_minimum_still_counts_as_the_loss_it_saved() -> None:
    # Every weight 0.1 from its optimum (orthonormal inputs: the loss is a sum of independent parabolas); a
    # fresh AdamW's first step moves each by lr = 0.15 toward it, ending 0.05 past it: the loss falls to a
    # quarter. The gradient at the new weights points back, so the paper's first-order reading -g1.dw calls
    # every update harmful; the trapezoid rule recovers each tensor's share of the drop exactly (the loss is
    # quadratic).
    torch.manual_seed(0)
    x = torch.linalg.qr(torch.randn(64, 8, dtype=torch.float64))[0] * 8  # x^T x / 64 = I
    w_star = torch.randn(8, dtype=torch.float64)
    batch = {"x": x, "y": x @ w_star + 0.3}
    model = _Regression(w_star + 0.1, 0.3 + 0.1)
    step = lambda ps: torch.optim.AdamW(ps, lr=0.15, weight_decay=0.0)  # noqa: E731

    def loss() -> float:
        with torch.no_grad():
            return float(model(**batch).loss)

    before = loss()
    trapezoid = tensor_importance(model, [batch], step)
    first_order = tensor_importance(model, [batch], step, rule="first_order")
    assert loss() == before  # put back
    stepped = copy.deepcopy(model)
    stepped.zero_grad()
    stepped(**batch).loss.backward()
    step(list(stepped.parameters())).step()
    with torch.no_grad():
        after = float(stepped(**batch).loss)
    assert after < before / 2
    assert all(v < 0 for v in first_order.values())
    assert all(v > 0 for v in trapezoid.values())
    assert sum(trapezoid.values()) == pytest.approx(before - after, rel=1e-6)  # the update is read in float32
    with pytest.raises(ValueError):
        tensor_importance(model, [batch], step, rule="second_order")


def test_the_tentative_step_is_the_training_optimizers_next_step() -> None:
    model, opt, batches = trained_llama()
    for group in opt.param_groups:
        group["lr"] = 5e-4  # as a scheduler sets it for the next step: half the peak
    state = copy.deepcopy(opt.state_dict())
    names = ["model.layers.1.mlp.down_proj.weight", "lm_head.weight", "model.norm.weight"]
    params = dict(model.named_parameters())
    chosen = [params[n] for n in names if n in params]
    grads = [p.grad.clone() for p in chosen]

    twin = copy.deepcopy((model, opt))
    twin_params = dict(twin[0].named_parameters())
    for (
        n,
        p,
    ) in twin_params.items():  # the twin's optimizer steps only the chosen tensors, with their gradients
        p.grad = params[n].grad.clone() if n in names else None
    twin[1].step()

    tentative = tentative_optimizer_factory(opt)(chosen)
    assert all(g["lr"] == opt.param_groups[0]["lr"] == 5e-4 for g in tentative.param_groups)
    tentative.step()
    for n, p in zip([n for n in names if n in params], chosen, strict=True):
        assert torch.equal(p, twin_params[n]), n  # the same update, moments and step count included
    for p, g in zip(chosen, grads, strict=True):
        assert torch.equal(p.grad, g)
    assert str(opt.state_dict()) == str(state)  # the training optimizer is untouched


def test_the_pass_returns_the_first_gradients_and_loss_at_the_weights_as_they_were() -> None:
    # The trainer takes the epoch's first step from them: they must be those of the mean loss at the old
    # weights, for exactly the candidates, whatever the tentative step did afterwards.
    model, _, batches = trained_llama()
    names = ["model.layers.1.self_attn.v_proj.weight", "lm_head.weight", "model.norm.weight"]
    reference = copy.deepcopy(model)
    result = importance_pass(model, batches[:2], adamw(lr=0.1), names=names)

    assert set(result.scores) == set(result.gradients) == set(names)
    reference.eval()
    for n, p in reference.named_parameters():
        p.requires_grad_(n in names)
        p.grad = None
    losses = [reference(**b).loss for b in batches[:2]]
    (sum(losses) / 2).backward()
    assert result.loss == pytest.approx(float(sum(losses) / 2), rel=1e-6)
    for n, p in reference.named_parameters():
        if n in names:
            torch.testing.assert_close(result.gradients[n], p.grad, msg=n)


def test_offloaded_pass_gives_the_same_scores_and_gradients_and_keeps_its_copies_off_the_device() -> None:
    # offload keeps the saved weights and g0 off the model's memory (on CUDA in host memory, on a CPU in a
    # spill file): the same arithmetic, so the same bits; the tracker sees them nowhere.
    from greencore.importance import importance_pass
    from greencore.memory import LiveStorages

    model, opt, batches = trained_llama()
    names = [n for n, _ in model.named_parameters()][-6:]
    weights = {n: bits(p) for n, p in model.named_parameters()}
    results, peaks = [], []
    for offload in (False, True):
        opt.zero_grad(set_to_none=True)
        tracker = LiveStorages()
        tracker.add([*model.parameters(), *[v for s in opt.state.values() for v in s.values()]])
        with tracker:
            results.append(importance_pass(model, batches[:1], adamw(), names=names, offload=offload))
        peaks.append(tracker.peak_bytes)
        for n, p in model.named_parameters():
            assert torch.equal(bits(p), weights[n]), n
    kept, offloaded = results
    assert kept.scores == offloaded.scores and kept.loss == offloaded.loss
    assert kept.gradients.keys() == offloaded.gradients.keys()
    assert all(torch.equal(kept.gradients[n], offloaded.gradients[n]) for n in names)
    candidate_bytes = sum(p.numel() * 4 for n, p in model.named_parameters() if n in names)
    assert peaks[1] <= peaks[0] - candidate_bytes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64, torch.bool])
def test_a_spill_gives_back_every_tensor_bit_for_bit(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    tensors = [
        (torch.randn(7, 5, generator=gen) * 1e3).to(dtype),
        (torch.randn(4, 6, generator=gen) * 1e3).to(dtype).t(),  # not contiguous
        torch.tensor(3.5).to(dtype),  # 0-dim
        torch.empty(0, 3, dtype=dtype),
    ]
    spill = Spill()
    where = [spill.put(t) for t in tensors]
    for t, w in zip(tensors, where, strict=True):
        back = spill.get(w)
        assert back.dtype == t.dtype and back.shape == t.shape
        assert torch.equal(back, t)


def test_importance_on_part_of_a_batch_costs_what_the_plan_predicts() -> None:
    # importance_rows: the pass runs on the first rows of the epoch's importance batch, padded to their own
    # longest; the run budgets it as the profile of that shape, which must be what FlopCounterMode counts.
    from greencore.data import Encoded, collate
    from greencore.plan import ShapeProfiles, plan_epoch
    from greencore.spec import Hyperparameters

    model = tiny_model("llama")
    gen = torch.Generator().manual_seed(0)
    ids = [
        torch.randint(3, 90, (int(n),), generator=gen).tolist()
        for n in torch.randint(5, 40, (24,), generator=gen)
    ]
    data = Encoded("causal_lm", ids, [list(row) for row in ids], 0, 0)
    hp = Hyperparameters(batch_size=8, max_seq_len=64, importance_rows=3)
    plan = plan_epoch(data, hp, 0, 1)
    (rows,) = plan.importance_rows
    assert rows == plan.batches[0][:3] and plan.importance_shapes[0][0] == 3
    assert not plan.first_step_from_importance  # a part of a batch is not its training step
    batch = collate(data, rows, 0, hp.max_seq_len)
    assert tuple(batch["input_ids"].shape) == plan.importance_shapes[0]
    names = ["model.layers.1.self_attn.v_proj.weight", "model.norm.weight", "lm_head.weight"]
    with FlopCounterMode(display=False) as counter:
        importance_pass(model, [batch], adamw(), names=names)
    predicted = importance_flops(ShapeProfiles(model).steps(plan.importance_shapes), names, 1)
    assert predicted.total == counter.get_total_flops() > 0
    whole = importance_flops(ShapeProfiles(model).steps(plan.shapes[:1]), names, 1)
    assert predicted.total < whole.total / 2
