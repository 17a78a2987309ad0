"""Embedding and output-layer units computed from row blocks: the same values as whole working copies, bit for bit,
with block-sized scratch, and each z chunk drawn once per unit."""
import pytest
import torch
from torch import nn

from ds_zo.loss import token_loss_sum
from ds_zo.model.dual_forward import dual_forward, merge_blocks, split_block
from ds_zo.model.perturbed_copies import OUTPUT_ROLE, PerturbedCopies
from ds_zo.model.streamed import embedding_forward, linear_forward, streamed_kind
from ds_zo.model.units import ParamRef, Unit, cut_into_units, resolve_trainable
from ds_zo.perturb import PerturbationGenerator, param_key
from models import batch, tiny_model

SLOTS = [(0, 1), (0, -1)]


def _copies(params: dict, chunk: int, slots=SLOTS, eps=1e-2, seed=5) -> PerturbedCopies:
    gen = PerturbationGenerator(chunk_elements=chunk)
    c = PerturbedCopies(gen, {id(p): param_key(n) for n, p in params.items()}, eps)
    c.set_slots(seed, slots)
    return c


def _unit(name: str, mod: nn.Module) -> Unit:
    return Unit(name, mod, [ParamRef(name + ".weight", mod.weight, True)])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk", [100, 2 ** 20])
def test_working_rows_equal_whole_copies(dtype, chunk):
    emb = nn.Embedding(300, 24).to(dtype)
    unit = _unit("emb", emb)
    whole = _copies({"emb.weight": emb.weight}, chunk).acquire(unit)
    rows = _copies({"emb.weight": emb.weight}, chunk)
    ref = unit.trainable[0]
    size = rows.block_rows(ref)
    assert size % 64 == 0
    for r0, r1 in [(0, 64), (64, 128), (128, 300), (7, 9), (0, 300)]:
        for s, block in enumerate(rows.working_rows(ref, r0, r1)):
            assert block.dtype == dtype and torch.equal(block, whole[s][0][r0:r1])
    rows.set_slots(None, [None])
    assert rows.working_rows(ref, 3, 5)[0].data_ptr() == emb.weight[3:5].data_ptr()   # the master itself


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_working_rows_of_a_row_subset_equal_whole_copies(dtype):
    """Only the trained rows move (z over the gathered rows); blocks with and without trained rows."""
    emb = nn.Embedding(300, 24).to(dtype)
    trained = torch.tensor([2, 63, 64, 200, 299])
    unit = Unit("emb", emb, [ParamRef("emb.weight", emb.weight, True, rows=trained)])
    whole = _copies({"emb.weight": emb.weight}, 100).acquire(unit)
    rows = _copies({"emb.weight": emb.weight}, 100)
    ref = unit.trainable[0]
    for r0, r1 in [(0, 64), (64, 128), (128, 192), (192, 300), (0, 300), (100, 150)]:
        for s, block in enumerate(rows.working_rows(ref, r0, r1)):
            assert torch.equal(block, whole[s][0][r0:r1])
    assert not torch.equal(whole[0][0][trained], emb.weight[trained])
    others = torch.ones(300, dtype=torch.bool)
    others[trained] = False
    assert torch.equal(whole[0][0][others], emb.weight[others])


