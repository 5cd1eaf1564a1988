"""Blossom attention against naive dense-mask implementations written here, plus invariances."""

import math
from dataclasses import replace

import pytest
import torch
from causal import assert_causal

import recbole_blossom  # noqa: F401  (applies the compatibility shims)
from recbole_blossom.attention import BlossomAttention
from recbole_blossom.hparams import LONG_HISTORY, BlossomHParams, BlossomRuntime
from recbole_blossom.ltis import LTIS
from recbole_blossom.ops import naive
from recbole_blossom.rotary import RotaryEmbedding
from recbole_blossom.stis import STIS


def stis_attention(q, k, v, lengths=None, window=8, sink=True):
    return STIS(window=window, sink=sink)(q, k, v, lengths)

LENGTHS = [1, 5, 16, 31, 33, 50, 77]


def rel_err(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def dense_attention(q, k, v, mask):
    """Plain softmax attention; q ``(B, H, L, D)``, k/v ``(B, Hkv, L, D)``, mask ``(B|1, H|Hkv|1, L, L)``."""
    G = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    if mask.shape[1] not in (1, q.shape[1]):
        mask = mask.repeat_interleave(G, 1)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    return scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v


def naive_stis_mask(L, window=8, sink=True):
    t = torch.arange(L)[:, None]
    s = torch.arange(L)[None, :]
    dist = t - s
    power = (dist > 0) & ((dist & (dist - 1)) == 0)
    allowed = (dist < window) | power | ((s == 0) & sink)
    return (allowed & (dist >= 0))[None, None]


def naive_ltis_mask(q, k, ltis: LTIS):
    """Block selection written directly from the description, one query at a time."""
    B, H, L, D = q.shape
    Hkv = k.shape[1]
    l, d, ls, n = ltis.block_len, ltis.stride, ltis.select_size, ltis.n_select
    comp = ltis.compressor
    starts = list(range(0, L - l + 1, d)) if L >= l else []
    if ltis.compression == "mean":  # a block's compressed key: the mean of its keys
        k_cmp = [k[:, :, s:s + l].mean(2) for s in starts]
    else:
        k_cmp = [comp.mlp((k[:, :, s:s + l] + comp.intra_block_pos).flatten(-2)) for s in starts]
    mask = torch.zeros(B, Hkv, L, L, dtype=torch.bool)
    n_slc = math.ceil(L / ls)
    for t in range(L):
        visible = [i for i, s in enumerate(starts) if s + l - 1 <= t]
        keys = [ltis.memory_key[None].expand(B, Hkv, D)] + [k_cmp[i] for i in visible]
        keys = torch.stack(keys, dim=2)  # (B, Hkv, 1 + V, D)
        qk = (q[:, :, t][:, :, None, :] * keys.repeat_interleave(H // Hkv, 1)).sum(-1) / math.sqrt(D)
        if ltis.score_pool == "logits":  # the kv group's mean score, then one softmax
            p = qk.view(B, Hkv, H // Hkv, -1).mean(2).softmax(-1)[..., 1:]  # (B, Hkv, V)
        else:  # each head's softmax, then the mean of the probabilities
            p = qk.softmax(-1)[..., 1:].view(B, Hkv, H // Hkv, -1).mean(2)  # (B, Hkv, V)
        own = t // ls
        slc = torch.zeros(B, Hkv, n_slc)
        count = [0] * n_slc
        for col, i in enumerate(visible):
            for j in range(n_slc):
                if starts[i] < (j + 1) * ls and j * ls < starts[i] + l:
                    slc[..., j] += p[..., col]
                    count[j] += 1
        slc = slc / torch.tensor([max(c, 1) for c in count], dtype=slc.dtype)  # mean, not sum
        candidates = list(range(own))
        for b in range(B):
            for h in range(Hkv):
                if len(candidates) <= n:
                    chosen = candidates
                else:
                    chosen = slc[b, h, :own].topk(n).indices.tolist()
                for j in chosen + [own]:
                    mask[b, h, t, j * ls:(j + 1) * ls] = True
    return mask & torch.ones(L, L, dtype=torch.bool).tril()


def qkv(B, H, Hkv, L, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, L, D, generator=g), torch.randn(B, Hkv, L, D, generator=g),
            torch.randn(B, Hkv, L, D, generator=g))


@pytest.mark.parametrize("L", LENGTHS)
def test_stis_matches_dense_mask(L):
    q, k, v = qkv(2, 4, 2, L, 8, seed=L)
    out = stis_attention(q, k, v, window=8, sink=True)
    ref = dense_attention(q, k, v, naive_stis_mask(L))
    assert out.shape == (2, 4, L, 8)
    assert rel_err(out, ref) < 1e-5


def test_stis_without_sink_and_other_window():
    q, k, v = qkv(1, 2, 1, 70, 8)
    out = stis_attention(q, k, v, window=3, sink=False)
    assert rel_err(out, dense_attention(q, k, v, naive_stis_mask(70, window=3, sink=False))) < 1e-5


@pytest.mark.parametrize("L", LENGTHS + [300])
def test_ltis_matches_dense_mask(L):
    torch.manual_seed(L)
    ltis = LTIS(head_dim=8, n_kv_heads=2)
    q, k, v = qkv(2, 4, 2, L, 8, seed=L)
    out = ltis(q, k, v)
    ref = dense_attention(q, k, v, naive_ltis_mask(q, k, ltis))
    assert out.shape == (2, 4, L, 8)
    assert rel_err(out, ref) < 1e-5


@pytest.mark.parametrize("L", [40, 77, 130])
def test_ltis_gather_path_equals_dense_path(L):
    torch.manual_seed(0)
    ltis = LTIS(head_dim=8, n_kv_heads=2, n_select=2)
    q, k, v = qkv(2, 4, 2, L, 8, seed=1)
    idx = naive.select_blocks(q, ltis.compressor(k), ltis.memory_key, 32, 16, 16, 2, chunk_size=7)
    lengths = torch.tensor([L, L // 3])
    dense = naive.gathered_attention(q, k, v, idx, 16, lengths, dense_max_len=10**9)
    gather = naive.gathered_attention(q, k, v, idx, 16, lengths, dense_max_len=0)
    assert rel_err(gather, dense) < 1e-5
    stis = naive.gathered_attention(q, k, v, STIS().slots(L, "cpu"), 1, lengths, dense_max_len=0)
    assert rel_err(stis, stis_attention(q, k, v, lengths)) < 1e-5


def test_block_selection_does_not_depend_on_chunk_size():
    torch.manual_seed(0)
    ltis = LTIS(head_dim=8, n_kv_heads=2)
    q, k, _ = qkv(2, 4, 2, 200, 8)
    k_cmp = ltis.compressor(k)
    a = naive.select_blocks(q, k_cmp, ltis.memory_key, 32, 16, 16, 4, chunk_size=1024)
    b = naive.select_blocks(q, k_cmp, ltis.memory_key, 32, 16, 16, 4, chunk_size=13)
    assert torch.equal(a, b)
    # n_select distinct past blocks (fewer only while fewer exist), then the own block
    own = torch.arange(200) // 16
    assert torch.equal(a[..., -1], own.to(a.dtype).expand_as(a[..., -1]))
    past = a[..., :-1]
    assert bool(((past >= 0) & (past < own[:, None])).sum(-1).eq(own.clamp(max=4)).all())
    assert bool((past.sort(-1).values.diff(dim=-1)[past.sort(-1).values[..., 1:] >= 0] > 0).all())


def rope_reference(x, base=10000.0):
    """RoPE by explicit 2x2 rotations of the pairs (i, i + D/2)."""
    L, D = x.shape[-2], x.shape[-1]
    out = x.clone()
    for p in range(L):
        for i in range(D // 2):
            a = p * base ** (-2 * i / D)
            x1, x2 = x[..., p, i], x[..., p, i + D // 2]
            out[..., p, i] = x1 * math.cos(a) - x2 * math.sin(a)
            out[..., p, i + D // 2] = x1 * math.sin(a) + x2 * math.cos(a)
    return out


def test_rotary_matches_explicit_rotation_and_keeps_relative_scores():
    q, k, _ = qkv(1, 2, 2, 12, 8)
    qr, kr = RotaryEmbedding(8)(q, k)
    assert rel_err(qr, rope_reference(q)) < 1e-5 and rel_err(kr, rope_reference(k)) < 1e-5
    # the same content at shifted positions gives the same score: RoPE encodes relative position
    x = torch.randn(1, 1, 1, 8).expand(1, 1, 12, 8)
    xr, _ = RotaryEmbedding(8)(x, x)
    s = (xr[0, 0] @ xr[0, 0].T)
    assert torch.allclose(s[3, 1], s[9, 7], atol=1e-5)
    q_off, k_off = RotaryEmbedding(8, enabled=False)(q, k)  # use_rope: False rotates nothing
    assert q_off is q and k_off is k


def layer_reference(attn: BlossomAttention, x):
    """The whole layer composed from the naive pieces above."""
    hp = attn.hp
    B, L, _ = x.shape
    split = lambda t: t.view(B, L, -1, hp.head_dim).transpose(1, 2)  # noqa: E731
    q, k, v = split(attn.query(x)), split(attn.key(x)), split(attn.value(x))
    qr, kr = (rope_reference(q, hp.rope_base), rope_reference(k, hp.rope_base)) if hp.use_rope else (q, k)
    q_score, k_score = (qr, kr) if hp.ltis_score_rope else (q, k)
    ltis = dense_attention(qr, kr, v, naive_ltis_mask(q_score, k_score, attn.ltis))
    stis = dense_attention(qr, kr, v, naive_stis_mask(L, hp.stis_window, hp.stis_sink))
    g = torch.sigmoid(attn.gate.proj(x))  # (B, L, 2H)
    g1, g2 = g[..., : hp.n_heads].transpose(1, 2)[..., None], g[..., hp.n_heads:].transpose(1, 2)[..., None]
    ctx = (g1 * ltis + g2 * stis).transpose(1, 2).reshape(B, L, -1)
    return attn.LayerNorm(attn.dense(ctx) + x)


SMALL_BLOCKS = dict(cmp_block_len=8, cmp_stride=4, slc_block_size=4, n_slc_blocks=2)  # LTIS selects from L = 13
REFERENCE_SIZES = dict(hidden_size=128, n_heads=8, n_kv_heads=2, cmp_block_len=32, cmp_stride=16, slc_block_size=16,
                       n_slc_blocks=4)  # LTIS selects from L = 81


def small_attention(runtime=None, **kw):
    params = dict(hidden_size=32, n_heads=4, n_kv_heads=2, hidden_dropout_prob=0.0, attn_dropout_prob=0.0,
                  **SMALL_BLOCKS)
    params.update(kw)
    torch.manual_seed(0)
    attn = BlossomAttention(BlossomHParams(**params), runtime)
    attn.apply(lambda m: torch.nn.init.normal_(m.weight, std=0.3) if isinstance(m, torch.nn.Linear) else None)
    attn.reset_parameters(0.3)
    return attn.eval()


@pytest.mark.parametrize("L,score_rope,pool,compression,rope", [
    (9, False, "probs", "mlp", True), (40, False, "probs", "mlp", True), (70, False, "probs", "mlp", True),
    (70, True, "probs", "mlp", True), (40, True, "logits", "mlp", True), (70, True, "logits", "mlp", True),
    (70, False, "logits", "mlp", True), (70, True, "logits", "mean", True), (70, False, "probs", "mean", True),
    (70, True, "logits", "mean", False), (70, True, "logits", "mlp", False)])
def test_layer_matches_naive_composition(L, score_rope, pool, compression, rope):
    attn = small_attention(ltis_score_rope=score_rope, ltis_score_pool=pool, ltis_compression=compression,
                           use_rope=rope)
    x = torch.randn(2, L, 32)
    assert rel_err(attn(x), layer_reference(attn, x)) < 1e-5


def per_head_twin(attn):
    """A layer with a kv head per query head holding ``attn``'s key and value rows repeated for each query head of
    their group: what ``ltis_score_pool: head`` must compute (every other parameter copied)."""
    hp = attn.hp
    twin = BlossomAttention(replace(hp, n_kv_heads=hp.n_heads, ltis_score_pool="logits"), attn.runtime).eval()
    state = dict(attn.state_dict())
    G, D = hp.n_heads // hp.n_kv_heads, hp.head_dim
    for name in ("key.weight", "key.bias", "value.weight", "value.bias"):
        rows = state[name].view(hp.n_kv_heads, D, *state[name].shape[1:])
        state[name] = rows.repeat_interleave(G, dim=0).reshape(hp.n_heads * D, *state[name].shape[1:])
    twin.load_state_dict(state)
    return twin


@pytest.mark.parametrize("L,sizes,settings", [
    (70, {}, {}), (70, {}, dict(ltis_score_rope=False)), (70, {}, LONG_HISTORY),
    (300, REFERENCE_SIZES, dict(ltis_compression="mean"))])
def test_per_head_selection_is_the_repeated_kv_layer(L, sizes, settings):
    """``ltis_score_pool: head`` (each query head picks its own blocks, kv heads shared) equals a layer with a kv
    head per query head whose k and v rows are the shared ones repeated, where LTIS selects; and it picks other
    blocks than the pooled choice (the outputs differ), so the option does something."""
    attn = small_attention(**sizes, **settings, ltis_score_pool="head")
    assert not attn.ltis.selects_all(L)
    x = torch.randn(2, L, attn.hp.hidden_size)
    lengths = torch.tensor([L, L - 9])
    out = attn(x, lengths)
    assert rel_err(out, per_head_twin(attn)(x, lengths)) < 1e-5
    pooled = BlossomAttention(replace(attn.hp, ltis_score_pool="logits"), attn.runtime).eval()
    state = dict(attn.state_dict())  # the same parameters; the memory key of each kv head, not of each query head
    state["ltis.memory_key"] = state["ltis.memory_key"][:: attn.hp.n_heads // attn.hp.n_kv_heads]
    pooled.load_state_dict(state)
    assert rel_err(out, pooled(x, lengths)) > 1e-3


def test_layer_matches_naive_composition_at_reference_sizes():
    """Reference sizes (hidden 128, 8 heads, 2 kv heads, blocks 32/16/16, top 4) at L = 200: 13 selection
    blocks, so most queries choose 4 of up to 12 past blocks."""
    attn = small_attention(**REFERENCE_SIZES)
    torch.nn.init.normal_(attn.query.weight, std=0.1)
    torch.nn.init.normal_(attn.key.weight, std=0.1)
    x = torch.randn(1, 200, 128)
    assert rel_err(attn(x), layer_reference(attn, x)) < 1e-5


def test_mean_compression_at_reference_sizes():
    attn = small_attention(**REFERENCE_SIZES, ltis_compression="mean")
    assert not any(name.startswith("ltis.compressor") for name, _ in attn.named_parameters())
    x = torch.randn(1, 300, 128)
    q_rot, k_rot = attn.rotary(attn.heads(attn.query(x)), attn.heads(attn.key(x)))
    mask = naive_ltis_mask(q_rot, k_rot, attn.ltis)
    assert (mask != torch.ones(300, 300, dtype=torch.bool).tril()).sum() > 300  # selection is active
    assert rel_err(attn(x), layer_reference(attn, x)) < 1e-5


def test_mean_compression_picks_the_blocks_that_hold_what_the_query_matches():
    """Keys that match the query planted in two far blocks (among 15 past ones, L = 256, reference block
    sizes): with block means the query's top 4 holds both (no trained parameter is needed to find them)."""
    torch.manual_seed(0)
    ltis = LTIS(head_dim=16, n_kv_heads=2, compression="mean")
    L, t = 256, 250
    q = torch.randn(1, 8, L, 16) * 0.1
    k = torch.randn(1, 2, L, 16) * 0.1
    direction = torch.randn(16)
    direction = direction / direction.norm()
    q[:, :, t] = 4 * direction  # every query head of both kv groups looks for ``direction``
    for block in (2, 9):  # selection blocks of 16: positions 32..47 and 144..159
        k[:, :, block * 16:(block + 1) * 16] += 2 * direction
    idx = ltis.select(q, k)[0, :, t]  # (Hkv, n_select + 1)
    for head in range(2):
        chosen = set(idx[head].tolist())
        assert {2, 9} <= chosen and t // 16 in chosen, chosen


def test_selection_is_active_where_tested():
    """The LTIS pattern of the tests above is not causal attention: some queries skip past blocks."""
    for L, kw in ((70, SMALL_BLOCKS), (200, {})):
        ltis = small_attention(**kw).ltis
        q, k, v = qkv(1, 4, 2, L, 8, seed=5)
        mask = naive_ltis_mask(q, k, ltis)
        causal = torch.ones(L, L, dtype=torch.bool).tril()
        assert (mask != causal).sum() > L, L
        assert rel_err(ltis(q, k, v), dense_attention(q, k, v, causal[None, None])) > 1e-2


@pytest.mark.parametrize("L", [200, 512])
@pytest.mark.parametrize("pool", ["probs", "logits"])
def test_every_past_block_competes_fairly(L, pool):
    """Over random inputs (reference sizes), each past block -- block 0 and the one just before the query's
    own block included -- is chosen at a rate within a factor of 2 of the uniform share n_select / o, with
    either pooling over the kv group."""
    torch.manual_seed(0)
    ltis = LTIS(head_dim=16, n_kv_heads=2, score_pool=pool)
    own = torch.arange(L) // 16
    n_slc = int(own[-1]) + 1
    chosen = torch.zeros(L, n_slc)
    trials = 0
    for rep in range(2):
        q, k, _ = qkv(16, 8, 2, L, 16, seed=rep)
        idx = ltis.select(q, k).long()[..., :-1]  # (B, Hkv, L, 4) past blocks
        hits = torch.zeros(16, 2, L, n_slc + 1).scatter_(-1, torch.where(idx >= 0, idx, n_slc), 1.0)
        chosen += hits[..., :n_slc].sum((0, 1))
        trials += 32
    rows = own > 4  # queries with more past blocks than they may pick
    rate = chosen[rows] / trials
    uniform = 4.0 / own[rows].float()
    for block in range(n_slc - 1):
        past = own[rows] > block
        ratio = (rate[past, block] / uniform[past]).mean().item()
        assert 0.5 <= ratio <= 2.0, (block, ratio)
    latest = (rate[torch.arange(rate.shape[0]), own[rows] - 1] / uniform).mean().item()
    assert 0.5 <= latest <= 2.0, latest


@pytest.mark.parametrize("settings,ltis,stis", [({}, -2.0, 2.0), (LONG_HISTORY, 10.0, 2.0)])
def test_gate_bias_initialisation(settings, ltis, stis):
    attn = small_attention(**settings)
    bias = attn.gate.proj.bias
    assert torch.all(bias[:4] == ltis) and torch.all(bias[4:] == stis)


def test_causality():
    attn = small_attention()
    x = torch.randn(1, 70, 32)
    y = attn(x)
    for t in (0, 15, 16, 47, 68):
        x2 = x.clone()
        x2[:, t + 1:] = torch.randn_like(x2[:, t + 1:])
        assert torch.allclose(attn(x2)[:, : t + 1], y[:, : t + 1], atol=1e-6), t


@pytest.mark.parametrize("settings", [dict(ltis_compression="mlp"), dict(ltis_compression="mean"), LONG_HISTORY])
def test_causality_where_ltis_selects_at_reference_sizes(settings):
    """At the reference sizes and L = 300 (19 selection blocks, 4 picked) with block scoring in chunks of 128
    queries, no output at a position depends on a later item, in eval and (same dropout draw) train mode, and no
    query's block choice depends on a later key: every-position training relies on it. Also with the long-history
    settings (no RoPE: nothing but causality keeps later keys out)."""
    attn = small_attention(BlossomRuntime(ltis_chunk_size=128), **REFERENCE_SIZES, **settings,
                           hidden_dropout_prob=0.2, attn_dropout_prob=0.2)
    L = 300
    assert not attn.ltis.selects_all(L)
    assert_causal(attn, torch.randn(2, L, 128), torch.tensor([L, 251]), (130, 255, 256, 266, 298))
    # The block choice of every query, for every cut: keys after t may not change the choice of queries <= t.
    q, k = torch.randn(2, 8, L, 16), torch.randn(2, 2, L, 16)
    chosen = attn.ltis.select(q, k)
    for t in range(L - 1):
        k2 = k.clone()
        k2[:, :, t + 1:] = torch.randn_like(k2[:, :, t + 1:])
        assert torch.equal(attn.ltis.select(q, k2)[:, :, : t + 1], chosen[:, :, : t + 1]), t


def test_padding_and_batch_invariance():
    attn = small_attention()
    lengths = torch.tensor([70, 23, 5])
    x = torch.randn(3, 70, 32)
    y = attn(x, lengths)
    for b, n in enumerate(lengths.tolist()):
        alone = attn(x[b:b + 1, :n], lengths[b:b + 1])  # no padding, no other sequences
        assert torch.allclose(y[b, :n], alone[0], atol=1e-5)
        padded = torch.cat((x[b:b + 1, :n], torch.randn(1, 90 - n, 32)), dim=1)  # longer, different padding
        assert torch.allclose(attn(padded, lengths[b:b + 1])[0, :n], alone[0], atol=1e-5)


def test_gradients_reach_trainable_parameters_only():
    attn = small_attention(hidden_dropout_prob=0.1, attn_dropout_prob=0.1).train()
    x = torch.randn(2, 80, 32, requires_grad=True)
    attn(x, torch.tensor([80, 41])).pow(2).sum().backward()
    frozen = {n for n, p in attn.named_parameters() if not p.requires_grad}
    assert frozen == {"ltis.memory_key", "ltis.compressor.intra_block_pos", "ltis.compressor.mlp.0.weight",
                      "ltis.compressor.mlp.0.bias", "ltis.compressor.mlp.2.weight", "ltis.compressor.mlp.2.bias"}
    for name, p in attn.named_parameters():
        if name in frozen:
            assert p.grad is None, name
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert x.grad.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_runs_and_stays_close(dtype):
    attn = small_attention()
    x = torch.randn(2, 50, 32)
    ref = attn(x)
    with torch.autocast("cpu", dtype=dtype):
        out = attn(x)
    assert torch.isfinite(out).all()
    assert rel_err(out.float(), ref) < 5e-2


def naive_compressed_attention(q, k, v, ltis: LTIS):
    """Each query over the memory slot and the compressed blocks that end at or before it."""
    B, H, L, D = q.shape
    G = H // k.shape[1]
    l, d = ltis.block_len, ltis.stride
    starts = list(range(0, L - l + 1, d)) if L >= l else []
    comp = lambda c, x, s: c.mlp((x[:, :, s:s + l] + c.intra_block_pos).flatten(-2))  # noqa: E731
    out = torch.zeros_like(q)
    for t in range(L):
        vis = [s for s in starts if s + l - 1 <= t]
        keys = torch.stack([ltis.memory_key.expand(B, -1, -1)] + [comp(ltis.compressor, k, s) for s in vis], 2)
        vals = torch.stack([ltis.memory_value.expand(B, -1, -1)] + [comp(ltis.value_compressor, v, s) for s in vis], 2)
        keys, vals = keys.repeat_interleave(G, 1), vals.repeat_interleave(G, 1)
        p = ((q[:, :, t, None, :] * keys).sum(-1) / math.sqrt(D)).softmax(-1)
        out[:, :, t] = (p[..., None] * vals).sum(2)
    return out


@pytest.mark.parametrize("L", [40, 130])
def test_trainable_compression_variant(L):
    torch.manual_seed(0)
    ltis = LTIS(head_dim=8, n_kv_heads=2, trainable_compression=True)
    q, k, v = qkv(2, 4, 2, L, 8, seed=3)
    q.requires_grad_(True)
    out = ltis(q, k, v)
    ref = dense_attention(q, k, v, naive_ltis_mask(q, k, ltis)) + naive_compressed_attention(q, k, v, ltis)
    assert rel_err(out, ref) < 1e-5
    out.pow(2).sum().backward()
    for name, p in ltis.named_parameters():  # now every compression parameter trains
        assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name


def test_trainable_compression_is_off_by_default_and_validated():
    assert BlossomHParams().ltis_trainable_compression is False
    with pytest.raises(ValueError, match="ltis_trainable_compression"):
        BlossomHParams(ltis_trainable_compression="yes").validate()
