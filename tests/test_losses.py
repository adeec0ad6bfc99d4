"""SFT, DPO and IOPO losses of iopo.py: hand-computed cases, the official form, ln 2 at the start, metrics."""

import math

import pytest
import torch
import torch.nn.functional as F

import iopo

LN2 = math.log(2)
NAMES = ("logp_y1_x1", "logp_y2_x1", "logp_y2_x2", "logp_y1_x2",
         "ref_logp_y1_x1", "ref_logp_y2_x1", "ref_logp_y2_x2", "ref_logp_y1_x2")


def _random_quads(seed, batch=6):
    g = torch.Generator().manual_seed(seed)
    return {name: -50 * torch.rand(batch, generator=g, dtype=torch.float64) for name in NAMES}


def _hand_quads():
    """r11 = 2, r12 = -1, r22 = 1, r21 = -2 (policy minus reference), one example."""
    values = dict(logp_y1_x1=-10.0, ref_logp_y1_x1=-12.0, logp_y2_x1=-20.0, ref_logp_y2_x1=-19.0,
                  logp_y2_x2=-8.0, ref_logp_y2_x2=-9.0, logp_y1_x2=-15.0, ref_logp_y1_x2=-13.0)
    return {k: torch.tensor([v]) for k, v in values.items()}


def test_sft_loss_with_nothing_scored_is_zero():
    """A mask with no scored token gives a loss of 0.0 (the count is clamped to 1), not 0 / 0 = NaN."""
    loss, _ = iopo.sft_loss(torch.tensor([[-1.0, -3.0]]), torch.zeros(1, 2, dtype=torch.bool))
    assert loss.item() == 0.0, f"sft loss over no tokens {loss.item()}, expected 0.0"