def test_each_chunk_drawn_once_per_unit_and_skipped_when_unused():
    """A 300 x 24 weight in 100-element chunks (72 chunks): the head's blocks draw every chunk once; an embedding
    lookup draws only the chunks of the blocks that hold a looked-up id."""
    torch.manual_seed(0)
    emb = nn.Embedding(300, 24)
    head = nn.Linear(24, 300, bias=False)
    head.weight = emb.weight
    units = [_unit("emb", emb), _unit("head", head)]
    copies = _copies({"emb.weight": emb.weight}, chunk=100)
    gen = copies.generator
    ids = torch.tensor([[1, 2, 3, 70]])        # rows 0..63 and 64..127: the first two 64-row blocks
    x = torch.randn(2, 5, 24)
    before = gen.elements_drawn
    embedding_forward(units[0], copies, torch.cat([ids, ids]), 2, 1, split_block, merge_blocks)
    drawn_embedding = gen.elements_drawn - before
    assert drawn_embedding == 128 * 24 // 100 * 100 + 100      # chunks 0..30 (row 127 ends in chunk 30)
    before = gen.elements_drawn
    linear_forward(units[1], copies, x, 2, 1)
    # all 72 chunks once, but 15 and 30: a block's whole chunks are formed a span at a time, only the chunks a block
    # shares with its neighbour (1536-element blocks: 15, 30, 46, 61) pass through the ε·z cache, and the embedding
    # left 15 and 30 there (its own blocks' edges; same seed, perturbation and key: the same values)
    assert gen.elements_drawn - before == 300 * 24 - 2 * 100
    whole = _copies({"emb.weight": emb.weight}, chunk=100).acquire(units[1])
    assert torch.equal(linear_forward(units[1], copies, x, 2, 1)[:1], x[:1] @ whole[0][0].T)
    assert torch.equal(linear_forward(units[1], copies, x, 2, 1)[1:], x[1:] @ whole[1][0].T)


def test_embedding_lookup_equals_whole_copy_lookup_and_names_bad_ids():
    emb = nn.Embedding(500, 16)
    unit = _unit("emb", emb)
    ids = torch.tensor([[0, 63, 64, 499, 63], [128, 127, 0, 1, 2]])
    whole = _copies({"emb.weight": emb.weight}, chunk=100).acquire(unit)
    got = embedding_forward(unit, _copies({"emb.weight": emb.weight}, chunk=100), torch.cat([ids, ids]), 2, 2,
                            split_block, merge_blocks)
    assert torch.equal(got[:2], nn.functional.embedding(ids, whole[0][0]))
    assert torch.equal(got[2:], nn.functional.embedding(ids, whole[1][0]))
    with pytest.raises(IndexError, match=r"emb: token id out of range \[0, 500\)"):
        embedding_forward(unit, _copies({"emb.weight": emb.weight}, chunk=100), torch.tensor([[3], [500]]), 2, 1,
                          split_block, merge_blocks)


def test_which_units_stream():
    model = tiny_model("gpt2", tied=True)
    units = cut_into_units(model, resolve_trainable(model, []))
    kinds = {u.name: streamed_kind(u) for u in units}
    assert kinds["transformer.wte"] == "embedding" and kinds["transformer.wpe"] == "embedding"
    assert kinds["lm_head"] == "linear"
    assert all(k is None for n, k in kinds.items() if ".h." in n or n.endswith("ln_f"))
    # a bias or a frozen weight: formed whole (or not at all); a row subset streams
    lin = nn.Linear(4, 4)
    assert streamed_kind(_unit("lin", lin)) is None
    emb = nn.Embedding(10, 4)
    assert streamed_kind(Unit("e", emb, [ParamRef("e.weight", emb.weight, True, rows=torch.tensor([1]))])) \
        == "embedding"
    assert streamed_kind(Unit("e", emb, [ParamRef("e.weight", emb.weight, False)])) is None
    # zero_order.row_blocks: "auto" (the default) and "on" stream on every device, "off" nowhere
    head = _unit("head", nn.Linear(4, 4, bias=False, device="meta"))
    assert streamed_kind(head) == streamed_kind(head, "on") == "linear" and streamed_kind(head, "off") is None
    assert streamed_kind(_unit("e", emb), "off") is None and streamed_kind(_unit("e", emb), "on") == "embedding"
    with pytest.raises(ValueError, match="row_blocks 'yes'"):
        streamed_kind(head, "yes")


def test_dual_forward_with_small_chunks_matches_two_plain_forwards():
    """The whole model with 100-element chunks (blocks straddle many chunks; the embedding and the tied head share
    cached chunks): the doubled-batch forward equals two forwards on whole copies."""
    model = tiny_model("llama", tied=True).eval()
    b = batch(rows=2)
    units = cut_into_units(model, resolve_trainable(model, []))
    params = dict(model.named_parameters())
    copies = _copies(params, chunk=100)
    inputs = {"input_ids": torch.cat([b["input_ids"]] * 2), "attention_mask": torch.cat([b["attention_mask"]] * 2)}
    with torch.no_grad(), dual_forward(units, 2, 2, copies):
        both = model(**inputs, use_cache=False).logits
    gen = PerturbationGenerator(chunk_elements=100)
    for s, sign in enumerate((1, -1)):
        with torch.no_grad():
            shifted = {n: p + sign * (1e-2 * gen.z(5, 0, param_key(n), p.numel()).view_as(p)) for n, p in params.items()}
            plain = torch.func.functional_call(model, shifted, args=(), kwargs=dict(
                input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False)).logits
        assert torch.equal(both[2 * s:2 * s + 2], plain)


