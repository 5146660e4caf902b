"""Proposers through the engine: every proposer (the draft model, n-gram lookup, both) keeps greedy
output equal to the target's own, in chains and trees, batched and alone, on both model families
and implementations; a server without a draft model serves n-gram drafts; per-proposer counts add
up; sampled n-gram and hybrid drafts draw from the target's distribution (chi-square). And the
benchmark's side: contenders that name their proposer, and the prompt set where copying matters.

The targets are random tiny models that fall into loops on some prompts (seeds found to), so
that lookup finds continuations the target accepts, and the draft is an unrelated random model,
so that hybrid steps accept n-gram nodes where the model's are rejected."""

import pytest

from hedgerow.drafting.spec import SpecMode, SpecParams
from hedgerow.server.engine.config import EngineConfig
from hedgerow.server.engine.engine import Engine
from hedgerow.server.errors import HedgerowError
from hedgerow.verify.sampling import SamplingParams
from tests.tiny import (EOS, PROMPTS, VARIANTS, chi_square_check, exact_joint, hf_greedy, make_engine,
                        perturbed_copy, request, runner, tiny_model)

LOOPING_SEED = {"llama": 2, "qwen2": 4}  # targets whose greedy output repeats itself on some of PROMPTS
N = 40


def spec(mode: str, proposer: str) -> SpecParams:
    if mode == "chain":
        return SpecParams(mode=SpecMode.CHAIN, draft_tokens=4, proposer=proposer)
    return SpecParams(mode=SpecMode.TREE, tree_budget=10, tree_depth=4, tree_topk=3, tree_static=mode == "static",
                      proposer=proposer)


@pytest.fixture(scope="module")
def pair(arch):
    return tiny_model(arch, seed=LOOPING_SEED[arch]), tiny_model(arch, seed=1, layers=1, hidden=32)


@pytest.fixture(scope="module")
def references(pair):
    return [hf_greedy(pair[0], p, N) for p in PROMPTS]


def accepted_by(seqs, proposer: str) -> int:
    return sum(s.stats.proposers[proposer].accepted_tokens for s in seqs if proposer in s.stats.proposers)


@VARIANTS
@pytest.mark.parametrize("proposer", ["model", "ngram", "hybrid"])
@pytest.mark.parametrize("mode", ["chain", "tree", "static"])
def test_greedy_output_equals_the_target_alone_for_every_proposer(pair, references, mode, proposer, impl):
    target, draft = pair
    sp = spec(mode, proposer)
    out = make_engine(target, draft, impl=impl).generate(request(str(i), p, N, spec=sp) for i, p in enumerate(PROMPTS))
    assert [out[str(i)].generated for i in range(len(PROMPTS))] == references
    solo = make_engine(target, draft, slots=1, impl=impl)
    alone = [solo.generate([request(str(i), p, N, spec=sp)])[str(i)] for i, p in enumerate(PROMPTS)]
    assert [s.generated for s in alone] == references
    if proposer != "model":  # lookup's tokens were on the accepted paths, not only offered
        assert accepted_by(out.values(), "ngram") > 0


@VARIANTS
def test_a_server_without_a_draft_model_serves_ngram_drafts(pair, references, impl):
    target, _ = pair
    engine = make_engine(target, None, impl=impl)  # the default proposer: ngram
    out = engine.generate(request(str(i), p, N, spec=spec(mode, None)) for i, (p, mode) in
                          enumerate(zip(PROMPTS, ["chain", "tree", "chain", "static"])))
    assert [out[str(i)].generated for i in range(len(PROMPTS))] == references
    assert accepted_by(out.values(), "ngram") > 0 and all("model" not in s.stats.proposers for s in out.values())
    for proposer in ("model", "hybrid"):
        with pytest.raises(HedgerowError, match=f"proposer {proposer} needs a draft model; this server has none"):
            engine.add_request(request("x", PROMPTS[0], spec=spec("chain", proposer)))
    config = EngineConfig(max_model_len=256, spec=SpecParams(proposer="model"))
    with pytest.raises(HedgerowError, match="proposer model needs a draft model"):
        Engine(runner(target, impl=impl), None, eos_token_ids=[EOS], config=config)


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama", seed=LOOPING_SEED["llama"]), tiny_model("llama", seed=1, layers=1, hidden=32)


@pytest.mark.engine
@pytest.mark.parametrize("mode", ["chain", "tree"])
def test_per_proposer_counts_add_up_to_the_steps_and_the_requests(llama, mode):
    target = llama[0]
    engine = make_engine(target, perturbed_copy(target, scale=0.05))  # both proposers' tokens get accepted
    seqs = [engine.add_request(request(str(i), p, N, spec=spec(mode, "hybrid"))) for i, p in enumerate(PROMPTS)]
    while engine.has_work():
        for o in engine.step().outputs:
            assert sum(c.draft_tokens for c in o.proposers.values()) == o.draft_tokens
            assert sum(c.accepted_tokens for c in o.proposers.values()) == o.accepted_tokens
    for s in seqs:
        assert sum(c.draft_tokens for c in s.stats.proposers.values()) == s.stats.draft_tokens
        assert sum(c.accepted_tokens for c in s.stats.proposers.values()) == s.stats.accepted_tokens
        assert set(s.stats.as_dict()["proposers"]) <= {"model", "ngram"}
    assert accepted_by(seqs, "model") > 0 and accepted_by(seqs, "ngram") > 0


