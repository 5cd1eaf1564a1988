"""The fast path (Triton kernels) against the PyTorch path, and the ``blossom_impl`` dispatch.

The GPU tests skip where CUDA is unavailable; the dispatch tests run anywhere in a few seconds.
"""

import math

import pytest
import torch
from causal import assert_causal
from tiny_runs import inside, tiny

import recbole_blossom
from recbole_blossom.attention import BlossomAttention
from recbole_blossom.hparams import BlossomHParams, BlossomRuntime
from recbole_blossom.ltis import LTIS
from recbole_blossom.ops import launch as launch_mod
from recbole_blossom.ops import naive, parallel, use_fast
from recbole_blossom.ops.naive import num_compressed_blocks
from recbole_blossom.rotary import rotary_cos_sin
from recbole_blossom.stis import stis_slots

gpu = pytest.mark.skipif(not parallel.available(), reason="needs CUDA and Triton")
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-2}
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])


def layer(impl="auto", **hp):
    return BlossomAttention(BlossomHParams(**hp), BlossomRuntime(blossom_impl=impl))


# --- dispatch (CPU) -------------------------------------------------------------------------------------

@pytest.mark.parametrize("value", ["gpu", "", None, 1, "Fast"])
def test_blossom_impl_validated(value):
    with pytest.raises(ValueError, match="blossom_impl.*auto, torch, fast"):
        BlossomRuntime(blossom_impl=value).validate()


def test_blossom_impl_from_config():
    assert BlossomRuntime.from_config({}).blossom_impl == "auto"
    assert BlossomRuntime.from_config({"blossom_impl": "torch"}).blossom_impl == "torch"
    attn = BlossomAttention(BlossomHParams(), BlossomRuntime.from_config({"blossom_impl": "fast"}))
    assert attn.ltis.impl == attn.stis.impl == "fast"


def test_auto_and_torch_pick_pytorch_on_cpu():
    x = torch.zeros(1, 1, 4, 16)
    assert not use_fast("auto", x)
    assert not use_fast("torch", x)
    assert not use_fast("auto", x.double())


def test_fast_on_cpu_is_a_clear_error():
    attn = layer("fast", hidden_size=32, n_heads=4, n_kv_heads=2)
    with pytest.raises(RuntimeError, match="blossom_impl='fast' needs Triton and a CUDA tensor"):
        attn(torch.randn(2, 20, 32), torch.tensor([20, 7]))


def test_launch_helpers():
    """The host-side grid helpers (plain Python stand-ins for triton.cdiv / next_power_of_2)."""
    for n in range(1, 5000):
        p = parallel._next_pow2(n)
        assert p >= n and p & (p - 1) == 0 and p // 2 < n, n
        for d in (1, 3, 16, 64):
            assert parallel._cdiv(n, d) == math.ceil(n / d)
    assert parallel._cdiv(0, 16) == 0


def test_auto_on_cpu_equals_torch():
    torch.manual_seed(0)
    auto = layer("auto", hidden_size=32, n_heads=4, n_kv_heads=2).eval()
    forced = layer("torch", hidden_size=32, n_heads=4, n_kv_heads=2).eval()
    forced.load_state_dict(auto.state_dict())
    x, lengths = torch.randn(2, 40, 32), torch.tensor([40, 13])
    torch.testing.assert_close(auto(x, lengths), forced(x, lengths), rtol=0, atol=0)


# --- fast path against the PyTorch path (GPU) -----------------------------------------------------------

def rel_err(a, b):
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def random_qkv(B, H, Hkv, L, D, dtype, seed):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(B, H, L, D, device="cuda", generator=gen).to(dtype)
    k = torch.randn(B, Hkv, L, D, device="cuda", generator=gen).to(dtype)
    v = torch.randn(B, Hkv, L, D, device="cuda", generator=gen).to(dtype)
    return q, k, v, torch.randn(B, H, L, D, device="cuda", generator=gen).to(dtype)


def compare(fast_fn, ref_fn, q, k, v, dout):
    """Outputs and input gradients of ``fast_fn`` (inputs as given) against ``ref_fn`` (float32 inputs)."""
    results = []
    for fn, dtype in ((fast_fn, q.dtype), (ref_fn, torch.float32)):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        out = fn(*leaves)
        out.backward(dout.to(dtype))
        results.append([out.detach()] + [t.grad for t in leaves])
    return [rel_err(f, r) for f, r in zip(*results)]


CASES = [  # B, H, Hkv, L, lengths
    (2, 8, 2, 37, [37, 20]),
    (3, 8, 2, 200, [200, 131, 1]),  # dense-mask branch of the PyTorch path
    (2, 4, 4, 300, [300, 299]),
    (2, 8, 2, 1000, [1000, 517]),
    (1, 8, 1, 2053, [2053]),
]


