"""Passes written for capture: the draft's decode pass and the target's verify pass trace with
``torch.compile(fullgraph=True)`` (no graph break: no host sync, no data-dependent Python: what a
CUDA graph needs), compiled passes and padded (bucketed) passes compute exactly what eager
passes do, and the engine's output is unchanged with them on. CUDA graphs themselves need a GPU."""

import pytest
import torch

from hedgerow.drafting.spec import SpecMode, SpecParams
from hedgerow.server.engine.fast_pass import CompiledPasses, plan_args
from hedgerow.server.engine.runner import ModelRunner
from hedgerow.server.models.native import from_transformers
from hedgerow.verify.flatten import flatten, flatten_chains
from hedgerow.verify.tree import DraftTree
from tests.tiny import PROMPTS, hf_greedy, make_engine, request, tiny_model

# compiling with the "eager" backend traces the pass exactly as inductor would (a graph break
# fails it) and runs the traced graph without generating code: seconds, not minutes, on a CPU
BACKEND = "eager"


@pytest.fixture(scope="module")
def models():
    return tiny_model("llama", seed=0, dtype=torch.float32), tiny_model("qwen2", seed=1, dtype=torch.float32)


def native_runner(model, **kw) -> ModelRunner:
    return ModelRunner(from_transformers(model, 256), num_slots=4, max_len=256, **kw)


def filled(run: ModelRunner, prompts: list[list[int]]) -> list[int]:
    slots = [run.cache.allocate() for _ in prompts]
    run.extend(slots, [0] * len(prompts), [p[:-1] for p in prompts], chunk=8)
    return slots


def decode_batch(prompts):
    return flatten_chains([[p[-1]] for p in prompts], [len(p) - 1 for p in prompts])


def verify_batch(prompts):
    trees = [DraftTree(torch.tensor([p[-1], 20, 21, 22, 23]), torch.tensor([-1, 0, 0, 1, 1])) for p in prompts]
    return flatten(trees, [len(p) - 1 for p in prompts])


@pytest.mark.engine
@pytest.mark.parametrize("which", [0, 1])
@pytest.mark.parametrize("shape", ["decode", "verify"])
def test_a_pass_traces_whole_and_computes_what_eager_does(models, which, shape):
    run = native_runner(models[which])
    prompts = PROMPTS[:2]
    slots = filled(run, prompts)
    flat = decode_batch(prompts) if shape == "decode" else verify_batch(prompts)
    args = plan_args(run.plan(slots, flat, view=False), flat.tokens, flat.positions)
    with torch.inference_mode():
        eager = run.pass_fn(*args)
        traced = torch.compile(run.pass_fn, fullgraph=True, backend=BACKEND)(*args)  # raises on a graph break
    assert torch.equal(traced, eager)


@pytest.mark.slow
def test_compiled_runners_keep_greedy_output_equal_to_the_target(models):
    target = models[0]
    draft = tiny_model("llama", seed=3, layers=1, hidden=32, dtype=torch.float32)
    refs = [hf_greedy(target, p, 24) for p in PROMPTS]
    engine = make_engine(target, draft, impl="native")
    for r in (engine.target, engine.draft):  # the engine's runners, recompiled in place
        r.compiled = CompiledPasses(r.pass_fn, r.name, BACKEND)
        r.compiled.prepare({(b == 1, n == 1): r._example(b, n) for b in (1, 2) for n in (1, 4)}, measure=False)
        assert len(r.compiled.enabled) == 4
    specs = [SpecParams(mode=SpecMode.CHAIN), SpecParams(mode=SpecMode.TREE, tree_budget=8, tree_depth=4),
             SpecParams(mode=SpecMode.CHAIN, proposer="hybrid")]
    # every pass the engine runs hits a graph compiled above: a recompile (a guard the engine's
    # inputs fail, such as tensors made outside inference mode) raises, and the shape class would
    # fall back to eager, which the last assert sees
    with torch._dynamo.config.patch(error_on_recompile=True):
        for spec in specs:
            out = engine.generate(request(f"{spec.mode.value}{i}", p, 24, spec=spec) for i, p in enumerate(PROMPTS))
            assert [out[f"{spec.mode.value}{i}"].generated for i in range(len(PROMPTS))] == refs
    assert [len(r.compiled.enabled) for r in (engine.target, engine.draft)] == [4, 4]


@pytest.mark.engine
def test_a_compiled_pass_that_fails_runs_eagerly_and_its_class_stays_eager(models):
    run = native_runner(models[0])
    prompts = PROMPTS[:2]
    slots = filled(run, prompts)
    flat = verify_batch(prompts)
    args = plan_args(run.plan(slots, flat, view=False), flat.tokens, flat.positions)
    passes = CompiledPasses(run.pass_fn, "target", BACKEND)
    passes.enabled = {(False, False), (True, True)}

    def fails(*_):
        raise torch._dynamo.exc.FailOnRecompileLimitHit("recompile limit")

    passes.compiled = fails
    with torch.inference_mode():
        got = passes(*args)
        want = run.pass_fn(*args)
    assert torch.equal(got, want)
    assert passes.enabled == {(True, True)}


@pytest.mark.engine
def test_auto_compile_keeps_a_shape_class_only_if_it_timed_faster(models):
    run = native_runner(models[0])
    passes = CompiledPasses(run.pass_fn, "target", BACKEND)
    passes.prepare({(True, True): run._example(1, 1)}, measure=True)
    entry = passes.report[(True, True)]
    assert entry["used"] == (entry["compiled_ms"] < entry["eager_ms"])
    assert ((True, True) in passes.enabled) == entry["used"]


@pytest.mark.engine
def test_a_padded_pass_computes_the_real_rows_exactly(models):
    """What a captured CUDA graph runs: the batch padded to its bucket (rows, tokens, keys), the
    padding's KV written to the scratch slot."""
    run = native_runner(models[0])
    prompts = PROMPTS[:3]
    slots = filled(run, prompts)
    flat = verify_batch(prompts)
    want = run.logits(run.forward(slots, flat))
    padded = flat.padded(4, 8, 128)
    scratch = run.cache.scratch_slot
    got = run.logits(run.pass_fn(*plan_args(run.plan(slots + [scratch], padded, view=False), padded.tokens,
                                            padded.positions)))
    assert torch.allclose(got[:3, :5], want, atol=1e-5), (got[:3, :5] - want).abs().max()


@pytest.mark.engine
def test_unknown_compile_modes_are_refused(models):
    with pytest.raises(ValueError, match="compile"):
        native_runner(models[0], compile="fast")
    with pytest.raises(ValueError, match="cuda_graphs"):
        native_runner(models[0], cuda_graphs="on")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_replay_equals_eager(models):
    target = models[0].to("cuda")
    for prompts in (PROMPTS[:1], PROMPTS[:3]):
        graphs = ModelRunner(from_transformers(target, 256), num_slots=4, max_len=256, cuda_graphs="auto")
        eager = ModelRunner(from_transformers(target, 256), num_slots=4, max_len=256)
        sg, se = filled(graphs, prompts), filled(eager, prompts)
        for make in (decode_batch, verify_batch):
            flat = make(prompts)
            a = graphs.logits(graphs.forward(sg, flat))
            b = eager.logits(eager.forward(se, flat))
            assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()
        assert graphs.graphs.graphs, "no graph was captured"
