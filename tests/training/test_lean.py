"""training/lean.py and training/memory.py: the same gradients as PEFT's path for a given
dropout mask, selective checkpointing with unchanged gradients, the model handed back as it
came, the memory plan keeping the global batch (issue 16)."""

import pytest
import torch

from lmladder.training import lean, memory

from conftest import make_model


def _peft(seed=0, dropout=0.1):
    from peft import LoraConfig, get_peft_model

    model = make_model(300, seed=seed)
    pm = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, lora_dropout=dropout,
                                          target_modules="all-linear"))
    torch.manual_seed(seed + 1)
    for n, p in pm.named_parameters():  # lora_B starts at zero: give it values so lora_A gets a gradient
        if "lora_B" in n:
            p.data.normal_(0, 0.02)
    return pm


def _grads(pm):
    return {n: p.grad.detach().clone() for n, p in pm.named_parameters() if p.requires_grad and p.grad is not None}


def test_dropout_linear_matches_dropout_then_linear_for_a_given_mask():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 8, requires_grad=True)
    w = torch.randn(3, 8, requires_grad=True)
    p = 0.3
    torch.manual_seed(1)
    out = lean.dropout_linear(x, w, p)
    torch.manual_seed(1)  # the same draw: the mask lean used
    keep = torch.empty(x.shape, dtype=torch.bool).bernoulli_(1 - p)
    g = torch.randn_like(out)
    out.backward(g)
    gx, gw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    ref = torch.nn.functional.linear(x * keep / (1 - p), w)
    torch.testing.assert_close(out, ref)
    ref.backward(g)
    torch.testing.assert_close(gx, x.grad)
    torch.testing.assert_close(gw, w.grad)


def test_dropout_linear_keeps_the_expected_share():
    torch.manual_seed(0)
    x = torch.ones(200, 100)
    w = torch.eye(100)
    out = lean.dropout_linear(x, w, 0.25)
    assert abs((out != 0).float().mean().item() - 0.75) < 0.02
    assert torch.allclose(out[out != 0], torch.full_like(out[out != 0], 1 / 0.75))


def test_fused_lora_dropout_same_gradients_as_peft_for_the_same_masks(monkeypatch):
    """Every dropout draws its mask from one recorded list: PEFT's nn.Dropout and the fused path
    get the same masks, so loss and every LoRA gradient must agree."""
    ids = torch.randint(0, 300, (2, 12))
    masks: list[torch.Tensor] = []
    real_bernoulli = torch.Tensor.bernoulli_

    # PEFT's path, masks recorded: nn.Dropout replaced by an explicit mask draw
    pm = _peft()
    pm.train()

    class RecordingDropout(torch.nn.Module):
        def __init__(self, p):
            super().__init__()
            self.p = p

        def forward(self, x):
            keep = real_bernoulli(torch.empty(x.shape, dtype=torch.bool), 1 - self.p)
            masks.append(keep)
            return x * keep / (1 - self.p)

    swapped = []
    for m in pm.modules():
        d = getattr(m, "lora_dropout", None)
        if isinstance(d, torch.nn.ModuleDict):
            for k, v in list(d.items()):
                swapped.append((d, k, v))
                d[k] = RecordingDropout(v.p)
    loss_ref = pm(input_ids=ids, labels=ids).loss
    loss_ref.backward()
    ref = _grads(pm)
    for d, k, v in swapped:
        d[k] = v
    pm.zero_grad(set_to_none=True)

    # the fused path, fed the same masks in the same (module call) order
    replay = iter(masks)

    def fake_bernoulli(self, p=0.5, *a, **kw):
        if self.dtype == torch.bool:
            return self.copy_(next(replay))
        return real_bernoulli(self, p, *a, **kw)

    monkeypatch.setattr(torch.Tensor, "bernoulli_", fake_bernoulli)
    with lean.fused_lora_dropout(pm) as n:
        assert n == len(swapped)
        loss = pm(input_ids=ids, labels=ids).loss
        loss.backward()
    monkeypatch.undo()
    torch.testing.assert_close(loss, loss_ref)
    got = _grads(pm)
    assert got.keys() == ref.keys() and any("lora_A" in k for k in got)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-7)


