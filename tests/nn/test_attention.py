import math

import pytest
import torch

from srupp.nn import SRUppAttention, SRUppProjectedLinear
from srupp.nn.attention import attention_mask


def reference_attention(module, x, memory=None, mask_pad=None, causal=False, window=None):
    """The paper's equations written out with an explicit softmax, one batch entry and head at a time."""
    query = x @ module.in_proj.weight.T
    context = query if memory is None else torch.cat([memory @ module.in_proj.weight.T, query])
    keys, values = (context @ module.kv_proj.weight.T).chunk(2, dim=-1)
    steps, batch, _ = x.shape
    offset = context.shape[0] - steps
    heads, size = module.num_heads, module.head_size
    mixed = torch.zeros_like(query)
    for b in range(batch):
        for h in range(heads):
            part = slice(h * size, (h + 1) * size)
            scores = query[:, b, part] @ keys[:, b, part].T / math.sqrt(size)
            for i in range(steps):
                for j in range(context.shape[0]):
                    hidden = (causal and j > offset + i) or (window is not None and abs(offset + i - j) > window)
                    hidden = hidden or (mask_pad is not None and j >= offset and bool(mask_pad[j - offset, b]))
                    if hidden:
                        scores[i, j] = -math.inf
            mixed[:, b, part] = torch.softmax(scores, dim=-1) @ values[:, b, part]
    normed = torch.nn.functional.layer_norm(
        query + module.alpha * mixed, (module.proj_size,), module.norm.weight, module.norm.bias
    )
    return normed @ module.out_proj.weight.T


