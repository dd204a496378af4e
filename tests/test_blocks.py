"""GGUF block-quantized weights (jaxserve.model.blocks): the formats against gguf's own dequantization, the
block kernel and XLA's formulations against NumPy, and SmolLM2 served from its file's own Q4_1 blocks
against the reference."""

import dataclasses
import json
import shutil
import statistics

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from served import assert_served_steps_equal_full_pass, full_logits, greedy_decode, scored_prefill
from test_kernels import TINY_LLAMA
from test_quantize import teacher_forced

from jaxserve import kernels
from jaxserve.checkpoint import convert_hf, load_checkpoint, load_model
from jaxserve.device.formulation import CANDIDATES, Choice, kernel_possible
from jaxserve.device.runner import PAGE_SIZE, JaxRunner
from jaxserve.model import attention_kernels, blocks
from jaxserve.model.quant import Formulation
from jaxserve.sharding import make_mesh

needs_kernel = pytest.mark.skipif(not kernels.available(), reason="no C++ compiler or no CPU backend here")


def random_weights(rng, rows, k):
    """Float weights [rows, k] with blocks of very different ranges (and one constant block)."""
    ranges = rng.uniform(0.01, 2.0, (rows, k // 32, 1)).repeat(32, -1).reshape(rows, k)
    w = (rng.standard_normal((rows, k)) * ranges).astype(np.float32)
    w[0, :32] = 0.5
    return w


@pytest.mark.parametrize("fmt", blocks.FORMATS)
def test_parts_dequantize_as_gguf_does(fmt):
    """The parts read from a tensor's bytes (those gguf's quantizer writes) give gguf's own dequantized
    values, bit for bit, in NumPy and inside jit."""
    w = random_weights(np.random.default_rng(0), 5, 96)
    raw = gguf.quants.quantize(w, gguf.GGMLQuantizationType[fmt.upper()])
    want = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[fmt.upper()])
    parts = blocks.from_gguf(raw, fmt)
    assert len(parts) == len(blocks.parts(fmt)) and parts[0].shape == (5, blocks.code_width(fmt, 96))
    np.testing.assert_array_equal(blocks.dequantize(fmt, *parts), want)
    got = jax.jit(lambda *p: blocks.dequantize(fmt, *p, xp=jnp))(*parts)
    np.testing.assert_array_equal(np.asarray(got), want)


def stack(rng, fmt, n, k, layers=3):
    """A stack of `layers` weights [n, k] in `fmt` -> (parts stacked [L, n, ...], float weights [L, n, k])."""
    parts = [blocks.quantize(random_weights(rng, n, k), fmt) for _ in range(layers)]
    stacked = tuple(np.stack(p) for p in zip(*parts))
    return stacked, blocks.dequantize(fmt, *stacked).astype(np.float64)


@pytest.mark.parametrize("fmt", blocks.FORMATS)
@pytest.mark.parametrize("rows, n, k", [(1, 45, 96), (3, 64, 576), (5, 33, 32), (9, 70, 160)])
def test_block_kernel_equals_numpy(fmt, rows, n, k, isa):
    """Layer 1 of a stack of three, odd rows, outputs that are not whole tiles, one block or several, on
    every path this CPU runs."""
    rng = np.random.default_rng(rows * n)
    parts, w = stack(rng, fmt, n, k)
    x = rng.standard_normal((rows, k)).astype(np.float32)
    y = jax.jit(kernels.block_matmul, static_argnums=1, static_argnames="isa")(x, fmt, *parts, layer=1, isa=isa)
    want = x.astype(np.float64) @ w[1].T
    np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("fmt", blocks.FORMATS)
def test_a_rows_outputs_do_not_hang_on_the_rows_beside_it(fmt, isa):
    """On float activations each row of x gives the same outputs, bit for bit, among any other rows (in any
    place of a group of rows the kernel computes together): a request's tokens do not hang on the batch it
    shares. Alone (a 1-row step, a loop of its own) within float rounding of that; bit for bit too where
    asked to be `invariant` (as the formulation on quantized activations asks)."""
    rng = np.random.default_rng(7)
    parts, _ = stack(rng, fmt, 70, 160, layers=1)
    x = rng.standard_normal((11, 160)).astype(np.float32)
    matmul = jax.jit(kernels.block_matmul, static_argnums=1, static_argnames=("isa", "invariant"))
    together = np.asarray(matmul(x, fmt, *parts, isa=isa))
    for rows in (slice(3, 9), slice(0, 2), slice(9, 11), slice(5, 10)):
        np.testing.assert_array_equal(np.asarray(matmul(x[rows], fmt, *parts, isa=isa)), together[rows])
    for r in (0, 5, 10):
        alone = np.asarray(matmul(x[r : r + 1], fmt, *parts, isa=isa))[0]
        np.testing.assert_allclose(alone, together[r], rtol=1e-6, atol=1e-6 * np.abs(together).max())
        np.testing.assert_array_equal(
            np.asarray(matmul(x[r : r + 1], fmt, *parts, invariant=True, isa=isa))[0], together[r]
        )


def test_paths_without_quantized_activations_refuse_them(isa):
    """A path built without AVX512-VNNI says so when asked to multiply on quantized activations."""
    if isa in {i.name for i in kernels.ISAS if i.q8}:
        pytest.skip(f"{isa}: multiplies on quantized activations")
    parts, _ = stack(np.random.default_rng(0), "q4_1", 16, 64, layers=1)
    with pytest.raises(Exception, match="quantized activations need AVX512-VNNI"):
        jax.block_until_ready(kernels.block_matmul(np.ones((1, 64), np.float32), "q4_1", *parts, x_bits=8, isa=isa))


@needs_kernel
def test_block_kernel_refuses_a_layer_out_of_the_stack():
    parts, _ = stack(np.random.default_rng(0), "q4_1", 16, 64, layers=1)
    with pytest.raises(Exception, match="layer out of range"):
        jax.block_until_ready(kernels.block_matmul(np.ones((1, 64), np.float32), "q4_1", *parts, layer=1))


@pytest.mark.parametrize("fmt", blocks.FORMATS)
@pytest.mark.parametrize("bf16", [False, True], ids=["f32", "bf16"])
def test_xla_formulations_equal_numpy(fmt, bf16):
    """The formulations XLA computes (dequantized to float32, or bfloat16 products with float32 sums), a
    weight of outputs [3, 15] read at layer 2, rows [B=2, T=3]; and a vocabulary of whole chunks."""
    rng = np.random.default_rng(1)
    parts, w = stack(rng, fmt, 45, 64)
    x = rng.standard_normal((2, 3, 64)).astype(np.float32)
    weight = lambda arrays: blocks.BlockWeight(fmt, arrays, (3, 15), jnp.int32(2))
    f = Formulation(bf16_from_rows=1 if bf16 else None)
    y = jax.jit(lambda x, *a: blocks.dot(x, weight(a), f))(x, *(p.reshape(3, 3, 15, -1) for p in parts))
    want = (x.reshape(6, 64).astype(np.float64) @ w[2].T).reshape(2, 3, 3, 15)
    tol = 2e-2 if bf16 else 1e-5
    np.testing.assert_allclose(np.asarray(y), want, rtol=tol, atol=tol * np.abs(want).max())
    vocab, w = stack(rng, fmt, 2 * blocks.CHUNK, 64, layers=1)
    table = lambda arrays: blocks.BlockWeight(fmt, arrays, (2 * blocks.CHUNK,))
    y = jax.jit(lambda x, *a: blocks.dot(x, table(a), Formulation()))(x, *(p[0] for p in vocab))
    np.testing.assert_allclose(np.asarray(y), x @ w[0].T, rtol=1e-4, atol=1e-4 * np.abs(y).max())


@pytest.fixture(scope="module")
def smollm2_gguf(checkpoint_root):
    return load_model("smollm2-135m-instruct", checkpoint_root, make_mesh(1, 1), progress=False, quantize="gguf")


def test_smollm2_serves_its_files_own_blocks(smollm2_gguf):
    """Every layer matmul Q4_1 and the tied embedding Q8_0, as the file stores them."""
    cfg = smollm2_gguf.cfg
    assert cfg.quant == "blocks" and cfg.block_format("embedding") == "q8_0"
    assert {cfg.block_format(n) for n in ("q", "k", "v", "o", "gate_up", "down")} == {"q4_1"}
    layers = smollm2_gguf.params["params"]["layers"]
    assert layers["gate_up"].dtype == np.uint8 and layers["gate_up"].shape == (30, 2, 1536, 576 // 2)
    assert layers["gate_up_m"].dtype == np.float16 and layers["gate_up_m"].shape == (30, 2, 1536, 576 // 32)


@pytest.mark.parametrize("name, attention", [("f32", "plain"), ("kernel", "plain"), ("kernel", "cpu_kernel")])
def test_smollm2_blocks_match_the_reference(smollm2_gguf, reference, name, attention):
    """The reference is HF transformers on the same file's weights dequantized to float32, so with float
    activations the blocks give its greedy tokens, teacher-forced, with logprobs as close as float32's;
    with the CPU attention kernel as `jaxserve serve` takes it here, too."""
    if name == "kernel" and not kernel_possible(smollm2_gguf):
        pytest.skip("no C++ compiler or no CPU backend here: the kernel is never chosen")
    model = CANDIDATES[name].apply(smollm2_gguf)
    model = dataclasses.replace(model, cfg=dataclasses.replace(model.cfg, attention=attention))
    agreement, mean_diff = teacher_forced(model, reference)
    name = model.formulation.describe(model.cfg)
    print(f"{name}: top-1 agreement {agreement:.4f}, mean |delta logprob| {mean_diff:.5f}")
    assert agreement == 1.0
    assert mean_diff <= 1e-3


@pytest.mark.skipif(not kernels.vnni(), reason="avx512_vnni: not on this CPU (the float path serves)")
def test_smollm2_blocks_on_quantized_activations_stay_close_to_the_reference(smollm2_gguf, reference):
    """The kernel on activations quantized to 8 bits a run of 16 inputs (llama.cpp multiplies Q4_1 weights
    so, a step a block of 32) for the MLP's gate and up projections (blocks.Q8_INPUTS), the others on float
    ones, teacher-forced: the issue's bar, 97% top-1 agreement with the float32 reference and at least
    llama.cpp's own Q4_1 path on the same positions (95.8%, mean |delta logprob| 0.039, scored by
    scripts/agreement_llama_server.py). Every projection quantized: 96.4%, 0.025; that and the offsets times
    x's exact block sums: 89.6%, 0.083. The chat prompt quantized query and output projections got wrong:
    tests/test_chat.py's first test."""
    model = CANDIDATES["q8"].apply(smollm2_gguf)
    agreement, mean_diff = teacher_forced(model, reference)
    name = model.formulation.describe(model.cfg)
    print(f"{name}: top-1 agreement {agreement:.4f}, mean |delta logprob| {mean_diff:.4f}")
    assert agreement >= 0.97
    assert mean_diff <= 0.039


@pytest.mark.skipif(not kernels.vnni(), reason="avx512_vnni: not on this CPU (the float path serves)")
def test_a_prompt_prefilled_on_quantized_activations_gives_the_same_logprobs_in_any_chunks(smollm2_gguf):
    """The served prefill under q8 with the attention `jaxserve serve` takes here: one chunk, or chunks of 1,
    3 and 8 tokens, give the same logprobs and top ids, bit for bit -- a prompt whose prefix comes from the
    cache is computed as one that does not."""
    served = CANDIDATES["q8"].apply(smollm2_gguf)
    served = dataclasses.replace(served, cfg=attention_kernels.choose(served.cfg, served.mesh, PAGE_SIZE))
    prompt = served.tokenizer.encode("Call me Ishmael. Some years ago, never mind how long precisely")
    runs = []
    for chunk in (len(prompt), 1, 3, 8):
        core = JaxRunner(served, slots=1, cache_len=128, eos_id=None)
        runs.append(scored_prefill(core, 0, prompt, chunk=chunk)[:2])
    for lp, top in runs[1:]:
        np.testing.assert_array_equal(lp, runs[0][0])
        np.testing.assert_array_equal(top, runs[0][1])


@pytest.mark.skipif(not kernels.vnni(), reason="avx512_vnni: not on this CPU (the float path serves)")
def test_decode_steps_on_quantized_activations_give_a_prefills_logprobs(smollm2_gguf):
    """Under q8, tokens decoded one step at a time (a core of two slots, the prompt prefilled in chunks of 5)
    get the logprobs, bit for bit, that a prefill of the same tokens (chunks of 7) gives them: a preempted
    sequence recomputed by prefill goes on as it would have. (Measured without transformer.ordered_sum or
    without steps.COMPILER_OPTIONS: 0.05-0.1 apart, float differences of ~1e-7 drawn into the quantized
    activations' rounding.)"""
    served = CANDIDATES["q8"].apply(smollm2_gguf)
    served = dataclasses.replace(served, cfg=attention_kernels.choose(served.cfg, served.mesh, PAGE_SIZE))
    prompt = served.tokenizer.encode("Call me Ishmael. Some years ago, never mind how long precisely, having little")
    [(tokens, lps, *_)] = greedy_decode(JaxRunner(served, slots=2, cache_len=128, eos_id=None), [prompt], 8, chunk=5)
    lp, *_ = scored_prefill(JaxRunner(served, slots=1, cache_len=128, eos_id=None), 0, prompt + list(tokens), chunk=7)
    np.testing.assert_array_equal(lp[len(prompt) - 1 :], lps)


@pytest.fixture(scope="module")
def tiny_int4(tmp_path_factory):
    out = convert_hf(TINY_LLAMA, tmp_path_factory.mktemp("int4") / "ckpt", progress=False, quantize="int4")
    return load_checkpoint(out, make_mesh(1, 1))


@needs_kernel
def test_served_steps_with_the_block_kernel_equal_the_float32_full_pass(tiny_int4):
    """--quantize int4 of a float checkpoint (Q4_1 layers, Q8_0 embedding): prefill in chunks of 3 by XLA
    and 8 greedy steps of two slots through the kernel (below 3 rows) give the float32 formulation's full
    pass. (The kernel at every row count is the SmolLM2 reference test's "kernel".)"""
    assert tiny_int4.cfg.block_format("q") == "q4_1" and tiny_int4.cfg.block_format("embedding") == "q8_0"
    served = Choice(None, "forced", {}, 3).apply(tiny_int4)
    assert_served_steps_equal_full_pass(tiny_int4, served)


@pytest.fixture(scope="module")
def tiny_untied_int4(tmp_path_factory):
    """The tiny Llama with an output projection of its own (a made-up one), --quantize int4: Q8_0 like the
    embedding it no longer shares."""
    source = tmp_path_factory.mktemp("untied") / "hf"
    shutil.copytree(TINY_LLAMA, source)
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps(config | {"tie_word_embeddings": False}))
    tensors = safetensors.numpy.load_file(source / "model.safetensors")
    head = np.random.default_rng(5).normal(0, 0.05, (config["vocab_size"], config["hidden_size"]))
    safetensors.numpy.save_file(tensors | {"lm_head.weight": head.astype(np.float32)}, source / "model.safetensors")
    out = convert_hf(source, tmp_path_factory.mktemp("untied") / "ckpt", progress=False, quantize="int4")
    return load_checkpoint(out, make_mesh(1, 1))


@pytest.mark.skipif(not kernels.vnni(), reason="avx512_vnni: not on this CPU (the float path serves)")
@pytest.mark.parametrize("untied", [False, True])
def test_served_steps_on_quantized_activations_equal_their_own_full_pass(tiny_int4, tiny_untied_int4, untied):
    """Under q8 every weight multiplies on quantized activations, held interleaved (the layers, the Q8_0
    embedding's token rows and logits, or an untied output projection): prompts prefilled in chunks of 3,
    then 8 greedy steps of two slots, give the tokens and logprobs of one full pass under the same
    formulation -- a row's products hang neither on the rows beside it nor on the step that carries it. The
    logprobs within 5e-3, not float32's 1e-4: attention rounds chunks and one pass differently (~1e-6), and
    where a value lies on a rounding boundary of the 8-bit activations, that turns into a step of 8 bits
    (tied, position 5: 1.5e-3; the others within 3e-5)."""
    model = tiny_untied_int4 if untied else tiny_int4
    served = CANDIDATES["q8"].apply(model)
    before, after = model.params["params"], served.params["params"]
    weights = [("layers", "gate_up"), ("layers", "q"), ("embed", "embedding"), *([(None, "lm_head")] * untied)]
    for scope, name in weights:
        a, b = (before, after) if scope is None else (before[scope], after[scope])
        assert a[name].shape == b[name].shape and not np.array_equal(a[name], b[name]), name  # interleaved
    prompts = [model.tokenizer.encode("Call me Ishmael."), model.tokenizer.encode("It was the best of")]
    core = JaxRunner(served, slots=2, cache_len=128, eos_id=None)
    for prompt, (tokens, lps, *_) in zip(prompts, greedy_decode(core, prompts, 8, chunk=3)):
        full = full_logits(served.cfg, served.params, prompt + list(tokens), served.formulation)
        want = np.asarray(jax.nn.log_softmax(full[len(prompt) - 1 : -1].astype(np.float64), axis=-1))
        assert (tokens == want.argmax(-1)).all()
        np.testing.assert_allclose(lps, want[np.arange(8), tokens], atol=5e-3)
        exact = full_logits(model.cfg, model.params, prompt + list(tokens))[len(prompt) - 1 : -1]
        exact = np.asarray(jax.nn.log_softmax(exact.astype(np.float64), axis=-1))
        # and it is the model's, the file's weights read right: within 5e-2 of float32 over the vocabulary
        # (measured: 0.010-0.015; the embedding's rows read in the file's order from the interleaved table: 2.4)
        np.testing.assert_allclose(want, exact, atol=5e-2)


def quantized(x, bits: int):
    """x [rows, k] rounded to `bits` (8 or 16) a run of 16 inputs, as the kernel quantizes it, float64."""
    xb = x.reshape(x.shape[0], -1, 16)
    step = np.abs(xb).max(-1, keepdims=True) / (127 if bits == 8 else 32639)
    return (np.rint(xb / np.where(step > 0, step, 1)) * step).reshape(x.shape).astype(np.float64)


@pytest.mark.parametrize("bits", [8, 16])
@pytest.mark.parametrize("fmt", blocks.FORMATS)
@pytest.mark.parametrize("rows, n, k", [(1, 48, 96), (5, 80, 576), (9, 160, 1536), (4, 16, 32), (35, 48, 96)])
def test_kernel_equals_numpy_on_quantized_activations(fmt, rows, n, k, bits, q8_isa):
    """Activations quantized to int8 or int16 a run of 16 inputs (int8: llama.cpp's Q8 rounding, at half its
    block, in NumPy here), then integer dot products on weights interleaved as they are served so (16 rows
    a group: outputs that are not whole tiles of 32 too; 35 rows: two groups of 16 on AMX's tiles, where the
    path has them, and 3 beside them): the product of those quantized activations with the weights, offsets
    included. Interleaved, byte 4k + i of row 16g + j's block b lies at [g, b, k, j, i].
    The int16 product is checked against the int8 one's error too: that it rounds x more finely, not just
    as finely as the tolerance."""
    rng = np.random.default_rng(rows * k)
    parts, w = stack(rng, fmt, n, k)
    woven = tuple(np.asarray(a) for a in blocks.interleave(parts))
    bb = blocks.code_width(fmt, 32)  # a block's bytes of codes
    codes, d = woven[0].reshape(3, n // 16, k // 32, bb // 4, 16, 4), woven[1].reshape(3, n // 16, k // 32, 16)
    g, b = n // 16 - 1, k // 32 - 1
    for j, kk, i in np.ndindex(16, bb // 4, 4):
        assert codes[2, g, b, kk, j, i] == parts[0][2, 16 * g + j, bb * b + 4 * kk + i]
        assert d[2, g, b, j] == parts[1][2, 16 * g + j, b]
    x = rng.standard_normal((rows, k)).astype(np.float32)
    tiles = kernels.tiles(q8_isa)
    matmul = jax.jit(lambda x, *p: kernels.block_matmul(x, fmt, *p, layer=2, x_bits=bits, tiles=tiles, isa=q8_isa))
    y = np.asarray(matmul(x, *woven))
    want = quantized(x, bits) @ w[2].T  # the offsets (m, or -8 d) too multiply the quantized activations
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    if bits == 16:
        exact = x.astype(np.float64) @ w[2].T
        assert np.abs(y - exact).max() * 50 < np.abs(quantized(x, 8) @ w[2].T - exact).max()


def test_an_embedding_tables_rows_read_interleaved_equal_the_files():
    """The tied embedding is held interleaved for the logits on quantized activations: the token rows read
    from it (BlockWeight.rows) are the file's own, for each part."""
    rng = np.random.default_rng(3)
    for fmt in blocks.FORMATS:
        parts, _ = stack(rng, fmt, 64, 96, layers=1)
        table = blocks.BlockWeight(fmt, tuple(p[0] for p in parts), (64,))
        woven = blocks.BlockWeight(fmt, tuple(a[0] for a in blocks.interleave(parts)), (64,))
        tokens = jnp.asarray([[0, 17, 63], [31, 32, 5]])
        np.testing.assert_array_equal(np.asarray(woven.rows(tokens, woven=True)), np.asarray(table.rows(tokens)))


def test_quantized_activations_take_weights_interleaved_whole_groups(q8_isa):
    """Weights whose outputs are not whole groups of 16 keep float activations: the kernel refuses to multiply
    them on quantized ones."""
    for fmt in blocks.FORMATS:
        parts, _ = stack(np.random.default_rng(0), fmt, 40, 64, layers=1)
        with pytest.raises(Exception, match="take weights interleaved"):
            jax.block_until_ready(kernels.block_matmul(np.ones((1, 64), np.float32), fmt, *parts, x_bits=8, isa=q8_isa))


@pytest.mark.parametrize("bits", [8, 16])
@pytest.mark.parametrize("fmt", blocks.FORMATS)
def test_on_quantized_activations_a_rows_outputs_do_not_hang_on_the_rows_beside_it(fmt, bits, q8_isa):
    """On quantized activations a row of x gives the same outputs, bit for bit, alone or among any other
    rows: a request's tokens do not hang on the batch it shares. With AMX's tiles, 16 rows at a time take
    them and the rest AVX512-VNNI's loop, so which rows the tiles take changes with the rows beside them."""
    rng = np.random.default_rng(11)
    parts, _ = stack(rng, fmt, 96, 160, layers=1)
    parts = tuple(np.asarray(a) for a in blocks.interleave(parts))
    x = rng.standard_normal((40, 160)).astype(np.float32)
    tiles = kernels.tiles(q8_isa)
    matmul = jax.jit(lambda x, *p: kernels.block_matmul(x, fmt, *p, x_bits=bits, tiles=tiles, isa=q8_isa))
    together = np.asarray(matmul(x, *parts))
    spans = (slice(3, 9), slice(0, 2), slice(9, 11), slice(5, 10), slice(0, 16), slice(7, 39), slice(20, 37))
    for rows in (*spans, *(slice(r, r + 1) for r in (0, 5, 10, 39))):
        np.testing.assert_array_equal(np.asarray(matmul(x[rows], *parts)), together[rows])


def test_amx_paths_multiply_on_tiles(q8_isa):
    """The AMX paths take 16 rows at a time on tiles (where Linux lends a process their state: the kernels
    ask it), so the tests of quantized activations above check the tiles' code there; the other paths
    refuse to be asked for tiles."""
    amx = q8_isa.startswith("avx512_amx")
    if amx and not kernels.tiles(q8_isa):
        pytest.skip(f"{q8_isa}: Linux did not lend this process AMX's tile state (arch_prctl)")
    assert kernels.tiles(q8_isa) == amx
    if not amx:
        parts = tuple(np.asarray(a) for a in blocks.interleave(stack(np.random.default_rng(0), "q4_1", 16, 32, 1)[0]))
        with pytest.raises(Exception, match="tiles need a path built for AMX"):
            jax.block_until_ready(
                kernels.block_matmul(np.ones((16, 32), np.float32), "q4_1", *parts, x_bits=8, tiles=True, isa=q8_isa)
            )


@needs_kernel
@pytest.mark.parametrize("fmt, layers", [("q4_1", 120), ("q8_0", 72)])
def test_one_row_kernel_against_a_plain_read(bench_bandwidth, bandwidth_summary, fmt, layers):
    """scripts/bench_bandwidth.py's measure on made-up weights of SmolLM2's gate shape [1536, 576], stacked
    to as many bytes as its layers' (about 66 MB, more than most CPUs' last-level cache): the 1-row kernel of
    the path that serves (with AVX512-VNNI: on quantized activations, 8 bits for Q4 as the gate's, 16 for
    Q8_0 as the logits', the weights interleaved), and a plain read of the same bytes on the same threads,
    timed interleaved. Their ratio goes to the terminal summary -- reported, never asserted. The kernel's
    result is checked."""
    rng = np.random.default_rng(0)
    n, k = 1536, 576
    codes = rng.integers(-128, 128, (layers, n, blocks.code_width(fmt, k)), np.int8)
    scales = [rng.uniform(-0.01, 0.01, (layers, n, k // 32)).astype(np.float16) for _ in blocks.parts(fmt)[1:]]
    parts = (codes if fmt == "q8_0" else codes.view(np.uint8), *scales)
    x = rng.standard_normal((1, k)).astype(np.float32)
    bits = (16 if fmt == "q8_0" else 8) if kernels.vnni() else 32
    served = tuple(np.asarray(a) for a in blocks.interleave(parts)) if bits < 32 else parts
    matmul = jax.jit(kernels.block_matmul, static_argnums=1, static_argnames="x_bits")
    y = matmul(x, fmt, *served, layer=layers - 1, x_bits=bits)
    w = blocks.dequantize(fmt, *(p[-1] for p in parts)).astype(np.float64)
    want = (quantized(x, bits) if bits < 32 else x.astype(np.float64)) @ w.T
    np.testing.assert_allclose(np.asarray(y), want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    arrays = tuple(jnp.asarray(p) for p in served)
    repeats = 15
    runs = bench_bandwidth.kernel_against_read([(fmt, arrays, bits)], layers, jnp.asarray(x), repeats)
    nbytes = sum(p.nbytes for p in parts)
    x_is = f"{bits}-bit x" if bits < 32 else "float x"
    what = f"{fmt} {layers} x [{n}, {k}] ({nbytes / 1e6:.0f} MB), {kernels.best().name}, {x_is}, median of {repeats}"
    bandwidth_summary[what] = bench_bandwidth.summary(runs, nbytes, statistics.median)
