"""pipeline.loss against independent computations (tiny random LlamaForCausalLM, float64 where useful).

Every model-level check goes through pipeline.loss.WeightedLossModel, the one path from a model to the
loss (the trainer's)."""

from __future__ import annotations

import contextlib
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from pipeline import loss as L
from pipeline.loss import IGNORE_INDEX
from pipeline.preprocess import Collator, build_example

torch.set_num_threads(2)
REPO = Path(__file__).resolve().parent.parent

TINY = dict(
    vocab_size=1000,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    tie_word_embeddings=False,
)


def tiny_model(dtype=torch.float64, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**TINY)).to(dtype)


def make_raw(n, seed, min_len=5, max_len=20, no_completion=()):
    """``n`` (ids, n_prompt) pairs with random lengths; indices in ``no_completion`` are all prompt."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = int(torch.randint(min_len, max_len + 1, (1,), generator=g))
        ids = [1] + torch.randint(3, TINY["vocab_size"], (length - 1,), generator=g).tolist()
        n_prompt = length if i in no_completion else int(torch.randint(1, length, (1,), generator=g))
        out.append((ids, n_prompt))
    return out


def make_examples(raw, plw, completion_weight=1.0, mask=True):
    return [build_example(ids, n, plw, completion_weight, mask_zero_weight_labels=mask) for ids, n in raw]


COLLATE = Collator(pad_token_id=0)


def grads_of(model):
    return {
        n: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)) for n, p in model.named_parameters()
    }


def assert_grads_close(a, b, rtol=1e-9, atol=1e-12):
    assert a.keys() == b.keys()
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=rtol, atol=atol, msg=lambda m, n=n: f"{n}: {m}")


def max_rel_diff(a, b):
    num = max(float((a[n] - b[n]).abs().max()) for n in a)
    den = max(float(b[n].abs().max()) for n in b)
    return num / den


def our_loss(model, batch, normaliser=None, **kw):
    """The trainer's path: WeightedLossModel's forward on the whole collated batch."""
    return L.WeightedLossOutput(**L.WeightedLossModel(model, **kw)(**batch, normaliser=normaliser))


# ------------------------------------------------------------------------------------------
# The weight rule (where PLW enters)
# ------------------------------------------------------------------------------------------
def test_token_weights_rule():
    prompt = torch.tensor([[False, True, True, False, False, False]])
    completion = torch.tensor([[False, False, False, True, True, False]])  # last position: padding
    w = L.token_weights(prompt, completion, plw=0.1, completion_weight=2.5)
    assert w.dtype == torch.float32 and w.shape == prompt.shape
    f32 = float(torch.tensor(0.1, dtype=torch.float32))
    assert w.tolist() == [[0.0, f32, f32, 2.5, 2.5, 0.0]]
    assert L.token_weights(prompt, completion, 0.0).tolist() == [[0.0, 0.0, 0.0, 1.0, 1.0, 0.0]]
    for plw, cw in ((-0.1, 1.0), (0.1, -1.0), (float("nan"), 1.0)):
        with pytest.raises(ValueError, match="weights must be >= 0"):
            L.token_weights(prompt, completion, plw, cw)
    with pytest.raises(ValueError, match="never both be set"):
        L.token_weights(prompt, prompt, 0.1)


def test_build_example_weights_come_from_the_weight_rule():
    ids, n_prompt = list(range(1, 10)), 4
    ex = build_example(ids, n_prompt, plw=0.3, completion_weight=1.5)
    pos = torch.arange(len(ids))
    expect = L.token_weights((pos >= 1) & (pos < n_prompt), pos >= n_prompt, 0.3, 1.5)
    assert torch.equal(ex["weights"], expect)
    assert torch.equal(ex["prompt_mask"], (pos >= 1) & (pos < n_prompt))


# ------------------------------------------------------------------------------------------
# Equivalences with standard losses
# ------------------------------------------------------------------------------------------
def test_plw1_equals_full_sequence_cross_entropy():
    model = tiny_model()
    batch = COLLATE(make_examples(make_raw(6, seed=1), plw=1.0))
    out = our_loss(model, batch, chunk_size=7)
    out.loss.backward()
    g_ours = grads_of(model)
    model.zero_grad()
    logits = model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    tgt = batch["input_ids"][:, 1:].masked_fill(batch["attention_mask"][:, 1:] == 0, IGNORE_INDEX)
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, TINY["vocab_size"]), tgt.reshape(-1))  # mean over non-pad
    ref.backward()
    torch.testing.assert_close(out.loss, ref, rtol=1e-12, atol=0)
    assert_grads_close(g_ours, grads_of(model))


def test_plw0_equals_transformers_masked_loss():
    model = tiny_model(dtype=torch.float32)  # transformers computes its loss in fp32 whatever the model dtype
    batch = COLLATE(make_examples(make_raw(6, seed=2), plw=0.0))  # labels: -100 on prompt and pad
    assert (batch["labels"] == IGNORE_INDEX).sum() > (batch["attention_mask"] == 0).sum() + 6
    out = our_loss(model, batch, chunk_size=5)
    out.loss.backward()
    g_ours = grads_of(model)
    model.zero_grad()
    ref = model(batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    ref.backward()
    torch.testing.assert_close(out.loss, ref, rtol=1e-6, atol=0)
    assert_grads_close(g_ours, grads_of(model), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("plw,cw,eps", [(0.137, 1.0, 0.0), (0.02, 2.5, 0.0), (0.3, 1.0, 0.1)])
def test_arbitrary_plw_equals_token_loop(plw, cw, eps):
    model = tiny_model()
    raw = make_raw(5, seed=3)
    # keep prompt labels even at weight 0 for logging; does not change the loss
    batch = COLLATE(make_examples(raw, plw, cw, mask=False))
    with torch.no_grad():
        logits = model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    # independent: loop over the raw sequences, weights from (n_prompt, plw, cw) directly
    plw32, cw32 = (float(torch.tensor(x, dtype=torch.float32)) for x in (plw, cw))  # weights are fp32
    num = wsum = count = 0.0
    p_ce, p_n, c_ce, c_n = 0.0, 0, 0.0, 0
    for b, (ids, n_prompt) in enumerate(raw):
        for j in range(1, len(ids)):
            logp = torch.log_softmax(logits[b, j - 1], dim=-1)
            nll = -float(logp[ids[j]])
            ce = (1 - eps) * nll + eps * -float(logp.mean())
            w = plw32 if j < n_prompt else cw32
            num += w * ce
            wsum += w
            count += w > 0
            if j < n_prompt:
                p_ce, p_n = p_ce + ce, p_n + 1
            else:
                c_ce, c_n = c_ce + ce, c_n + 1
    with torch.no_grad():
        for mode, den in (("weight_sum", wsum), ("token_count", count)):
            [d] = L.step_normalisers([batch], mode)
            assert float(d) == pytest.approx(den, rel=1e-6)
            out = our_loss(model, batch, torch.tensor(den, dtype=torch.float64), chunk_size=4, label_smoothing=eps)
            assert float(out.loss) == pytest.approx(num / den, rel=1e-10)
        assert float(out.weighted_ce_sum) == pytest.approx(num, rel=1e-10)
        assert float(out.prompt_ce) == pytest.approx(p_ce / p_n, rel=1e-10) and int(out.prompt_tokens) == p_n
        assert float(out.completion_ce) == pytest.approx(c_ce / c_n, rel=1e-10)
        assert int(out.completion_tokens) == c_n
        # the naive logits-based reference agrees too
        naive = L.naive_weighted_loss(logits, batch["labels"], batch["weights"], label_smoothing=eps)
        assert float(naive) == pytest.approx(num / wsum, rel=1e-10)


# ------------------------------------------------------------------------------------------
# Normalisers across micro-batches and ranks
# ------------------------------------------------------------------------------------------
STEP_PLW = 0.05


def step_raw():
    """8 sequences: short ones first, long ones last, so every split has unequal weight sums."""
    return make_raw(4, seed=4, min_len=4, max_len=8) + make_raw(4, seed=40, min_len=16, max_len=24)


def accumulate(model, examples, micro_batch_size, mode, label_smoothing=0.0):
    model.zero_grad(set_to_none=True)
    mbs = [COLLATE(examples[i : i + micro_batch_size]) for i in range(0, len(examples), micro_batch_size)]
    dens = L.step_normalisers(mbs, mode)
    total = 0.0
    for mb, d in zip(mbs, dens):
        out = our_loss(model, mb, d, label_smoothing=label_smoothing, chunk_size=16)
        out.loss.backward()
        total += float(out.loss.detach())
    return grads_of(model), total, mbs


@pytest.mark.parametrize("mode", ["weight_sum", "token_count"])
def test_step_normalisers_make_accumulation_invariant(mode):
    model = tiny_model()
    exs = make_examples(step_raw(), STEP_PLW)
    g8, l8, _ = accumulate(model, exs, 8, mode)
    g4, l4, mbs = accumulate(model, exs, 4, mode)
    assert l4 == pytest.approx(l8, rel=1e-12)
    assert_grads_close(g4, g8)
    g1, l1, _ = accumulate(model, exs, 1, mode)
    assert l1 == pytest.approx(l8, rel=1e-12)
    assert_grads_close(g1, g8)


def test_micro_batch_normaliser_depends_on_batching():
    """Why weight_sum is the default: per-micro-batch normalisation changes the step gradient."""
    model = tiny_model()
    exs = make_examples(step_raw(), STEP_PLW)
    g8, l8, _ = accumulate(model, exs, 8, "micro_batch")
    g4, l4, mbs = accumulate(model, exs, 4, "micro_batch")
    ws = [float(L.effective_weights(mb["labels"], mb["weights"]).sum()) for mb in mbs]
    assert abs(ws[0] - ws[1]) > 0.1 * max(ws)  # micro-batches carry different weight sums
    assert max_rel_diff(g4, g8) > 1e-3
    assert abs(l4 - l8) > 1e-4
    # with one micro-batch all three normalisers coincide up to their definition
    gw, lw, _ = accumulate(model, exs, 8, "weight_sum")
    assert lw == pytest.approx(l8, rel=1e-12)
    assert_grads_close(gw, g8)


def test_weight_sum_grads_match_under_torchrun(tmp_path):
    """2 processes x 2 micro-batches x 2 examples (DDP, gloo, CPU) == 8 examples in one micro-batch."""
    model = tiny_model()
    exs = make_examples(step_raw(), STEP_PLW)
    modes = ["weight_sum", "token_count", "micro_batch"]
    ref = {m: accumulate(model, exs, 8, m)[:2] for m in modes}
    spec = tmp_path / "spec.pt"
    out = tmp_path / "out.pt"
    torch.save(
        {
            "config": TINY,
            "dtype": torch.float64,
            "state": model.state_dict(),
            "examples": exs,
            "micro_batch_size": 2,
            "modes": modes,
        },
        spec,
    )
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
    )
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(REPO / "tests" / "_dist_grad_worker.py"),
        str(spec),
        str(out),
    ]
    # its own process group: a timeout kills torchrun's workers too (no orphan keeps a core busy)
    with subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(REPO), start_new_session=True
    ) as p:
        try:
            stdout, stderr = p.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            # torchrun starts its workers in sessions of their own: kill the whole tree, or an orphaned
            # worker keeps the pipes open and communicate() waits forever
            import psutil  # accelerate's dependency

            tree = psutil.Process(p.pid).children(recursive=True)
            os.killpg(p.pid, signal.SIGKILL)
            for child in tree:
                with contextlib.suppress(psutil.NoSuchProcess):
                    child.kill()
            stdout, stderr = p.communicate(timeout=60)
    assert p.returncode == 0, f"torchrun failed:\n{stdout[-3000:]}\n{stderr[-5000:]}"
    res = torch.load(out, weights_only=False)
    assert res["world"] == 2
    for mode in ("weight_sum", "token_count"):
        g_ref, l_ref = ref[mode]
        assert float(res[mode]["loss"]) == pytest.approx(l_ref, rel=1e-12), mode
        assert_grads_close(res[mode]["grads"], g_ref)
    # micro_batch: depends on the split (documented behaviour, not a bug)
    assert max_rel_diff(res["micro_batch"]["grads"], ref["micro_batch"][0]) > 1e-3


# ------------------------------------------------------------------------------------------
# Edge cases
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", list(L.NORMALISERS))
def test_all_zero_weights_give_zero_loss_and_grads(mode):
    model = tiny_model(dtype=torch.float32)
    exs = make_examples(make_raw(4, seed=5, no_completion=range(4)), plw=0.0)  # prompts only, PLW 0
    mbs = [COLLATE(exs[:2]), COLLATE(exs[2:])]
    dens = L.step_normalisers(mbs, mode)
    assert all(float(d) == 0 for d in dens)
    model.zero_grad(set_to_none=True)
    for mb, d in zip(mbs, dens):
        out = our_loss(model, mb, d)
        assert float(out.loss.detach()) == 0.0 and torch.isfinite(out.loss.detach())
        out.loss.backward()
    for n, g in grads_of(model).items():
        assert torch.isfinite(g).all() and (g == 0).all(), n
    out = our_loss(model, mbs[0])  # normaliser=None -> own weight sum (0)
    assert float(out.loss.detach()) == 0.0
    assert math.isnan(float(out.completion_ce))  # nothing to log, reported as NaN, not in the loss
    logits = torch.randn(2, 5, 11)
    z = L.naive_weighted_loss(logits, torch.full((2, 5), IGNORE_INDEX), torch.zeros(2, 5))
    assert float(z) == 0.0


def test_zero_weight_micro_batch_inside_a_nonzero_step():
    model = tiny_model()
    raw = make_raw(4, seed=6)
    exs = make_examples(raw[:2], plw=0.0) + make_examples(make_raw(2, seed=7, no_completion=range(2)), plw=0.0)
    g_all, _, mbs = accumulate(model, exs, 2, "weight_sum")
    g_first, _, _ = accumulate(model, exs[:2], 2, "weight_sum")
    assert float(L.effective_weights(mbs[1]["labels"], mbs[1]["weights"]).sum()) == 0
    assert_grads_close(g_all, g_first)


# ------------------------------------------------------------------------------------------
# The chunked Function itself
# ------------------------------------------------------------------------------------------
def _random_problem(B=3, T=13, H=8, V=50, seed=8, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g, dtype=dtype)
    weight = torch.randn(V, H, generator=g, dtype=dtype) * 0.7
    labels = torch.randint(0, V, (B, T), generator=g)
    weights = torch.rand(B, T, generator=g, dtype=torch.float32) * 2
    labels[0, 9:] = IGNORE_INDEX  # padding
    weights[0, 9:] = 0
    labels[1, 2] = IGNORE_INDEX  # an ignored label with a nonzero weight: must be ignored
    weights[2, 4] = 0  # a zero-weight label
    return hidden, weight, labels, weights


@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("chunk", [1, 5, 10_000])
def test_chunked_equals_unchunked_with_grads(eps, chunk):
    hidden, weight, labels, weights = _random_problem()
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    out = L.weighted_causal_lm_loss(h1, w1, labels, weights, 3.7, label_smoothing=eps, chunk_size=chunk)
    out.loss.backward()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    ref = L.naive_weighted_loss(h2 @ w2.t(), labels, weights, 3.7, label_smoothing=eps)
    ref.backward()
    torch.testing.assert_close(out.loss, ref, rtol=1e-12, atol=0)
    torch.testing.assert_close(h1.grad, h2.grad, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(w1.grad, w2.grad, rtol=1e-10, atol=1e-14)
    # an upstream gradient other than 1 is propagated
    h3, w3 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    (
        2.5 * L.weighted_causal_lm_loss(h3, w3, labels, weights, 3.7, label_smoothing=eps, chunk_size=chunk).loss
    ).backward()
    torch.testing.assert_close(h3.grad, 2.5 * h2.grad, rtol=1e-10, atol=1e-14)
    # no-grad path gives the same value
    with torch.no_grad():
        ng = L.weighted_causal_lm_loss(hidden, weight, labels, weights, 3.7, label_smoothing=eps, chunk_size=chunk)
    torch.testing.assert_close(ng.loss, ref.detach(), rtol=1e-12, atol=0)


def test_label_smoothing_matches_independent_formula():
    hidden, weight, labels, weights = _random_problem(seed=9)
    eps, V = 0.2, weight.shape[0]
    out = L.weighted_causal_lm_loss(hidden, weight, labels, weights, None, label_smoothing=eps, chunk_size=4)
    logits = hidden @ weight.t()
    num = den = 0.0
    for b in range(labels.shape[0]):
        for j in range(1, labels.shape[1]):
            y = int(labels[b, j])
            if y == IGNORE_INDEX:
                continue
            z = logits[b, j - 1]
            lse = math.log(sum(math.exp(float(v)) for v in z))
            # smoothed target: (1 - eps) on y plus eps / V on every class
            ce = sum(-((1 - eps) * (v == y) + eps / V) * (float(z[v]) - lse) for v in range(V))
            num += float(weights[b, j]) * ce
            den += float(weights[b, j])
    assert float(out.loss) == pytest.approx(num / den, rel=1e-10)
    tl = F.cross_entropy(
        logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1), reduction="none", label_smoothing=eps
    )
    ws = weights[:, 1:].reshape(-1).double() * (labels[:, 1:].reshape(-1) != IGNORE_INDEX)
    assert float(out.loss) == pytest.approx(float((ws * tl).sum() / ws.sum()), rel=1e-10)


def test_bfloat16_inputs_close_to_fp32_reference():
    hidden, weight, labels, weights = _random_problem(T=40, V=300, H=16, seed=10, dtype=torch.float32)
    hb, wb = hidden.bfloat16().requires_grad_(), weight.bfloat16().requires_grad_()
    out = L.weighted_causal_lm_loss(hb, wb, labels, weights, None, chunk_size=16)
    out.loss.backward()
    assert hb.grad.dtype == torch.bfloat16 and wb.grad.dtype == torch.bfloat16
    h2, w2 = hb.detach().float().requires_grad_(), wb.detach().float().requires_grad_()
    ref = L.naive_weighted_loss(h2 @ w2.t(), labels, weights)
    ref.backward()
    assert float(out.loss.detach()) == pytest.approx(float(ref.detach()), rel=2e-2)
    torch.testing.assert_close(hb.grad.float(), h2.grad, rtol=5e-2, atol=5e-3)
    torch.testing.assert_close(wb.grad.float(), w2.grad, rtol=5e-2, atol=5e-3)


def _saved_numels(fn):
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = fn()
    loss.backward()
    return sizes


def test_no_full_logits_saved_for_backward():
    B, T, H, V = 4, 32, 16, 512  # tokens x vocab = 65536 >> V x H = 8192 and tokens x H = 2048
    hidden, weight, labels, weights = _random_problem(B=B, T=T, H=H, V=V, dtype=torch.float32)
    N = B * T
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    sizes = _saved_numels(lambda: L.weighted_causal_lm_loss(h, w, labels, weights, None, chunk_size=16).loss)
    assert sizes and max(sizes) < N * V / 4, sizes
    assert sum(sizes) <= N * H + V * H + 4 * N, sizes  # grad buffers for hidden and head only
    # negative control: the naive loss keeps (at least) the full logits
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    naive = _saved_numels(lambda: L.naive_weighted_loss(h2 @ w2.t(), labels, weights))
    assert max(naive) >= N * V


def test_step_normaliser_arguments():
    with pytest.raises(ValueError):
        L.step_normalisers([], "mean")
    assert L.step_normalisers([], "weight_sum") == []
    mb = {"labels": torch.tensor([[IGNORE_INDEX, 5, 6, IGNORE_INDEX]]), "weights": torch.tensor([[9.0, 0.5, 2.0, 3.0]])}
    # position 0 (no target) and ignored labels do not count
    assert float(L.step_normalisers([mb], "weight_sum")[0]) == pytest.approx(2.5)
    assert float(L.step_normalisers([mb], "token_count")[0]) == 2
    assert float(L.step_normalisers([mb, mb], "micro_batch")[0]) == pytest.approx(5.0)
    assert float(L.step_normalisers([mb], "weight_sum", grad_reduction="sum")[0]) == pytest.approx(2.5)


class _MatmulRows(TorchDispatchMode):
    """Records the rows (tokens) entering the chunked loss's three matmuls (aten level)."""

    def __init__(self, vocab: int):
        super().__init__()
        self.V, self.forward, self.grad_weight, self.grad_hidden = vocab, 0, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.addmm_.default:  # grad_weight += g.T @ h: g.T is (V, rows)
            self.grad_weight += args[1].shape[1]
        elif func is torch.ops.aten.mm.default:
            a, b = args[0], args[1]
            if b.shape[-1] == self.V:  # h @ W.T: the logits
                self.forward += a.shape[0]
            elif a.shape[-1] == self.V:  # g @ W: grad_hidden
                self.grad_hidden += a.shape[0]
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("plw", [0.0, 0.1])
def test_ignored_and_zero_weight_targets_skip_the_matmuls(plw):
    """Padding and each row's last position enter no matmul; at PLW 0 the prompt targets enter the
    forward (their CE is logged) but neither gradient matmul; values and gradients stay exact."""
    B, T, H, V = 3, 20, 8, 97
    hidden, weight, _, _ = _random_problem(B=B, T=T, H=H, V=V, dtype=torch.float32)
    g = torch.Generator().manual_seed(5)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[:, 0] = IGNORE_INDEX
    labels[2, 12:] = IGNORE_INDEX  # padding
    prompt = torch.zeros(B, T, dtype=torch.bool)
    prompt[:, 1:8] = True
    weights = torch.where(prompt, torch.tensor(plw), torch.tensor(1.0))
    weights[labels == IGNORE_INDEX] = 0
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with _MatmulRows(V) as seen:
        out = L.weighted_causal_lm_loss(h, w, labels, weights, prompt_mask=prompt, chunk_size=7)
        out.loss.backward()
    targets, tw, _ = L.shift_targets(labels, weights, prompt)
    valid = targets != IGNORE_INDEX
    assert seen.forward == int(valid.sum()) < B * T
    live = int((valid & (tw != 0)).sum())
    assert seen.grad_weight == seen.grad_hidden == live
    if plw == 0:
        assert live < int(valid.sum())  # the prompt targets were skipped...
        assert float(out.prompt_tokens) > 0 and float(out.prompt_ce_sum) > 0  # ...yet their CE is logged
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    ref = L.naive_weighted_loss(h2 @ w2.t(), labels, weights)
    ref.backward()
    torch.testing.assert_close(out.loss, ref, rtol=1e-6, atol=0)
    torch.testing.assert_close(h.grad, h2.grad, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(w.grad, w2.grad, rtol=1e-5, atol=1e-8)