def test_each_chunk_drawn_once_with_three_perturbations():
    """The ε·z cache keeps its chunks per perturbation: with q = 3 (six slots) a straddling chunk is not redrawn."""
    lin = nn.Linear(16, 500, bias=False)
    unit = _unit("head", lin)
    slots = [(j, s) for j in range(3) for s in (1, -1)]
    copies = _copies({"head.weight": lin.weight}, chunk=100, slots=slots)
    x = torch.randn(6 * 2, 3, 16)
    before = copies.generator.elements_drawn
    out = linear_forward(unit, copies, x, 6, 2)
    assert copies.generator.elements_drawn - before == 3 * 500 * 16
    whole = _copies({"head.weight": lin.weight}, chunk=100, slots=slots).acquire(unit)
    for s in range(6):
        assert torch.equal(out[2 * s:2 * s + 2], nn.functional.linear(x[2 * s:2 * s + 2], whole[s][0]))


def test_blocks_are_a_span_of_rows_and_empty_weights_work(monkeypatch):
    monkeypatch.setattr(PerturbationGenerator, "parallel_chunks", lambda self, device: 1)
    copies = _copies({}, chunk=100)
    on_cpu = ParamRef("w", nn.Parameter(torch.empty(5000, 8)), True)
    assert copies.block_rows(on_cpu) == 64       # one chunk per drawing thread: 100 elements, 64 rows at least
    off_cpu = ParamRef("w", nn.Parameter(torch.empty(5000, 8, device="meta")), True)
    assert copies.block_rows(off_cpu) == 64      # elsewhere a span (8 chunks of 100 here) of rows, 64 at least
    big = ParamRef("w", nn.Parameter(torch.empty(50000, 8, device="meta")), True)
    assert _copies({}, chunk=1000).block_rows(big) == 960     # 8000 elements / 8 per row, down to a multiple of 64
    wide = ParamRef("w", nn.Parameter(torch.empty(5000, 2, device="meta")), True)
    assert copies.block_rows(wide) == 384        # 800 elements / 2 per row, down to a multiple of 64
    empty = nn.Embedding(0, 4)
    out = embedding_forward(_unit("e", empty), _copies({"e.weight": empty.weight}, chunk=100),
                            torch.zeros(2, 0, dtype=torch.long), 2, 1, split_block, merge_blocks)
    assert out.shape == (2, 0, 4)


@pytest.mark.parametrize("row_blocks", [True, False])
def test_tied_z_cache_draws_a_tied_weight_once_and_changes_nothing(row_blocks):
    """zero_order.tied_z_cache keeps the tied weight's ε·z from the embedding to the head: with a 100-element chunk
    the tied 96 x 32 weight spans 31 chunks (more than the cache holds), so without the option the head draws it
    again; with it, z drawn per step = 2 per parameter exactly (perturb + update) and the parameters are the same."""
    import ds_zo
    from models import batch as make_batch
    from test_engine_exactness import ds_config

    def run(keep):
        model = tiny_model("llama", tied=True)
        cfg = ds_config(lr=1e-2, eps=1e-3, seed=3)
        cfg["zero_order"]["tied_z_cache"] = keep
        if not row_blocks:    # whole copies (zero_order.row_blocks "off"): acquire takes the kept ε·z too
            cfg["zero_order"]["row_blocks"] = "off"
        engine, *_ = ds_zo.initialize(model=model, config=cfg)
        engine.perturbations.chunk = 100
        gen = engine.perturbations
        engine.train_batch(make_batch(seed=0))
        before = gen.elements_drawn
        engine.train_batch(make_batch(seed=1))      # a step with the fused update of step 0
        n = sum(p.numel() for p in {id(p): p for g in engine.optimizer.param_groups for p in g["params"]}.values())
        return (gen.elements_drawn - before) / n, engine.module_state_dict()

    drawn_off, sd_off = run(False)
    drawn_on, sd_on = run(True)
    assert drawn_on == pytest.approx(2.0) and drawn_off > 2.0
    assert all(torch.equal(sd_off[k], sd_on[k]) for k in sd_off)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("q", [1, 3])