@gpu
@DTYPES
@pytest.mark.parametrize("B,H,Hkv,L,lengths", CASES)
def test_stis_fast_matches_torch(B, H, Hkv, L, lengths, dtype):
    q, k, v, dout = random_qkv(B, H, Hkv, L, 16, dtype, seed=L)
    lengths = torch.tensor(lengths, device="cuda")
    idx = stis_slots(L, 8, True, "cuda")
    errs = compare(lambda q, k, v: parallel.gathered_attention(q, k, v, idx, 1, lengths),
                   lambda q, k, v: naive.gathered_attention(q, k, v, idx, 1, lengths), q, k, v, dout)
    assert max(errs) < TOL[dtype], errs
    for window, sink in ((8, True), (3, False)):  # the kernel's own STIS mask against the slot reference
        errs = compare(lambda q, k, v: parallel.stis_attention(q, k, v, window, sink, lengths),
                       lambda q, k, v: naive.gathered_attention(q, k, v, stis_slots(L, window, sink, "cuda"), 1,
                                                                lengths), q, k, v, dout)
        assert max(errs) < TOL[dtype], (window, sink, errs)


@gpu
@DTYPES
@pytest.mark.parametrize("B,H,Hkv,L,lengths", CASES)
@pytest.mark.parametrize("select_size,n_select", [(16, 4), (32, 2)])
@pytest.mark.parametrize("kernel", [k for k in parallel.LTIS_KERNELS if k != "auto"])
def test_ltis_attention_fast_matches_torch(B, H, Hkv, L, lengths, dtype, select_size, n_select, kernel):
    """Each LTIS kernel (presence-byte tiles, slot-walking tiles, CUDA-core gathers); the default one runs in
    every layer and model test."""
    q, k, v, dout = random_qkv(B, H, Hkv, L, 16, dtype, seed=L + 1)
    lengths = torch.tensor(lengths, device="cuda")
    k_cmp = torch.randn(B, Hkv, num_compressed_blocks(L, 32, 16), 16, device="cuda")
    idx = naive.select_blocks(q.float(), k_cmp, torch.randn(Hkv, 16, device="cuda"), 32, 16, select_size,
                              n_select, chunk_size=256)
    errs = compare(lambda q, k, v: parallel.gathered_attention(q, k, v, idx, select_size, lengths, kernel=kernel),
                   lambda q, k, v: naive.gathered_attention(q, k, v, idx, select_size, lengths), q, k, v, dout)
    assert max(errs) < TOL[dtype], errs


@gpu
@DTYPES
@pytest.mark.parametrize("B,H,Hkv,L,lengths", [CASES[1], CASES[3], (2, 8, 2, 45, [45, 30])])
@pytest.mark.parametrize("kernel", ["auto", "slots", "presence"])
def test_branch_attention_fast_matches_torch(B, H, Hkv, L, lengths, dtype, kernel):
    """Both branches and the gate (one autograd node on the tensor-core kernels, the ops one by one for float32
    by default): output and the gradients of q, k, v and the gate logits, at lengths where LTIS selects and
    where it is causal attention (``idx`` None)."""
    q, k, v, _ = random_qkv(B, H, Hkv, L, 16, dtype, seed=L + 2)
    gen = torch.Generator(device="cuda").manual_seed(L)
    logits = torch.randn(B, L, 2 * H, device="cuda", generator=gen).to(dtype)
    dout = torch.randn(B, L, H * 16, device="cuda", generator=gen)
    lengths = torch.tensor(lengths, device="cuda")
    idx = None if L <= 80 else naive.select_blocks(
        q.float(), torch.randn(B, Hkv, num_compressed_blocks(L, 32, 16), 16, device="cuda", generator=gen),
        torch.randn(Hkv, 16, device="cuda", generator=gen), 32, 16, 16, 4)
    results = []
    for fn, dt in ((lambda *x: parallel.branch_attention(*x[:3], idx, 16, 8, True, x[3], lengths, kernel=kernel),
                    dtype),
                   (lambda *x: naive.branch_attention(*x[:3], idx, 16, 8, True, x[3], lengths), torch.float32)):
        leaves = [t.detach().to(dt).requires_grad_() for t in (q, k, v, logits)]
        out = fn(*leaves)
        out.backward(dout.to(dt))
        results.append([out.detach()] + [t.grad for t in leaves])
    errs = [rel_err(f, r) for f, r in zip(*results)]
    assert max(errs) < TOL[dtype], errs


def test_ltis_kernel_choice_is_validated():
    """CPU: an unknown kernel, or slot-walking tiles with blocks that are not whole chunks, is a clear error."""
    q = torch.zeros(1, 2, 40, 16)
    idx = torch.zeros(1, 1, 40, 2, dtype=torch.int32)
    with pytest.raises(ValueError, match="kernel must be one of auto, presence, slots, gather; got 'fastest'"):
        parallel.gathered_attention(q, q[:, :1], q[:, :1], idx, 16, kernel="fastest")
    with pytest.raises(ValueError, match="kernel='slots' needs blocks of whole 16-key chunks; got block=24"):
        parallel.gathered_attention(q, q[:, :1], q[:, :1], idx, 24, kernel="slots")


