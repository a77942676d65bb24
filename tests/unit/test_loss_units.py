"""dtrain/loss.py without processes: counting rules, HF detection, StepLoss arithmetic with a fake
comm standing in for the other ranks; and the derived seeds of ``train.seed``."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from dtrain.engine import derived_seed
from dtrain.loss import StepLoss, is_hf_causal_lm, model_loss, takes_num_items_in_batch, valid_tokens


class FakeComm:
    """A group of ``size`` ranks whose other members hold ``others`` valid tokens in total."""

    def __init__(self, size: int, others: int) -> None:
        self._size, self.others, self.calls = size, others, 0

    def size(self, level: str) -> int:
        return self._size

    def all_reduce(self, tensor: torch.Tensor, level: str = "global", async_op: bool = False):
        self.calls += 1
        tensor += self.others
        return type("Done", (), {"wait": lambda self: None})()


def test_counting_rules():
    labels = torch.tensor([[1, 2, -100], [-100, -100, 3]])
    assert int(valid_tokens({"labels": labels})) == 3
    assert int(valid_tokens({"labels": labels}, shifted=True)) == 2  # columns 1.. only
    assert int(valid_tokens({"labels": labels, "loss_mask": torch.tensor([[1, 0, 0], [0, 0, 0]])})) == 1
    assert valid_tokens({"input_ids": labels}) is None and valid_tokens((labels, labels)) is None


def test_hf_detection_by_class_not_import():
    PreTrainedModel = type("PreTrainedModel", (nn.Module,), {"__module__": "transformers.modeling_utils",
                                                             "loss_function": None})
    causal = type("GPT2LMHeadModel", (PreTrainedModel,), {"forward": lambda self, input_ids=None, **kw: None})
    classifier = type("BertForSequenceClassification", (PreTrainedModel,), {})
    assert is_hf_causal_lm(causal()) and not is_hf_causal_lm(classifier())
    assert takes_num_items_in_batch(causal())
    assert not is_hf_causal_lm(nn.Linear(2, 2)) and not takes_num_items_in_batch(nn.Linear(2, 2))


def test_tokens_weights_are_sum_over_global_count():
    """Rank holds micro-batches of 3 and 1 valid tokens, the other rank 4: N = 8, P = 2."""
    micro = [{"labels": torch.tensor([1, 2, 3, -100])}, {"labels": torch.tensor([-100, 5, -100, -100])}]
    comm = FakeComm(2, others=4)
    losses = StepLoss("tokens", micro, comm, "global", torch.device("cpu"))
    assert comm.calls == 1 and losses.known_up_front
    means = [torch.tensor(2.0), torch.tensor(6.0)]  # per-token means of the two micro-batches
    objectives = [losses.objective(i, m) for i, m in enumerate(means)]
    # S = 2*3 = 6 and 6*1 = 6; objective = S * P / N
    assert [float(o) for o in objectives] == pytest.approx([6 * 2 / 8, 6 * 2 / 8])
    assert losses.finish() == 1.0
    assert float(losses.local_loss()) == pytest.approx((6 + 6) * 2 / 8)  # mean over 2 ranks -> / 2


def test_deferred_pairs_and_empty_micro_batch():
    comm = FakeComm(2, others=5)
    losses = StepLoss("tokens", [{"x": 1}, {"x": 2}], comm, "global", torch.device("cpu"))
    assert comm.calls == 0 and not losses.known_up_front  # no labels: counts come from loss_fn
    objective = losses.objective(0, torch.tensor(9.0), torch.tensor(3))
    assert float(objective) == 18.0  # S * P, scaled by 1 / N in finish
    losses.objective(1, torch.tensor(0.0), torch.tensor(0))
    assert losses.finish() == pytest.approx(1 / 8) and float(losses.local_loss()) == pytest.approx(9 * 2 / 8)
    empty = StepLoss("tokens", [{"labels": torch.tensor([-100])}], FakeComm(1, 0), "global", torch.device("cpu"))
    with pytest.raises(ValueError, match="no valid token"):
        empty.objective(0, torch.tensor(float("nan")))


def test_batch_mode_is_the_mean_of_micro_batch_losses():
    losses = StepLoss("batch", [{}, {}], FakeComm(2, 0), "global", torch.device("cpu"))
    assert float(losses.objective(0, torch.tensor(4.0))) == 2.0
    losses.objective(1, torch.tensor(3.0))
    assert float(losses.local_loss()) == pytest.approx((4 + 3) / 2) and losses.finish() == 1.0
    pairs = StepLoss("batch", [{}, {}], FakeComm(2, 0), "global", torch.device("cpu"))
    assert float(pairs.objective(0, torch.tensor(6.0), torch.tensor(2))) == 1.5  # a pair counts as its mean
    with pytest.raises(TypeError, match="same form"):
        pairs.objective(1, torch.tensor(3.0))


def test_loss_fn_pairs_and_errors():
    loss, n = model_loss(None, None, lambda out, b: (torch.tensor(5.0), 4))
    assert float(loss) == 5.0 and int(n) == 4
    with pytest.raises(TypeError, match="not a loss"):
        model_loss(object(), None, None)


def test_derived_seeds_are_stable_and_distinct():
    assert derived_seed(0, 0) == derived_seed(0, 0) < 2**63
    assert len({derived_seed(s, r) for s in range(3) for r in range(3)}) == 9