def test_fused_lora_dropout_hands_the_model_back_unchanged():
    pm = _peft()
    before_types = {n: type(m) for n, m in pm.named_modules()}
    before_state = {k: v.clone() for k, v in pm.state_dict().items()}
    with lean.fused_lora_dropout(pm) as n:
        assert n > 0
        assert any(type(m).__name__ == "LeanDropoutLinear" for m in pm.modules())
        assert pm.state_dict().keys() == before_state.keys()  # same parameters, same names
    assert {n: type(m) for n, m in pm.named_modules()} == before_types
    assert all(not hasattr(m, "lean_p") for m in pm.modules())
    for k, v in pm.state_dict().items():
        assert torch.equal(v, before_state[k])


def test_fused_lora_dropout_is_plain_in_eval_and_without_dropout():
    pm = _peft(dropout=0.0)
    with lean.fused_lora_dropout(pm) as n:
        assert n == 0  # nothing to fuse
    pm = _peft()
    pm.eval()
    ids = torch.randint(0, 300, (1, 7))
    with torch.no_grad():
        a = pm(input_ids=ids).logits
        with lean.fused_lora_dropout(pm):
            b = pm(input_ids=ids).logits
    torch.testing.assert_close(a, b)


def test_checkpoint_layers_same_gradients_and_switches_restored():
    pm = _peft(dropout=0.0)
    pm.train()
    ids = torch.randint(0, 300, (2, 10))
    pm(input_ids=ids, labels=ids).loss.backward()
    ref = _grads(pm)
    pm.zero_grad(set_to_none=True)
    layers = lean.decoder_layers(pm)
    assert layers
    with lean.checkpoint_layers(pm, 1) as k:
        assert k == 1 and layers[0].gradient_checkpointing and not layers[-1].gradient_checkpointing
        pm(input_ids=ids, labels=ids).loss.backward()
    for k_ in ref:
        torch.testing.assert_close(_grads(pm)[k_], ref[k_])
    assert not any(m.gradient_checkpointing for m in layers)
    assert all("_gradient_checkpointing_func" not in m.__dict__ for m in layers)


def test_causal_padding_ok():
    model = make_model(300)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    labels = torch.tensor([[-100, 5, 6, -100], [-100, -100, 4, 4]])
    assert lean.causal_padding_ok(model, {"attention_mask": mask, "labels": labels})
    assert not lean.causal_padding_ok(model, {"attention_mask": torch.tensor([[0, 1, 1, 1]]), "labels": None})
    assert not lean.causal_padding_ok(model, {"attention_mask": mask, "labels": torch.tensor([[1, 1, 1, 1]] * 2)})
    # same supervised logits with and without the mask
    ids = torch.randint(0, 300, (2, 4))
    model.eval()
    with torch.no_grad():
        a = model(input_ids=ids, attention_mask=mask).logits
        b = model(input_ids=ids).logits
    torch.testing.assert_close(a[mask.bool()], b[mask.bool()], rtol=1e-4, atol=1e-5)


def test_memory_plan_keeps_the_global_batch(monkeypatch):
    monkeypatch.setattr(memory, "used_mb", lambda cuda=False: 500.0)
    pm = _peft()
    big = memory.plan(pm, [50] * 16, 8, 1, 10**6)
    assert (big.micro, big.accum, big.checkpoint_layers) == (4, 2, 0)  # capped at CPU_MICRO_TOKENS
    tight = memory.plan(pm, [50] * 16, 8, 1, 1, cap_tokens=10**6)
    assert tight.micro == 1 and tight.accum == 8 and tight.checkpoint_layers == memory.n_layers(pm)
    # room for about 3 sequences: micro 2 (a divisor of 8), nothing checkpointed
    per_seq = memory.activation_mb_per_token(pm) * 50
    fixed = memory.used_mb() + memory.optimizer_mb(pm) + memory.SLACK_MB
    mid = memory.plan(pm, [50] * 16, 8, 1, int(fixed + 3 * per_seq) + 1, cap_tokens=10**6)
    assert (mid.micro, mid.accum, mid.checkpoint_layers) == (2, 4, 0)
    assert not mid.auto_budget and memory.plan(pm, [50], 8, 1, None).auto_budget