def test_ltis_kernel_default_by_dtype_and_length():
    """CPU: float32 keeps exact products (gather kernels); bf16/fp16 tiles walk their own slots where blocks are
    whole chunks (from SLOT_WALK_MIN_LEN on), else scan presence bytes up to TC_MAX_LEN, then gather."""
    def q(L, dtype=torch.bfloat16):
        return torch.zeros(1, 1, L, 1, dtype=dtype)
    assert parallel.ltis_kernel(q(4096, torch.float32), 16) == "gather"
    for L in (200, 1024, parallel.TC_MAX_LEN * 4):
        want = "slots" if L >= parallel.SLOT_WALK_MIN_LEN else "presence"
        assert parallel.ltis_kernel(q(L), 16) == parallel.ltis_kernel(q(L, torch.float16), 32) == want
    assert parallel.ltis_kernel(q(parallel.TC_MAX_LEN), 24) == "presence"
    assert parallel.ltis_kernel(q(parallel.TC_MAX_LEN + 1), 24) == "gather"


@gpu
@DTYPES
@pytest.mark.parametrize("L,D", [(37, 16), (200, 8), (1030, 32)])
def test_rotary_fast_matches_torch(L, D, dtype):
    """RoPE of q and k in one kernel: values and gradients against the PyTorch formula, from the strided
    (B, L, heads, D) views the fused projection gives, and contiguous results."""
    B, H, Hkv = 2, 8, 2
    qkv = torch.randn(B, L, (H + 2 * Hkv) * D, device="cuda")
    cos, sin = rotary_cos_sin(L, D, device="cuda")
    w = torch.randn(B, H + Hkv, L, D, device="cuda")

    def run(fn, precision):
        x = qkv.detach().to(precision).requires_grad_()
        q = x[..., : H * D].view(B, L, H, D).transpose(1, 2)
        k = x[..., H * D:(H + Hkv) * D].view(B, L, Hkv, D).transpose(1, 2)
        q_rot, k_rot = fn(q, k, cos, sin)
        (torch.cat((q_rot, k_rot), 1).float() * w).sum().backward()
        return [q_rot.float(), k_rot.float(), x.grad.float()], (q_rot, k_rot)

    exact, _ = run(naive.rotary, torch.float32)
    fast, (q_rot, k_rot) = run(parallel.rotary, dtype)
    assert q_rot.dtype == k_rot.dtype == dtype and q_rot.is_contiguous() and k_rot.is_contiguous()
    errs = [rel_err(f, r) for f, r in zip(fast, exact)]
    assert max(errs) < (1e-6 if dtype == torch.float32 else 1e-2), errs


@gpu
@DTYPES
@pytest.mark.parametrize("L,D", [(37, 16), (200, 8)])
def test_gate_combine_fast_matches_torch(L, D, dtype):
    """The gate in one kernel: output and the gradients of the gate logits and of both branches."""
    B, H = 3, 8
    gen = torch.Generator(device="cuda").manual_seed(L)
    inputs = [torch.randn(B, L, 2 * H, device="cuda", generator=gen)] + [
        torch.randn(B, H, L, D, device="cuda", generator=gen) for _ in range(2)]
    w = torch.randn(B, L, H * D, device="cuda", generator=gen)

    def run(fn, precision):
        leaves = [x.detach().to(precision).requires_grad_() for x in inputs]
        out = fn(*leaves)
        (out.float() * w).sum().backward()
        return [out.float()] + [x.grad.float() for x in leaves], out

    exact, _ = run(naive.gate_combine, torch.float32)
    fast, out = run(parallel.gate_combine, dtype)
    assert out.shape == (B, L, H * D) and out.dtype == dtype
    errs = [rel_err(f, r) for f, r in zip(fast, exact)]
    assert max(errs) < (1e-6 if dtype == torch.float32 else 1e-2), errs