@pytest.mark.engine
@pytest.mark.parametrize("overlap", ["pearl", "branch"])
def test_hybrid_chains_with_hedge_branches_keep_greedy_output(llama, overlap):
    target, draft = llama
    refs = [hf_greedy(target, p, N) for p in PROMPTS]
    out = make_engine(target, draft, overlap=overlap).generate(
        request(str(i), p, N, spec=spec("chain", "hybrid")) for i, p in enumerate(PROMPTS))
    assert [out[str(i)].generated for i in range(len(PROMPTS))] == refs


@pytest.mark.engine
def test_the_pool_offers_a_finished_outputs_ngrams_to_the_next_request(llama):
    target, _ = llama
    prompt = PROMPTS[0]  # no repeats in it, and 20 tokens of output that hardly repeat themselves
    ref = hf_greedy(target, prompt, N)
    firsts, seconds = [], []
    for pool in (0, 1000):
        engine = make_engine(target, None, ngram_pool=pool)
        first = engine.generate([request("a", prompt, N)])["a"]
        second = engine.generate([request("b", prompt, N)])["b"]
        assert first.generated == ref and second.generated == ref
        firsts.append(first.stats.accepted_tokens)
        seconds.append(second.stats.accepted_tokens)
    assert seconds[0] == firsts[0] == firsts[1] and seconds[1] >= firsts[1] + len(ref) // 2


# --- sampling, end to end -------------------------------------------------------------------------
PROMPT = [5, 6, 7, 51, 5, 6, 7, 118, 5, 6, 7]  # lookup offers 118 then 51; the target samples each often


@pytest.mark.slow
@pytest.mark.parametrize("proposer", ["ngram", "hybrid"])
@pytest.mark.parametrize("mode", ["chain", "tree"])
def test_sampled_ngram_and_hybrid_drafts_draw_from_the_target_distribution(mode, proposer, impl):
    """600 seeded requests; chi-square of the first two tokens against the exact joint. The draft
    is a perturbed copy of the target, far enough that under top-k its draws are accepted about
    half the time (hybrid: where one is rejected, the n-gram node beside it is tested against the
    residual, and accepted often)."""
    target = tiny_model("llama", seed=0)
    sampling = SamplingParams(temperature=0.8, top_k=3)
    sp = SpecParams(mode=SpecMode(mode), draft_tokens=3, tree_budget=6, tree_depth=2, tree_topk=2, proposer=proposer)
    engine = make_engine(target, perturbed_copy(target, scale=0.02), slots=16, impl=impl)
    out = engine.generate(
        request(str(s), PROMPT, 2, sampling=SamplingParams(temperature=0.8, top_k=3, seed=s), spec=sp, ignore_eos=True)
        for s in range(600)
    )
    label = f"{mode}/{proposer}"
    chi_square_check([tuple(s.generated) for s in out.values()], exact_joint(target, PROMPT, sampling, 2), label)
    drafted = sum(s.stats.proposers["ngram"].draft_tokens for s in out.values() if "ngram" in s.stats.proposers)
    assert 0 < accepted_by(out.values(), "ngram") < drafted, f"{label}: n-gram acceptance tests too little"
    assert proposer == "ngram" or accepted_by(out.values(), "model") > 0, f"{label}: no model token accepted"


# --- the benchmark's contenders and its prompt set where copying matters ------------------------
def offline_args(*argv):
    import argparse

    from hedgerow.bench.offline import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.mark.unit
def test_contenders_name_their_proposer():
    from hedgerow.bench.offline_contenders import parse_contenders

    got = parse_contenders(offline_args("--modes", "plain,chain/model,chain@8/ngram:native,tree/hybrid,chain",
                                        "--baselines", "none", "--proposer", "ngram"))
    assert [(c.spec.mode.value, c.spec.proposer and c.spec.proposer.value, c.uses_draft) for c in got] == [
        ("plain", "ngram", False), ("chain", "model", True), ("chain", "ngram", False), ("tree", "hybrid", True),
        ("chain", "ngram", False)]  # without a slash: --proposer
    assert got[2].spec.draft_tokens == 8 and got[2].impl == "native"
    for bad in ("plain/ngram", "chain/beam", "chain:native/model"):
        with pytest.raises(HedgerowError, match="--modes"):
            parse_contenders(offline_args("--modes", bad, "--baselines", "none"))


@pytest.mark.unit
def test_edit_prompts_hold_the_solution_and_begin_its_renamed_copy():
    from hedgerow.bench.prompts import load_prompts

    for prompt, task in zip(load_prompts("humaneval-edit", 5), load_prompts("humaneval", 5)):
        first, _, rest = prompt.partition("\n\n\n# ")
        assert first.startswith(task) and "renamed to" in rest  # the whole solution, then the request
        last = prompt.splitlines()[-1]
        assert last.startswith("def ") and "_v2(" in last and not prompt.endswith("\n")