def test_sft_loss_by_hand():
    """SFT = mean NLL over masked-in tokens: -(-1 - 3 - 2) / 3 = 2; over a given count of 4 (another process's
    token too), 6 / 4 = 1.5."""
    token_logps = torch.tensor([[-1.0, -3.0, -7.0], [-2.0, 0.0, -5.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    loss, metrics = iopo.sft_loss(token_logps, mask)
    assert metrics == {}, metrics
    assert abs(loss.item() - 2.0) < 1e-6, f"sft loss {loss.item()}, expected 2.0"
    loss, _ = iopo.sft_loss(token_logps, mask.bool(), n_tokens=torch.tensor(4.0))
    assert abs(loss.item() - 1.5) < 1e-6, f"sft loss over 4 tokens {loss.item()}, expected 1.5"


def test_dpo_by_hand():
    """r_w = 1, r_l = -1, beta = 0.1: loss = log(1 + exp(-0.2)) = 0.5981388694; margin 0.2; accuracy 1."""
    loss, m = iopo.dpo_loss(torch.tensor([-10.0]), torch.tensor([-12.0]), torch.tensor([-11.0]),
                            torch.tensor([-11.0]), beta=0.1)
    assert abs(loss.item() - 0.5981388694) < 1e-6, f"dpo loss {loss.item()}"
    assert abs(m["margins"].item() - 0.2) < 1e-6 and m["accuracy"].item() == 1.0, m
    assert abs(m["rewards/chosen"].item() - 0.1) < 1e-6 and abs(m["rewards/rejected"].item() + 0.1) < 1e-6, m


@pytest.mark.parametrize("variant, expected", [
    ("full", 0.4374879505),  # z = 0.1 * (2 + 1 - (-1) - (-2)) = 0.6; log(1 + e^-0.6)
    ("no_input_pref", 0.5543552445),  # r11 - r12 = 3 and r22 - r21 = 3: both log(1 + e^-0.3)
    ("no_output_pref", 0.5555770609),  # r11 - r21 = 4, r22 - r12 = 2: (log(1 + e^-0.4) + log(1 + e^-0.2)) / 2
    ("three_seq", 0.4031860489),  # 2 r11 - r12 - r21 = 7: log(1 + e^-0.7)
])
def test_iopo_by_hand(variant, expected):
    """Each IOPO variant on r11 = 2, r12 = -1, r22 = 1, r21 = -2, beta = 0.1, against numbers worked out by hand."""
    loss, m = iopo.iopo_loss(**_hand_quads(), beta=0.1, variant=variant)
    assert abs(loss.item() - expected) < 1e-6, f"{variant}: loss {loss.item()}, expected {expected}"
    assert m["accuracy/output"].item() == 1.0 and m["accuracy/input"].item() == 1.0, m


def test_iopo_metrics_by_hand():
    """Rewards are beta * r; accuracies count r11 > r12, r22 > r21 (output) and r11 > r21, r22 > r12 (input)."""
    quads = _hand_quads()
    quads["logp_y2_x2"] = torch.tensor([-11.0])  # r22 = -2: ties with r21 and falls below r12
    _, m = iopo.iopo_loss(**quads, beta=0.1)
    expected = {"rewards/y1_x1": 0.2, "rewards/y2_x1": -0.1, "rewards/y2_x2": -0.2, "rewards/y1_x2": -0.2,
                "margins/output_x1": 0.3, "margins/output_x2": 0.0, "margins/input_y1": 0.4,
                "margins/input_y2": -0.1, "accuracy/output": 0.5, "accuracy/input": 0.5}
    for key, value in expected.items():
        assert abs(m[key].item() - value) < 1e-6, f"{key}: {m[key].item()}, expected {value}"
    assert all(t.dtype == torch.float32 and not t.requires_grad for t in m.values()), m


def test_iopo_equals_official_form():
    """The paper-grouped IOPO equals the authors' 0.5 * ((2L11 - L12 - L21) - ref + (2L22 - L21 - L12) - ref)."""
    q = _random_quads(seed=0)
    L = {k: q[f"logp_{k}"] for k in ("y1_x1", "y2_x1", "y2_x2", "y1_x2")}
    R = {k: q[f"ref_logp_{k}"] for k in ("y1_x1", "y2_x1", "y2_x2", "y1_x2")}
    official_logits = 0.5 * ((2 * L["y1_x1"] - L["y2_x1"] - L["y1_x2"]) - (2 * R["y1_x1"] - R["y2_x1"] - R["y1_x2"])
                             + (2 * L["y2_x2"] - L["y1_x2"] - L["y2_x1"]) - (2 * R["y2_x2"] - R["y1_x2"] - R["y2_x1"]))
    official = -F.logsigmoid(0.1 * official_logits).mean()
    ours, _ = iopo.iopo_loss(**q, beta=0.1)
    assert abs(ours.item() - official.item()) < 1e-12, f"ours {ours.item()} vs official {official.item()}"


def test_output_only_ablation_is_dpo_on_both_prompts():
    """no_input_pref equals the mean of DPO on (x1: y1 > y2) and on (x2: y2 > y1)."""
    q = _random_quads(seed=1)
    ours, _ = iopo.iopo_loss(**q, beta=0.3, variant="no_input_pref")
    dpo_x1, _ = iopo.dpo_loss(q["logp_y1_x1"], q["logp_y2_x1"], q["ref_logp_y1_x1"], q["ref_logp_y2_x1"], beta=0.3)
    dpo_x2, _ = iopo.dpo_loss(q["logp_y2_x2"], q["logp_y1_x2"], q["ref_logp_y2_x2"], q["ref_logp_y1_x2"], beta=0.3)
    assert abs(ours.item() - (dpo_x1 + dpo_x2).item() / 2) < 1e-12, f"{ours.item()} vs {(dpo_x1 + dpo_x2).item() / 2}"


def test_policy_equal_to_reference_gives_ln2():
    """When the policy is the reference every loss (DPO and each IOPO variant) is ln 2."""
    logps = -30 * torch.rand(5, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    loss, _ = iopo.dpo_loss(logps, logps.flip(0), logps, logps.flip(0))
    assert abs(loss.item() - LN2) < 1e-12, f"dpo {loss.item()} vs ln 2 {LN2}"
    q = _random_quads(seed=3)
    for name in NAMES[:4]:
        q[f"ref_{name}"] = q[name]
    for variant in iopo.IOPO_VARIANTS:
        loss, _ = iopo.iopo_loss(**q, variant=variant)
        assert abs(loss.item() - LN2) < 1e-12, f"{variant}: {loss.item()} vs ln 2 {LN2}"


def test_label_smoothing():
    """eps = 0.1 on z = 0.6: 0.9 log(1 + e^-0.6) + 0.1 log(1 + e^0.6) = 0.4974879505; eps = 0 is plain DPO."""
    loss, _ = iopo.iopo_loss(**_hand_quads(), beta=0.1, label_smoothing=0.1)
    assert abs(loss.item() - 0.4974879505) < 1e-6, f"smoothed iopo {loss.item()}"
    w, l, rw, rl = torch.tensor([-10.0]), torch.tensor([-12.0]), torch.tensor([-11.0]), torch.tensor([-11.0])
    smooth, _ = iopo.dpo_loss(w, l, rw, rl, beta=0.1, label_smoothing=0.1)
    expected = 0.9 * math.log1p(math.exp(-0.2)) + 0.1 * math.log1p(math.exp(0.2))
    assert abs(smooth.item() - expected) < 1e-6, f"smoothed dpo {smooth.item()} vs {expected}"


def test_raising_matched_logp_lowers_every_loss():
    """Raising log p(y1|x1) lowers every variant's loss (negative gradient, and a real step down)."""
    q = _random_quads(seed=4)
    for variant in iopo.IOPO_VARIANTS:
        x = q["logp_y1_x1"].clone().requires_grad_()
        loss, _ = iopo.iopo_loss(**{**q, "logp_y1_x1": x}, variant=variant)
        (grad,) = torch.autograd.grad(loss, x)
        assert (grad < 0).all(), f"{variant}: gradient {grad.tolist()}"
        higher, _ = iopo.iopo_loss(**{**q, "logp_y1_x1": x.detach() + 1.0}, variant=variant)
        assert higher < loss, f"{variant}: {higher.item()} not below {loss.item()}"


def test_three_seq_needs_no_fourth_sequence():
    """three_seq accepts None for (x2, y2) and reports only the comparisons that involve r11."""
    q = _hand_quads()
    q["logp_y2_x2"] = q["ref_logp_y2_x2"] = None
    loss, m = iopo.iopo_loss(**q, beta=0.1, variant="three_seq")
    assert abs(loss.item() - 0.4031860489) < 1e-6, loss.item()
    assert "rewards/y2_x2" not in m and m["accuracy/input"].item() == 1.0, m
    with pytest.raises(ValueError, match="variant"):
        iopo.iopo_loss(**_hand_quads(), variant="ful")


def test_ftx_term_by_hand():
    """ftx term = -(L11/|y1| + L22/|y2|) averaged over the batch; DPO form -L_w/|y_w| with one pair."""
    l11, n1 = torch.tensor([-10.0, -6.0]), torch.tensor([5, 3])
    l22, n2 = torch.tensor([-8.0, -4.0]), torch.tensor([4, 0])  # an empty response counts as one token
    term = iopo.ftx_term(l11, n1, l22, n2)
    expected = ((2 + 2) + (2 + 4)) / 2  # row 0: 10/5 + 8/4; row 1: 6/3 + 4/1
    assert abs(term.item() - expected) < 1e-6, f"ftx {term.item()} vs {expected}"
    assert abs(iopo.ftx_term(l11, n1).item() - 2.0) < 1e-6, iopo.ftx_term(l11, n1).item()


def test_ftx_term_with_an_empty_matched_answer_is_finite():
    """A matched answer with no scored token (sum 0, count 0) counts as one token in either place: 0.0, not 0 / 0."""
    empty, count = torch.tensor([0.0]), torch.tensor([0])
    for args in ((empty, count), (empty, count, empty, count)):
        term = iopo.ftx_term(*args).item()
        assert term == 0.0, f"ftx term over {len(args) // 2} empty answer(s): {term}, expected 0.0"


def test_loss_arguments_are_checked():
    """Inputs that would broadcast into a wrong number, and beta / label smoothing out of range, are refused:
    a (B, 1) reference against (B,) sums used to give a (B, B) loss, a (T,) mask against (R, T) log-probs a
    halved SFT loss."""
    b = torch.randn(4)
    with pytest.raises(ValueError, match="dpo_loss: every log-prob sum must be a 1-D tensor"):
        iopo.dpo_loss(b, b, b[:, None], b[:, None])
    q = _random_quads(0)
    with pytest.raises(ValueError, match="iopo_loss: every log-prob sum"):
        iopo.iopo_loss(**{**q, "ref_logp_y1_x1": q["ref_logp_y1_x1"][:1]})
    for beta, smoothing in ((0.0, 0.0), (-0.1, 0.0), (0.1, 0.5), (0.1, -0.1)):
        with pytest.raises(ValueError, match="beta must be > 0 and label_smoothing in"):
            iopo.dpo_loss(b, b, b, b, beta=beta, label_smoothing=smoothing)
    with pytest.raises(ValueError, match="sft_loss: mask must be 0/1"):
        iopo.sft_loss(torch.randn(2, 5), torch.ones(5))
    with pytest.raises(ValueError, match="ftx_term: log-prob sums and token counts"):
        iopo.ftx_term(b, torch.ones(4, 1))
    with pytest.raises(ValueError, match="ftx_term"):
        iopo.ftx_term(b, torch.ones(4), b)  # y2's sums without its counts


def test_ties_are_not_counted_as_correct():
    """Accuracies count strict wins: policy == reference (every r = 0, the first step) gives 0, not 1."""
    logps = torch.tensor([-5.0, -7.0])
    _, m = iopo.dpo_loss(logps, logps - 1, logps, logps - 1)
    assert m["accuracy"].item() == 0.0, f"dpo accuracy on ties {m['accuracy'].item()}"
    q = {name: torch.tensor([-3.0 - i]) for i, name in enumerate(NAMES[:4])}
    q.update({f"ref_{name}": q[name] for name in NAMES[:4]})
    for variant in iopo.IOPO_VARIANTS:
        _, m = iopo.iopo_loss(**q, variant=variant)
        got = (m["accuracy/output"].item(), m["accuracy/input"].item())
        assert got == (0.0, 0.0), f"{variant}: accuracies on ties {got}"


def test_logp_metrics_name_the_right_sequence():
    """logps/* report each sequence's own mean log-prob (four distinct values, so a swap shows)."""
    w, l = torch.tensor([-10.0, -20.0]), torch.tensor([-30.0, -50.0])
    _, m = iopo.dpo_loss(w, l, w - 1, l + 1)
    got = (m["logps/chosen"].item(), m["logps/rejected"].item())
    assert got == (-15.0, -40.0), f"dpo logps/chosen, logps/rejected {got}, expected (-15, -40)"
    q = _hand_quads()
    _, m = iopo.iopo_loss(**q, beta=0.1)
    for name in NAMES[:4]:
        key = "logps/" + name.removeprefix("logp_")
        assert m[key].item() == q[name].item(), f"{key}: {m[key].item()}, expected {q[name].item()}"


def test_three_seq_accuracies_by_hand():
    """three_seq: output accuracy is r11 > r12, input accuracy r11 > r21; with r21 = 3 > r11 = 2 only output holds."""
    q = _hand_quads()
    q["logp_y1_x2"] = torch.tensor([-10.0])  # r21 = -10 - (-13) = 3
    q["logp_y2_x2"] = q["ref_logp_y2_x2"] = None
    _, m = iopo.iopo_loss(**q, beta=0.1, variant="three_seq")
    got = (m["accuracy/output"].item(), m["accuracy/input"].item())
    assert got == (1.0, 0.0), f"three_seq accuracies (output, input) {got}, expected (1.0, 0.0)"