@gpu
@pytest.mark.parametrize("D,block_len,stride,L", [(16, 32, 16, 200), (8, 8, 4, 77), (12, 32, 16, 90), (16, 32, 16, 31)])
def test_compress_blocks_fast_matches_torch(D, block_len, stride, L):
    """The compression MLP in one kernel (no gradient) against the PyTorch formula, float32 and under bf16
    autocast (as LTIS scores), including lengths with no whole block; with grad needed, the PyTorch path runs."""
    torch.manual_seed(L)
    comp = LTIS(D, 2, block_len=block_len, stride=stride, select_size=16, n_select=4).compressor.cuda()
    torch.nn.init.normal_(comp.intra_block_pos, std=0.5)
    params = (comp.intra_block_pos, comp.mlp[0].weight, comp.mlp[0].bias, comp.mlp[2].weight, comp.mlp[2].bias)
    k = torch.randn(3, 2, L, D, device="cuda")
    with torch.no_grad():
        exact = naive.compress_blocks(k, *params, block_len, stride)
        assert torch.equal(comp(k), parallel.compress_blocks(k, *params, block_len, stride))
        for dtype in (torch.float32, torch.bfloat16):
            with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
                fast = parallel.compress_blocks(k.to(dtype), *params, block_len, stride)
            assert fast.shape == exact.shape and fast.dtype == dtype
            if exact.numel():
                assert rel_err(fast, exact) < (1e-5 if dtype == torch.float32 else 2e-2)
    trainable = [p.detach().requires_grad_() for p in params]
    out = recbole_blossom.ops.compress_blocks(k, *trainable, block_len, stride)
    assert out.requires_grad or not out.numel()