@pytest.mark.parametrize("budget", [None, 64])
def test_sft_train_under_a_budget_same_global_batch(tmp_path, budget):
    from lmladder.prompts import ChatFormat
    from lmladder.rungs.lora import LoraConfig
    from lmladder.training import sft

    from conftest import make_tokenizer

    tok = make_tokenizer()
    fmt = ChatFormat(tok)
    pm = _peft()
    data = [(f"item {i} is {'good' if i % 2 else 'bad'}", "pos" if i % 2 else "neg") for i in range(16)]
    feats = [sft.build_feature(fmt, m, a, 256, f"t:{i}", {tok.eos_token_id}) for i, (m, a) in enumerate(data)]
    cfg = LoraConfig(max_steps=2, batch_size=4, dev_fraction=0, checkpoints=False, memory_budget_mb=budget)
    types = {n: type(m) for n, m in pm.named_modules()}
    stats = sft.train(pm, tok, feats, [a for _, a in data], cfg, tmp_path / "w", 0)
    plan = stats["memory_plan"]
    assert plan["micro"] * plan["accum"] == 4 == stats["global_batch"]
    assert stats["per_device_batch"] == plan["micro"]
    assert plan["fused_lora_dropout_modules"] > 0
    if budget == 64:
        assert plan["micro"] == 1 and plan["checkpoint_layers"] > 0
    assert {n: type(m) for n, m in pm.named_modules()} == types  # handed back as it came
    assert not any(getattr(m, "gradient_checkpointing", False) for m in lean.decoder_layers(pm))


def test_dynamic_checkpointing_only_long_micro_batches_same_gradients():
    pm = _peft(dropout=0.0)
    pm.train()
    layers = lean.decoder_layers(pm)
    short, long = torch.randint(0, 300, (1, 6)), torch.randint(0, 300, (2, 10))
    pm(input_ids=long, labels=long).loss.backward()
    ref = _grads(pm)
    pm.zero_grad(set_to_none=True)
    with lean.checkpoint_layers(pm, lambda tokens: 0 if tokens <= 8 else len(layers)) as seen:
        pm(input_ids=long, labels=long).loss.backward()
        with torch.no_grad():
            pm(input_ids=long)  # not a training forward: not counted, nothing checkpointed
        pm(input_ids=short, labels=short).loss.backward()
    assert seen == [len(layers), 0]
    pm.zero_grad(set_to_none=True)
    with lean.checkpoint_layers(pm, lambda tokens: len(layers)):
        pm(input_ids=long, labels=long).loss.backward()
    for k in ref:
        torch.testing.assert_close(_grads(pm)[k], ref[k])
    assert not any(m.gradient_checkpointing for m in layers)
    assert all(not m._forward_pre_hooks for m in layers)


def test_zero_dropout_becomes_identity_while_inside():
    pm = _peft(dropout=0.1)
    for m in pm.modules():  # what TRL's disable_dropout does
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    with lean.fused_lora_dropout(pm) as n:
        assert n > 0
        assert not any(isinstance(m, torch.nn.Dropout) for m in pm.modules())
    assert any(isinstance(m, torch.nn.Dropout) and m.p == 0 for m in pm.modules())


def test_memory_plan_long_micro_batches_checkpoint_layers(monkeypatch):
    monkeypatch.setattr(memory, "used_mb", lambda cuda=False: 500.0)
    pm = _peft()
    per_seq = memory.activation_mb_per_token(pm) * 100
    fixed = memory.used_mb() + memory.optimizer_mb(pm) + memory.SLACK_MB
    p = memory.plan(pm, [100, 400], 2, 1, int(fixed + per_seq), cap_tokens=10**6)
    assert p.micro == 1 and p.accum == 2
    assert p.layers_for(80) == 0 and 0 < p.layers_for(400) <= p.n_layers
    assert p.checkpoint_layers == p.layers_for(400)


def test_small_logprob_tiles_same_log_probs_and_restored():
    trl_kernels = pytest.importorskip("trl.kernels.chunked_logprob")
    from trl.trainer.utils import add_fused_lm_head

    model = make_model(300)
    add_fused_lm_head(model)
    ids = torch.randint(0, 300, (2, 9))
    before = trl_kernels.TOKEN_CHUNK_SIZE
    ref = model(input_ids=ids, labels=ids, fused_lm_head=True).log_probs
    with lean.small_logprob_tiles(model, tokens=4) as t:
        assert t == 4 and trl_kernels.TOKEN_CHUNK_SIZE == 4
        got = model(input_ids=ids, labels=ids, fused_lm_head=True).log_probs
    assert trl_kernels.TOKEN_CHUNK_SIZE == before
    torch.testing.assert_close(got, ref)