CASES = {
    "one-head": dict(),
    "two-heads-causal": dict(num_heads=2, causal=True),
    "memory-causal": dict(memory=3, causal=True),
    "memory-padding": dict(memory=2, padding=True, num_heads=2),
    "causal-window": dict(causal=True, window=2, memory=2),
    "padding": dict(padding=True),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_attention_matches_written_out_equations(assert_close, case):
    torch.manual_seed(0)
    module = SRUppAttention(5, 9, 6, num_heads=case.get("num_heads", 1)).eval()
    with torch.no_grad():
        module.alpha.fill_(0.8)
        module.norm.weight.normal_()
        module.norm.bias.normal_()
    x = torch.randn(4, 2, 5)
    memory = torch.randn(case["memory"], 2, 5) if "memory" in case else None
    mask_pad = (
        torch.tensor([[False, False], [False, False], [False, True], [False, True]]) if "padding" in case else None
    )
    causal, window = case.get("causal", False), case.get("window")
    with torch.no_grad():
        actual = module(x, mask_pad=mask_pad, causal=causal, memory=memory, attn_window=window)
        expected = reference_attention(module, x, memory, mask_pad, causal, window)
    real = slice(None) if mask_pad is None else ~mask_pad
    assert_close(actual[real], expected[real])


def test_alpha_zero_is_the_projected_linear(assert_close):
    torch.manual_seed(0)
    attention = SRUppAttention(7, 12, 4).eval()
    linear = SRUppProjectedLinear(7, 12, 4).eval()
    linear.load_state_dict({k: v for k, v in attention.state_dict().items() if not k.startswith(("kv_", "alpha"))})
    x = torch.randn(5, 3, 7)
    with torch.no_grad():
        assert_close(attention(x, causal=True), linear(x))
        expected = torch.nn.functional.layer_norm(x @ linear.in_proj.weight.T, (4,)) @ linear.out_proj.weight.T
        assert_close(linear(x), expected)


def test_gradients_reach_alpha_wk_wv():
    torch.manual_seed(0)
    module = SRUppAttention(5, 6, 4)
    x = torch.randn(3, 2, 5)
    module(x, causal=True).square().sum().backward()
    # At init alpha = 0: only alpha learns, and Wk, Wv start learning once alpha moves.
    assert module.alpha.grad.abs() > 0 and module.kv_proj.weight.grad.abs().sum() == 0
    module.zero_grad()
    with torch.no_grad():
        module.alpha.fill_(0.1)
    module(x, causal=True).square().sum().backward()
    wk, wv = module.kv_proj.weight.grad.chunk(2)
    assert module.alpha.grad.abs() > 0 and wk.abs().sum() > 0 and wv.abs().sum() > 0


def test_mask_never_leaves_a_row_empty():
    key_pad = torch.tensor([[False, True, True, True, True]])
    mask = attention_mask(5, 5, causal=True, window=1, key_pad=key_pad, device=torch.device("cpu"))
    assert mask.shape == (1, 1, 5, 5) and mask.any(-1).all()
    assert mask[0, 0, 4].tolist() == [False, False, False, False, True]
    assert attention_mask(3, 3, causal=False, window=None, key_pad=None, device=torch.device("cpu")) is None


def test_init_and_errors():
    module = SRUppAttention(8, 12, 4, dropout=0.5)
    assert module.alpha.item() == 0
    bound = math.sqrt(6 / (4 + 12)) * math.sqrt(0.5)
    assert module.out_proj.weight.abs().max() <= bound
    with pytest.raises(ValueError, match="divisible"):
        SRUppAttention(8, 12, 6, num_heads=4)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_nan_at_padded_positions_cannot_reach_real_positions(causal):
    torch.manual_seed(0)
    module = SRUppAttention(5, 9, 6, num_heads=2).eval()
    with torch.no_grad():
        module.alpha.fill_(0.8)
    x = torch.randn(4, 2, 5)
    mask_pad = torch.tensor([[False, False], [False, True], [False, True], [False, True]])
    with torch.no_grad():
        clean = module(x, mask_pad=mask_pad, causal=causal)
        dirty = module(x.masked_fill(mask_pad.unsqueeze(-1), float("nan")), mask_pad=mask_pad, causal=causal)
    assert torch.equal(dirty[~mask_pad], clean[~mask_pad]) and torch.isfinite(dirty).all()


@pytest.mark.parametrize("transform", ["attention", "projected"])
def test_u_projection_keeps_hooks_and_replacements(transform):
    """Without autograd U's matmul may write into a reused buffer (``srupp.ops.cached_linear``), but only for a
    plain ``nn.Linear``: hooks on it still run, and a module put in its place is called as it is."""
    module = SRUppAttention(16, 24, 8) if transform == "attention" else SRUppProjectedLinear(16, 24, 8)
    x = torch.randn(5, 2, 16)
    seen = []
    handle = module.out_proj.register_forward_hook(lambda mod, args, out: seen.append(out.shape))
    with torch.no_grad():
        plain = module(x)
    assert seen == [torch.Size([5, 2, 24])]
    handle.remove()

    class Doubled(torch.nn.Linear):
        def forward(self, input):
            return 2 * super().forward(input)

    doubled = Doubled(8, 24, bias=False)
    doubled.weight = module.out_proj.weight
    module.out_proj = doubled
    with torch.no_grad():
        assert torch.equal(module(x), 2 * plain)


def test_inference_with_reused_u_buffers_matches_training_mode_forward(assert_close):
    """A stack whose U is 33 MiB per layer (so it goes through the output cache): forward without autograd, twice
    (the second reusing the first call's buffers), equals the forward with autograd."""
    from srupp.nn import SRUpp
    from srupp.ops import cpu_kernel_info, empty_cpu_cache

    torch.manual_seed(0)
    model = SRUpp(64, 1024, 32, num_layers=2).eval()
    x = torch.randn(128, 22, 64)
    want, _ = model(x, causal=True)
    empty_cpu_cache()
    with torch.no_grad():
        first, _ = model(x, causal=True)
        first = first.clone()
        if getattr(torch._C, "_storage_Use_Count", None) is not None:  # else the cache is off
            assert cpu_kernel_info()["cache_bytes"] >= 128 * 22 * 3 * 1024 * 4
        second, _ = model(x, causal=True)
    assert_close(first, want.detach())
    assert torch.equal(first, second)


@pytest.mark.parametrize("block_rows", [1, 3], ids=["one-query-per-block", "three-queries-per-block"])
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_queries_in_blocks_match_written_out_equations(assert_close, monkeypatch, case, block_rows):
    """Long inputs attend a block of queries at a time (``MASK_ELEMENTS``); forced down to 1 or 3 queries per
    block here (one block holds rows * keys * batch * heads elements)."""
    from srupp.nn import attention

    keys = 4 + case.get("memory", 0)
    monkeypatch.setattr(attention, "MASK_ELEMENTS", block_rows * keys * 2 * case.get("num_heads", 1))
    test_attention_matches_written_out_equations(assert_close, case)


def masked_reference(module, x, memory, mask_pad, causal, window):
    """The attention transform with one boolean mask over all queries and keys (the path before blocks and the
    lower-right bias)."""
    query = module.in_proj(x.masked_fill(mask_pad.unsqueeze(-1), 0.0) if mask_pad is not None else x)
    keys, values = module.keys_values(query)
    memory_len = 0 if memory is None else memory.shape[0]
    if memory is not None:
        old_keys, old_values = module.keys_values(module.in_proj(memory))
        keys, values = torch.cat([old_keys, keys], dim=2), torch.cat([old_values, values], dim=2)
    key_pad = None
    if mask_pad is not None:
        key_pad = torch.cat([torch.zeros(x.shape[1], memory_len, dtype=torch.bool), mask_pad.t()], dim=1)
    mask = attention_mask(x.shape[0], keys.shape[2], causal=causal, window=window, key_pad=key_pad, device=x.device)
    return module.attend(query, keys, values, mask)


@pytest.mark.parametrize("block_rows", [None, 2], ids=["whole", "blocks-of-2"])
@pytest.mark.parametrize(
    "memory, padding, window",
    [(5, False, None), (5, True, None), (5, False, 3), (0, True, None)],
    ids=["memory", "memory-padding", "memory-window", "padding"],
)
def test_lower_right_bias_and_blocks_equal_the_masked_path_with_gradients(
    assert_close, monkeypatch, memory, padding, window, block_rows
):
    from srupp.nn import attention

    torch.manual_seed(1)
    module = SRUppAttention(6, 7, 8, num_heads=2)
    with torch.no_grad():
        module.alpha.fill_(0.7)
    steps, batch = 7, 3
    if block_rows is not None:
        monkeypatch.setattr(attention, "MASK_ELEMENTS", block_rows * (steps + memory) * batch * 2)
    x, old = torch.randn(steps, batch, 6), torch.randn(memory, batch, 6) if memory else None
    mask_pad = torch.zeros(steps, batch, dtype=torch.bool)
    mask_pad[-2:, 1] = True
    mask_pad = mask_pad if padding else None
    upstream = torch.randn(steps, batch, 7)
    results = []
    for run in (
        lambda: module(x, mask_pad=mask_pad, causal=True, memory=old, attn_window=window),
        lambda: masked_reference(module, x, old, mask_pad, True, window),
    ):
        module.zero_grad()
        out = run()
        out.backward(upstream)
        results.append([out.detach(), *(p.grad.clone() for p in module.parameters())])
    assert_close(results[0], results[1], atol=1e-5, rtol=1e-4)


def test_causal_attention_over_memory_takes_the_lower_right_bias(monkeypatch):
    """No boolean mask is built for causal attention over memory: SDPA gets a lower-right ``CausalBias``, which
    its flash and memory-efficient GPU kernels apply without one."""
    from torch.nn.attention.bias import CausalBias

    from srupp.nn import attention

    seen = []
    original = attention.SRUppAttention.mix

    def spy(self, query, keys, values, mask, is_causal=False):
        seen.append(mask)
        return original(self, query, keys, values, mask, is_causal)

    monkeypatch.setattr(attention.SRUppAttention, "mix", spy)
    module = SRUppAttention(4, 6, 8)
    module(torch.randn(5, 2, 4), causal=True, memory=torch.randn(3, 2, 4))
    assert len(seen) == 1 and isinstance(seen[0], CausalBias)
    assert (seen[0].seq_len_q, seen[0].seq_len_kv) == (5, 8)


def test_causal_attention_over_memory_under_a_dispatch_mode(assert_close):
    """Under a dispatch mode (here torch's FLOP counter), where no tensor subclass can be made, the boolean mask
    serves instead of the lower-right bias, with the same result."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    module = SRUppAttention(4, 6, 8)
    x, memory = torch.randn(5, 2, 4), torch.randn(3, 2, 4)
    expected = module(x, causal=True, memory=memory)
    with FlopCounterMode(display=False) as counter:
        actual = module(x, causal=True, memory=memory)
    assert counter.get_total_flops() > 0
    assert_close(actual, expected)