def selected_scores(q, k_cmp, mem, idx, geometry):
    """Reference selection scores of the chosen past blocks, sorted (compares choices up to exact ties)."""
    L = q.shape[2]
    scores = naive.selection_scores(q, k_cmp, mem, torch.arange(L, device=q.device), *geometry[:3],
                                    -(-L // geometry[2]), 1.0 / q.shape[-1] ** 0.5)
    past = idx[..., :-1].long()
    picked = torch.gather(scores, -1, past.clamp_min(0)).masked_fill(past < 0, float("-inf"))
    return picked.sort(-1).values


@gpu
@pytest.mark.parametrize("B,H,Hkv,L,D,geometry", [
    (2, 8, 2, 200, 16, (32, 16, 16, 4)),
    (3, 8, 2, 1111, 16, (32, 16, 16, 4)),
    (1, 4, 1, 333, 8, (32, 16, 32, 2)),
    (2, 4, 2, 77, 8, (8, 4, 4, 2)),  # small blocks: selection active at short L
    (1, 8, 2, 4099, 16, (32, 16, 16, 8)),
    (2, 2, 2, 200, 16, (32, 16, 16, 4)),  # one query head a kv head: how ltis_score_pool logits calls it
])
@pytest.mark.parametrize("pool", ["probs", "logits"])
def test_select_blocks_fast_matches_torch(B, H, Hkv, L, D, geometry, pool):
    gen = torch.Generator(device="cuda").manual_seed(L)
    q = torch.randn(B, H, L, D, device="cuda", generator=gen)
    k_cmp = torch.randn(B, Hkv, num_compressed_blocks(L, *geometry[:2]), D, device="cuda", generator=gen)
    mem = torch.randn(Hkv, D, device="cuda", generator=gen)
    ref = naive.select_blocks(q, k_cmp, mem, *geometry, chunk_size=300, pool=pool)
    fast = parallel.select_blocks(q, k_cmp, mem, *geometry, pool=pool)
    if pool == "logits":  # the kernel's in-place group mean equals scoring the group-mean query
        q = q.view(B, Hkv, H // Hkv, L, D).mean(2)
    assert fast.shape == ref.shape and torch.equal(fast[..., -1], ref[..., -1])
    same = (fast[..., :-1].sort(-1).values == ref[..., :-1].sort(-1).values).all(-1).float().mean().item()
    assert same > 0.99, same  # identical choices except on near-ties (TF32 scores)
    exact = parallel.select_blocks(q, k_cmp, mem, *geometry, precision="ieee")  # q pooled already
    assert (exact[..., :-1].sort(-1).values == ref[..., :-1].sort(-1).values).all(-1).float().mean() > 0.999
    # where the choices differ, they are as good: the chosen blocks' exact scores agree to TF32 rounding
    torch.testing.assert_close(selected_scores(q, k_cmp, mem, fast, geometry),
                               selected_scores(q, k_cmp, mem, ref, geometry), rtol=1e-2, atol=1e-5)


@gpu
def test_float32_branches_save_one_copy_of_q_k_v():
    """float32, LTIS selecting: both branches run the gather kernels, which need dense q, k, v. Without RoPE q and
    k are views of the fused projection; copied once for both branches, the layer keeps less for the backward
    than with RoPE (whose rotated q, k and cos/sin tables it keeps); copied per branch, it kept more."""
    def saved_bytes(use_rope):
        torch.manual_seed(0)
        attn = layer("fast", hidden_size=128, n_heads=8, n_kv_heads=2, ltis_compression="mean",
                     use_rope=use_rope).cuda().train()
        storages = {}

        def pack(t):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        x = torch.randn(2, 700, 128, device="cuda", requires_grad=True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            attn(x, torch.tensor([700, 500], device="cuda"))
        return sum(storages.values())

    assert saved_bytes(False) < saved_bytes(True)


@gpu
@DTYPES
@pytest.mark.parametrize("L,blocks", [(45, {}), (200, {}), (700, {}), (1100, {}),
                                      (77, dict(cmp_block_len=8, cmp_stride=4, slc_block_size=4, n_slc_blocks=2)),
                                      (700, dict(ltis_compression="mean")),
                                      (700, dict(ltis_compression="mean", use_rope=False)),  # strided q, k
                                      (700, dict(ltis_compression="mean", ltis_score_pool="head"))])
def test_layer_fast_matches_torch(L, blocks, dtype):
    """Whole attention layer (projections, RoPE, selection, gate): outputs and every parameter gradient.
    float32: the fast path equals the PyTorch path. bf16/fp16 (autocast): against the float32 PyTorch layer,
    the fast path's error is no larger than twice the PyTorch path's own error in that precision, plus 1e-2
    (selection may flip on near-ties in either)."""
    torch.manual_seed(0)
    hp = dict(hidden_size=128, n_heads=8, n_kv_heads=2, **blocks)
    fast, ref = layer("fast", **hp).cuda().eval(), layer("torch", **hp).cuda().eval()
    ref.load_state_dict(fast.state_dict())
    x = torch.randn(3, L, 128, device="cuda")
    lengths = torch.tensor([L, L // 2, 3], device="cuda")
    w = torch.randn(3, L, 128, device="cuda")

    # without RoPE a key bias adds the same q.b to every score of a query: softmax ignores it, so its gradient is
    # zero up to rounding and a relative error of it means nothing (checked to be small instead)
    shift_free = set() if blocks.get("use_rope", True) else {"key.bias"}

    def run(attn, precision):
        attn.zero_grad()
        with torch.autocast("cuda", dtype=precision, enabled=precision != torch.float32):
            out = attn(x, lengths)
        (out.float() * w).sum().backward()
        for name in shift_free:
            grad = dict(attn.named_parameters())[name].grad
            bound = 1e-5 if precision == torch.float32 else 2e-2  # the PyTorch path on a CPU: 9e-8, bf16 2e-3
            assert grad.abs().max() < bound * attn.key.weight.grad.abs().max(), name
        return [out.detach().float()] + [p.grad.clone() for n, p in attn.named_parameters()
                                          if p.requires_grad and n not in shift_free]

    exact = run(ref, torch.float32)
    fast_errs = [rel_err(a, b) for a, b in zip(run(fast, dtype), exact)]
    if dtype == torch.float32:
        assert max(fast_errs) < TOL[dtype], fast_errs
        return
    ref_errs = [rel_err(a, b) for a, b in zip(run(ref, dtype), exact)]
    assert all(f <= 2 * r + 1e-2 for f, r in zip(fast_errs, ref_errs)), (fast_errs, ref_errs)


def test_launch_key_reads_what_triton_specialises_on():
    """CPU: the direct launch's cache key holds each int's value, float arguments by type only, and each
    tensor's dtype and 16-byte alignment (Triton's own specialisation looks at no more than these)."""
    x = torch.zeros(64)
    assert launch_mod._arg_key(x) == (torch.float32, True)
    assert launch_mod._arg_key(x[1:]) == (torch.float32, False)  # 4 bytes off: a kernel compiled without "D"
    assert launch_mod._arg_key(x.half()) == (torch.float16, True)
    assert launch_mod._arg_key(16) == 16 and launch_mod._arg_key(True) is True
    assert launch_mod._arg_key(0.2) is float and launch_mod._arg_key(0.3) is float
    with pytest.raises(TypeError, match="unsupported kernel argument of type str"):
        launch_mod._arg_key("x")


def test_direct_launch_caches_per_key_and_device(monkeypatch):
    """The first launch of a key goes through Triton, later ones straight to the compiled kernel's launcher,
    with the arguments in signature order (constexprs last); another device, dtype, alignment, int value or
    constexpr is a new key; with a launch hook registered every launch goes through Triton.
    Triton's side is faked (runs on the CPU wherever Triton 3.6 is importable)."""
    triton = pytest.importorskip("triton")
    import triton.language as tl
    if not triton.__version__.startswith(launch_mod.DIRECT_VERSIONS):
        pytest.skip(f"direct launches are off with Triton {triton.__version__}")

    @triton.jit
    def kern(X, n, m, BLOCK: tl.constexpr):
        pass

    if not isinstance(kern, launch_mod.JITFunction):
        pytest.skip("the Triton interpreter is on: launches always go through it")
    calls, device = [], [0]

    class Compiled:
        function, packed_metadata = "function", "metadata"

        @staticmethod
        def run(*args):
            calls.append(("direct", args))

    def through_triton(*args, grid, warmup, **kwargs):
        calls.append(("triton", grid, args, kwargs))
        return Compiled()

    monkeypatch.setattr(kern, "run", through_triton)
    monkeypatch.setattr(launch_mod, "_device_and_stream", lambda: (device[0], 77 + device[0]))
    monkeypatch.setattr(launch_mod, "_CACHES", {})
    x = torch.zeros(64)

    def go(*args, block=16):
        launch_mod.launch(kern, (3, 2), *args, BLOCK=block, num_warps=2)
        return calls[-1][0]

    assert go(x, 8, 1) == "triton" and calls[-1][3] == {"BLOCK": 16, "num_warps": 2}
    assert go(x, 8, 1) == "direct"
    assert calls[-1][1] == (3, 2, 1, 77, "function", "metadata", None, None, None, x, 8, 1, 16)
    for args, block in [((x[1:], 8, 1), 16), ((x.half(), 8, 1), 16), ((x, 9, 1), 16), ((x, 8, 2), 16),
                        ((x, 8, 1), 32)]:
        assert go(*args, block=block) == "triton", args
        assert go(*args, block=block) == "direct", args
    device[0] = 1
    assert go(x, 8, 1) == "triton" and go(x, 8, 1) == "direct" and calls[-1][1][3] == 78
    hook = triton.knobs.runtime.launch_enter_hook
    seen = lambda metadata: None  # noqa: E731
    hook.add(seen)
    try:
        assert go(x, 8, 1) == "triton"
    finally:
        hook.remove(seen)
    assert go(x, 8, 1) == "direct"


@gpu
def test_direct_launch_matches_triton_launch():
    """A bf16 layer's forward and backward through the cached direct launches (second step) give what the same
    step through ``kernel[grid]`` gave (first step, empty caches); every kernel of the step was cached; with a
    launch hook registered (a profiler), launches go through Triton again and the hook sees them."""
    import triton
    if not triton.__version__.startswith(launch_mod.DIRECT_VERSIONS):
        pytest.skip(f"direct launches are off with Triton {triton.__version__}")
    torch.manual_seed(0)
    attn = layer("fast", hidden_size=128, n_heads=8, n_kv_heads=2).cuda().eval()
    x = torch.randn(3, 300, 128, device="cuda", requires_grad=True)
    lengths = torch.tensor([300, 150, 3], device="cuda")

    def step():
        x.grad = None
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = attn(x, lengths)
        out.float().square().sum().backward()
        return out.detach().float(), x.grad.clone()

    launch_mod._CACHES.clear()
    through_triton = step()
    for kernel in (parallel._rope_kernel, parallel._compress_kernel, parallel._select_kernel,
                   parallel._tc_fwd_kernel, parallel._tc_bwd_kernel, parallel._gate_kernel):
        assert launch_mod._CACHES.get((kernel, torch.cuda.current_device())), kernel.fn.__name__
    direct = step()
    assert torch.equal(direct[0], through_triton[0])
    torch.testing.assert_close(direct[1], through_triton[1], rtol=1e-3, atol=1e-5)  # float32 atomics: order
    seen = []
    hook = triton.knobs.runtime.launch_enter_hook
    hook.add(seen.append)
    try:
        hooked = step()
    finally:
        hook.remove(seen.append)
    assert torch.equal(hooked[0], through_triton[0]) and len(seen) >= 6


@gpu
def test_fast_dropout_gradient_is_consistent():
    """With dropout on, the backward regenerates the forward's mask: a directional derivative matches."""
    q, k, v, w = random_qkv(1, 4, 2, 150, 16, torch.float64, seed=7)
    q, k, v, w = q.float(), k.float(), v.float(), w.float()
    idx = naive.select_blocks(q, torch.randn(1, 2, num_compressed_blocks(150, 32, 16), 16, device="cuda"),
                              torch.randn(2, 16, device="cuda"), 32, 16, 16, 4)
    slots = stis_slots(150, 8, True, "cuda")
    logits = torch.randn(1, 150, 8, device="cuda")
    for fn in (lambda q: parallel.gathered_attention(q, k, v, slots, 1, None, 0.3, True),
               lambda q: parallel.stis_attention(q, k, v, 8, True, None, 0.3, True),
               lambda q: parallel.gathered_attention(q, k, v, idx, 16, None, 0.3, True),
               lambda q: parallel.gathered_attention(q, k, v, idx, 16, None, 0.3, True, kernel="slots"),
               lambda q: parallel.branch_attention(q, k, v, idx, 16, 8, True, logits, None, 0.3, True,
                                                   kernel="slots").view(1, 150, 4, 16).transpose(1, 2)):  # fused node
        torch.manual_seed(1)
        qq = q.clone().requires_grad_()
        out = fn(qq)
        (out * w).sum().backward()
        direction = torch.randn_like(q)
        eps = 1e-3

        def f(x):
            torch.manual_seed(1)
            return (fn(x) * w).double().sum().item()

        numeric = (f(q + eps * direction) - f(q - eps * direction)) / (2 * eps)
        analytic = (qq.grad * direction).sum().item()
        assert abs(numeric - analytic) <= 2e-2 * max(1.0, abs(analytic)), (numeric, analytic)
        torch.manual_seed(2)
        assert not torch.equal(fn(q), out), "dropout should change with the seed"


def dropout_keep_mask(kernel, p, device, dtype=torch.float16, seed=3):
    """The keep mask of one dropout call, read off the output: all-zero queries give uniform attention over
    the allowed keys and value ``s`` is the one-hot vector of key ``s``, so ``out[b, h, t, s]`` is
    ``keep / ((1 - p) (t + 1))`` for ``s <= t`` (LTIS selecting every block of 16 keys: causal attention).
    Returns (keep, allowed), both ``(B, H, L, L)`` bools."""
    B, H, L = 16, 4, 64
    q = torch.zeros(B, H, L, L, dtype=dtype, device=device)
    k = torch.zeros(B, 1, L, L, dtype=dtype, device=device)
    v = torch.eye(L, dtype=dtype, device=device).expand(B, 1, L, L).contiguous()
    idx = torch.arange(L // 16, device=device).expand(B, 1, L, L // 16).contiguous()
    torch.manual_seed(seed)
    out = parallel.gathered_attention(q, k, v, idx, 16, None, p, True, kernel=kernel).float()
    t = torch.arange(L, device=device)
    allowed = (t[None, :] <= t[:, None]).expand(B, H, L, L)
    return out * (1 - p) * (t + 1)[:, None] > 0.5, allowed


@gpu
@pytest.mark.parametrize("kernel", ["slots", "presence"])
def test_fast_dropout_rate_and_independence(kernel):
    """Scores are dropped at rate p, independently of the neighbouring key, of the key 8 further on, of the
    next query head, of the next query and of the next batch row (each score hashes its own coordinates)."""
    p = 0.3
    keep, allowed = dropout_keep_mask(kernel, p, "cuda")
    assert not (keep & ~allowed).any()
    n = allowed.sum().item()
    assert abs(keep[allowed].float().mean().item() - (1 - p)) < 0.01, keep[allowed].float().mean()

    def both_kept(a, b, ok):
        return ((a & b)[ok].float().mean().item())

    pairs = {"key s+1": (keep[..., 1:], keep[..., :-1], allowed[..., 1:]),
             "key s+8": (keep[..., 8:], keep[..., :-8], allowed[..., 8:]),
             "head h+1": (keep[:, 1:], keep[:, :-1], allowed[:, 1:]),
             "query t+1": (keep[:, :, 1:], keep[:, :, :-1], allowed[:, :, :-1]),
             "batch b+1": (keep[1:], keep[:-1], allowed[1:])}
    for name, (a, b, ok) in pairs.items():
        assert abs(both_kept(a, b, ok) - (1 - p) ** 2) < 0.015, (name, both_kept(a, b, ok), n)
    again, _ = dropout_keep_mask(kernel, p, "cuda", seed=4)
    assert (again != keep)[allowed].float().mean().item() > 0.3  # a new seed, a new mask


def brute_force_chunks(idx, block, L):
    """Per (batch, head, tile): the set of 16-key chunks holding a key some query of the tile may see."""
    keys, ok = naive.slot_keys(idx, block, L)
    out = {}
    for b in range(idx.shape[0]):
        for h in range(idx.shape[1]):
            for t in range(L):
                chunks = {int(s) // parallel.KB for s, o in zip(keys[b, h, t].tolist(), ok[b, h, t].tolist()) if o}
                out.setdefault((b, h, t // parallel.QB), set()).update(chunks)
    return out


@pytest.mark.parametrize("L,geometry", [(200, (32, 16, 16, 4)), (333, (32, 16, 32, 2)), (77, (8, 4, 4, 2)),
                                        (150, (8, 4, 24, 2))])
def test_tile_chunks_are_the_union_of_the_tiles_keys(L, geometry):
    """CPU: the chunk lists the kernels walk cover exactly the keys of each tile's queries, once each."""
    gen = torch.Generator().manual_seed(L)
    q = torch.randn(2, 4, L, 8, generator=gen)
    k_cmp = torch.randn(2, 2, num_compressed_blocks(L, *geometry[:2]), 8, generator=gen)
    idx = naive.select_blocks(q, k_cmp, torch.randn(2, 8, generator=gen), *geometry)
    for slots, block in ((idx, geometry[2]), (stis_slots(L, 8, True), 1)):
        chunks, counts = parallel.tile_chunks(slots, block, L)
        expect = brute_force_chunks(slots, block, L)
        for (b, h, tile), want in expect.items():
            row = chunks[min(b, chunks.shape[0] - 1), min(h, chunks.shape[1] - 1), tile]
            n = int(counts[min(b, counts.shape[0] - 1), min(h, counts.shape[1] - 1), tile])
            assert row[:n].tolist() == sorted(want) and (row[n:] == -1).all()
    stis, stis_counts = parallel.stis_tile_chunks(L, 8, True, "cpu")
    ref, ref_counts = parallel.tile_chunks(stis_slots(L, 8, True), 1, L)
    assert torch.equal(stis, ref) and torch.equal(stis_counts, ref_counts)


@gpu
@pytest.mark.parametrize("L,geometry", [(200, (32, 16, 16, 4)), (333, (32, 16, 32, 2)), (77, (8, 4, 4, 2)),
                                        (150, (8, 4, 24, 2)), (4099, (32, 16, 16, 4))])
def test_tile_presence_marks_the_tile_chunks(L, geometry):
    """The presence bytes the LTIS kernels scan (one Triton kernel) mark exactly the chunks of tile_chunks."""
    gen = torch.Generator(device="cuda").manual_seed(L)
    q = torch.randn(2, 4, L, 8, device="cuda", generator=gen)
    k_cmp = torch.randn(2, 2, num_compressed_blocks(L, *geometry[:2]), 8, device="cuda", generator=gen)
    idx = naive.select_blocks(q, k_cmp, torch.randn(2, 8, device="cuda", generator=gen), *geometry)
    presence = parallel.tile_presence(idx, geometry[2], L)
    chunks, _ = parallel.tile_chunks(idx, geometry[2], L)
    expect = torch.zeros(*chunks.shape[:3], presence.shape[-1] + 1, dtype=torch.uint8, device="cuda")
    expect.scatter_(-1, torch.where(chunks >= 0, chunks, presence.shape[-1]).long(), 1)
    assert torch.equal(presence, expect[..., :-1])


# --- shortcuts shared by both paths (CPU) ---------------------------------------------------------------

def test_top_n_is_topk():
    torch.manual_seed(0)
    x = torch.randn(3, 2, 7, 40)
    x[0, 0, :, 5:] = float("-inf")  # rows with fewer candidates than n
    for n in (1, 4, 8, 12):
        ref_v, ref_i = x.topk(n, dim=-1)
        v, i = naive.top_n(x.clone(), n)
        torch.testing.assert_close(v, ref_v)
        finite = torch.isfinite(ref_v)
        assert torch.equal(i[finite], ref_i[finite])


@pytest.mark.parametrize("L", [33, 50, 80])
def test_ltis_short_sequences_are_causal_attention(L):
    """When every query selects all of its past blocks, LTIS skips scoring: same result as the long way."""
    torch.manual_seed(0)
    ltis = LTIS(16, 2).eval()
    q, k, v = torch.randn(2, 8, L, 16), torch.randn(2, 2, L, 16), torch.randn(2, 2, L, 16)
    lengths = torch.tensor([L, 9])
    idx = naive.select_blocks(q, ltis.compressor(k), ltis.memory_key, 32, 16, 16, 4)
    ref = naive.gathered_attention(q, k, v, idx, 16, lengths)
    torch.testing.assert_close(ltis(q, k, v, lengths), ref, rtol=1e-5, atol=1e-6)


@gpu
@pytest.mark.parametrize("compression", ["mlp", "mean"])
def test_fast_layer_is_causal_at_long_lengths(compression):
    """The fast path in fp16 autocast (how RecBole's ``enable_amp`` trains) at L = 2048, where block scoring spans
    128 selection blocks: no output at a position depends on a later item, in eval and (same dropout draw)
    train mode. The same check passed on an H100 at L = 1100, 2048 and 8192 (docs/long_histories.md)."""
    torch.manual_seed(0)
    attn = layer("fast", hidden_size=128, n_heads=8, n_kv_heads=2, ltis_compression=compression).cuda()
    attn.apply(lambda m: torch.nn.init.normal_(m.weight, std=0.2) if isinstance(m, torch.nn.Linear) else None)
    attn.reset_parameters(0.2)
    L = 2048
    x, lengths = torch.randn(2, L, 128, device="cuda"), torch.tensor([L, L - 37], device="cuda")
    assert_causal(attn, x, lengths, (1023, 1024, 1039, 1500, L - 100), autocast=torch.float16)


@gpu
def test_recbole_fp16_amp_with_grad_scaler_trains(tmp_path):
    """RecBole's ``enable_amp`` (fp16 autocast) with its gradient scaler: BlossomSASRec trains on the fast path
    with selection active (small blocks, L = 50) and gives finite loss and metrics."""
    config = tiny(tmp_path, enable_amp=True, enable_scaler=True, blossom_impl="fast", MAX_ITEM_LIST_LENGTH=50,
                  epochs=2)
    with inside(tmp_path):
        result = recbole_blossom.run("BlossomSASRec", "ml-100k", config_dict=config, saved=False)
    metrics = {**result["best_valid_result"], **result["test_result"]}
    assert metrics and all(math.isfinite(v) for v in metrics.values()), metrics