def test_blocks_draw_their_chunks_together(threads, q):
    """A block spans about one drawing span (1 chunk per thread): its missing ε·z chunks come from one sampler call
    (in parallel with 2 threads), every chunk is drawn once per perturbation, and the logits equal whole copies."""
    before_threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        lin = nn.Linear(40, 1000, bias=False)              # 40,000 elements: 10 chunks of 4096, blocks straddle them
        unit = _unit("head", lin)
        slots = [(j, s) for j in range(q) for s in (1, -1)]
        copies = _copies({"head.weight": lin.weight}, chunk=4096, slots=slots)
        rows = copies.block_rows(unit.trainable[0])
        assert rows == (102 if threads == 1 else 204) // 64 * 64
        calls = []
        fill_many = copies.generator.fill_many
        copies.generator.fill_many = lambda requests, scale=1.0: (calls.append(len(requests)),
                                                                   fill_many(requests, scale))
        x = torch.randn(2 * q * 2, 3, 40)
        out = linear_forward(unit, copies, x, 2 * q, 2)
        assert copies.generator.elements_drawn == q * 1000 * 40
        # each chunk once; a block's missing chunks (all but the one it shares with the block before) at once
        assert sum(calls) == q * 10 and max(calls) == threads
        whole = _copies({"head.weight": lin.weight}, chunk=4096, slots=slots).acquire(unit)
        for s in range(2 * q):
            assert torch.equal(out[2 * s:2 * s + 2], nn.functional.linear(x[2 * s:2 * s + 2], whole[s][0]))
    finally:
        torch.set_num_threads(before_threads)


@pytest.mark.parametrize("q", [1, 2])
def test_span_sized_blocks_form_whole_chunks_a_span_at_a_time(monkeypatch, q):
    """An accelerator's row blocks: a span of 8 chunks per block, drawn one chunk per sampler
    request (parallel_chunks 1), as on a GPU, run here on CPU. Each block's whole chunks are formed in one pass per
    slot and span, only the edge chunks a block shares with a neighbour go through the ε·z cache, which then holds 2
    chunks per perturbation (not a span's 9); every chunk is still drawn once, and the logits equal whole copies."""
    monkeypatch.setattr(PerturbationGenerator, "parallel_chunks", lambda self, device: 1)
    monkeypatch.setattr(PerturbationGenerator, "span", lambda self, device: 8 * self.chunk)
    lin = nn.Linear(24, 1000, bias=False)               # 24,000 elements: 240 chunks of 100
    unit = _unit("head", lin)
    slots = [(j, s) for j in range(q) for s in (1, -1)]
    copies = _copies({"head.weight": lin.weight}, chunk=100, slots=slots)
    rows = copies.block_rows(unit.trainable[0])
    assert rows == 64 and (rows * 24) % 100                # 1536 elements: 15.36 chunks, blocks straddle chunks
    shifted = []
    real = __import__("ds_zo.model.perturbed_copies", fromlist=["_shifted"])._shifted
    monkeypatch.setattr("ds_zo.model.perturbed_copies._shifted",
                        lambda master, ez, sign, out: (shifted.append(master.numel()), real(master, ez, sign, out)))
    x = torch.randn(2 * q * 2, 3, 24)
    out = linear_forward(unit, copies, x, 2 * q, 2)
    assert copies.generator.elements_drawn == q * 24000                     # each chunk once per perturbation
    cached = [k for k in copies.buffers._bufs if k[0].startswith("ez")]
    assert len(cached) == 2 * q                                              # the edge chunks only
    # per block (16, the last partial) and slot: a pass per span-aligned piece of its whole chunks (at most 3 for
    # these blocks of about 2 spans) and one per edge chunk, where chunk by chunk would be about 16 passes
    assert len(shifted) <= 2 * q * 16 * 5 and max(shifted) == 800
    whole = _copies({"head.weight": lin.weight}, chunk=100, slots=slots).acquire(unit)
    for s in range(2 * q):
        assert torch.equal(out[2 * s:2 * s + 2], nn.functional.linear(x[2 * s:2 * s + 2], whole[s][0]))


def _opt_with_projections():
    """OPT with word_embed_proj_dim < hidden: project_out and the output layer are both streamed linear units, the
    first one's output the second one's input."""
    import transformers
    torch.manual_seed(0)
    cfg = transformers.OPTConfig(vocab_size=128, hidden_size=32, word_embed_proj_dim=16, num_hidden_layers=2,
                                 ffn_dim=64, num_attention_heads=4, max_position_embeddings=64)
    return transformers.OPTForCausalLM(cfg)


@pytest.mark.parametrize("arch", ["llama", "opt-projections"])
def test_kept_logits_buffer_changes_nothing_and_is_released_for_direct_forwards(arch):
    """The streamed output layer writes every slot's logits into a buffer kept from step to step (no page faults
    per step): the same parameters bit for bit as fresh logits, also where one streamed unit feeds another (one
    buffer per unit), the same buffer reused by the next step, and dropped before a direct forward of the model
    (evaluation), whose own logits would otherwise sit beside it."""
    import ds_zo
    from conftest import ds_config
    from models import assert_same_state, trained_state
    results = []
    for keep in (True, False):
        model = tiny_model("llama") if arch == "llama" else _opt_with_projections()
        # a loss of the engine's caller reads whole logits (the default one takes the output layer's blocks as they
        # are computed and holds no logits at all)
        engine, *_ = ds_zo.initialize(model=model, config=ds_config(), loss_fn=lambda lg, y: token_loss_sum(lg, y))
        engine.copies.keep_output = keep
        results.append({n: t.clone() for n, t in trained_state(engine, steps=2).items()})
        if keep:
            bufs = engine.copies.buffers._bufs
            key = next(k for k in bufs if k[0].startswith(OUTPUT_ROLE))   # the streamed head ran and kept its output
            first = bufs[key].data_ptr()
            engine.train_batch(batch(seed=5))
            assert bufs[key].data_ptr() == first                         # reused, not reallocated
            with torch.no_grad():
                engine.module(input_ids=batch()["input_ids"])
        assert engine.copies.buffers.nbytes(OUTPUT_ROLE) == 0            # dropped (kept) or never made (fresh)
    assert_same_state(*results)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("gpu_like_span", [False, True])
def test_row_blocks_off_is_the_whole_copy_path_and_gives_the_same_steps(arch, gpu_like_span):
    """zero_order.row_blocks "off" (whole copies) and "auto" (row blocks, the default) train the same over two
    steps (the second with the fused update): the same losses, g and parameters, bit for bit (on CPU the block
    matmuls round like the whole one on these shapes, see model/streamed.py). With 100-element z chunks, so
    blocks straddle chunks; gpu_like_span: the drawing span of an accelerator (8 chunks, whatever the threads), as
    row blocks use on a GPU: blocks larger than the ε·z cache, formed a span at a time."""
    import ds_zo
    from models import batch as make_batch
    from test_engine_exactness import ds_config

    def run(row_blocks):
        cfg = ds_config(lr=1e-2, eps=1e-3, seed=3)
        cfg["zero_order"]["row_blocks"] = row_blocks
        engine, *_ = ds_zo.initialize(model=tiny_model(arch, tied=True), config=cfg)
        gen = engine.perturbations
        gen.chunk = 100
        if gpu_like_span:           # on this engine's generator only
            gen.span = lambda device: 8 * gen.chunk
        losses = [engine.train_batch(make_batch(seed=t)) for t in range(2)]
        return losses, engine.last_projected_grad, engine.module_state_dict(), engine._stream_loss
    off, auto = run("off"), run("auto")
    assert not off[3] and auto[3]                # the loss takes the output layer's blocks only when it streams
    assert off[0] == auto[0] and off[1] == auto[1]
    assert all(torch.equal(off[2][k], auto[2][k]) for k in off[2])
