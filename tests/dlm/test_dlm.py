"""Diffusion LM: tokenizer/corpus, windowed forward and guide cache, sampler exactness, guided rules."""

from __future__ import annotations

import random
import shutil

import pytest
import torch

from services.bench.dlm_evaluate import load_pair
from services.bench.dlm_exact import all_drafts, reference_generate, run_checks
from services.bench.stats import wilson
from services.contracts.errors import InvalidArgument
from services.dlm.checkpoint import CHECKPOINT_DIR, load, save
from services.dlm.guide import ARGuide, GuideCache
from services.dlm.layers import DLMConfig
from services.dlm.model import DiffusionLM, WindowKV
from services.dlm.sampler import CudaGraphs, Options, _accepts, sample, sample_batch, transfer_schedule
from services.dlm.tasks import (
    GEN_LEN,
    PROMPT_LEN,
    answer_of,
    encode_example,
    encode_prompt,
    eval_set,
    make_example,
)
from services.dlm.tokenizer import CharTokenizer

TOK = CharTokenizer()


def _random_pair(seed: int = 0, vocab: int | None = None) -> tuple[DiffusionLM, ARGuide]:
    torch.manual_seed(seed)
    v = vocab or TOK.vocab_size
    dlm = DiffusionLM(DLMConfig(vocab_size=v, dim=48, n_layers=2, n_heads=2, ffn_dim=96, max_len=48)).eval()
    guide = ARGuide(DLMConfig(vocab_size=v, dim=32, n_layers=2, n_heads=2, ffn_dim=64, max_len=48)).eval()
    return dlm, guide



@pytest.fixture(scope="module")
def trained() -> tuple[DiffusionLM, ARGuide, CharTokenizer]:
    return load_pair()


def test_tokenizer_roundtrip_and_bad_char() -> None:
    assert TOK.decode(TOK.encode("A12+34=")) == "A12+34="
    assert TOK.decode(TOK.encode("123") + [TOK.eos_id] + TOK.encode("9")) == "123"
    with pytest.raises(InvalidArgument, match="prompt: character 'x'"):
        TOK.encode("12x")


def test_tasks_answers_check_and_layout() -> None:
    rng = random.Random(3)
    for _ in range(200):
        ex = make_example(rng)
        assert answer_of(ex.prompt) == ex.answer
        ids = encode_example(TOK, ex)
        assert len(ids) == PROMPT_LEN + GEN_LEN and TOK.decode(ids[PROMPT_LEN:]) == ex.answer
    assert eval_set(5) == eval_set(5) and eval_set(5) != eval_set(5, seed=1)
    with pytest.raises(InvalidArgument, match="prompt"):
        encode_prompt(TOK, "R" + "1" * 30 + "=")


def test_window_forward_with_fresh_store_equals_full_and_stale_store_differs() -> None:
    dlm, _ = _random_pair()
    x = torch.randint(0, TOK.vocab_size, (2, 48))
    with torch.no_grad():
        full = dlm(x)
        store = WindowKV(dlm.cfg, 2, 48, x.device, torch.float32)
        dlm.forward_window(x, 0, store)
        assert torch.allclose(dlm.forward_window(x[:, 30:], 30, store), full[:, 30:], atol=1e-5)
        store.k[:, :, :, :3] += 1.0  # stale prefix K/V must change the window's logits
        assert not torch.allclose(dlm.forward_window(x[:, 30:], 30, store), full[:, 30:], atol=1e-5)
    with pytest.raises(ValueError):
        dlm.forward_window(x[:, 30:], 30, None)


def test_guide_cache_extend_and_crop_match_full_causal_forward() -> None:
    _, guide = _random_pair()
    x = torch.randint(0, TOK.vocab_size, (1, 40))
    with torch.no_grad():
        full = guide(x)
        cache = GuideCache()
        a = guide.extend(x[:, :10], cache)
        b = guide.extend(x[:, 10:30], cache)
        cache.crop(22)
        assert cache.length == 22
        c = guide.extend(x[:, 22:], cache)
    for got, lo, hi in ((a, 0, 10), (b, 10, 30), (c, 22, 40)):
        assert torch.allclose(got, full[:, lo:hi], atol=1e-5)


def test_transfer_schedule() -> None:
    assert transfer_schedule(4, 4) == [1, 1, 1, 1]
    assert transfer_schedule(5, 2) == [3, 2]


@pytest.mark.parametrize("opts", [Options(), Options(block=8, steps_per_block=3), Options(block=24, steps_per_block=6)])
def test_exactness_on_random_model(opts: Options) -> None:
    dlm, guide = _random_pair(1)
    prompts = [encode_prompt(TOK, ex.prompt) for ex in eval_set(2)]
    checks = run_checks(dlm, guide, prompts, opts, TOK.mask_id, TOK.eos_id)
    assert all(checks.values()), checks


def test_exactness_on_trained_model_and_freecache_differs_from_reference_work(trained) -> None:
    dlm, guide, tok = trained
    pr = encode_prompt(tok, eval_set(1)[0].prompt)
    base = sample(dlm, pr, Options(cache="off"), tok.mask_id, tok.eos_id)
    assert base.tokens == reference_generate(dlm, pr, GEN_LEN, 4, 4, tok.mask_id)
    fc = sample(dlm, pr, Options(cache="freecache"), tok.mask_id, tok.eos_id)
    # Same number of steps, far less linear work: step 0 full, then only "current block -> end".
    assert fc.stats.forward_passes == base.stats.forward_passes == GEN_LEN
    assert base.stats.dlm_tokens == GEN_LEN * (PROMPT_LEN + GEN_LEN)
    assert fc.stats.dlm_tokens == 48 + 3 * 24 + 4 * (20 + 16 + 12 + 8 + 4)
    lag = sample(dlm, pr, Options(cache="freecache_lag"), tok.mask_id, tok.eos_id)
    assert lag.stats.dlm_tokens == fc.stats.dlm_tokens + 5 * 4  # each later block re-reads the previous one once
    acc = sample(dlm, pr, Options(accept="all"), tok.mask_id, tok.eos_id, guide=guide)
    assert acc.tokens == all_drafts(dlm, pr, GEN_LEN, tok.mask_id, tok.eos_id) and acc.stats.steps == 1


def test_trained_models_solve_tasks(trained) -> None:
    dlm, guide, tok = trained
    for ex in eval_set(3):
        pr = encode_prompt(tok, ex.prompt)
        for opts, g in ((Options(cache="off"), None), (Options(cache="freecache"), guide),
                        (Options(cache="off"), guide)):
            assert tok.decode(sample(dlm, pr, opts, tok.mask_id, tok.eos_id, guide=g).tokens) == ex.answer


def test_acceptance_rules() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2], [0.5, 0.2, 0.3], [0.4, 0.35, 0.25]]))
    drafts = torch.tensor([1, 1, 1])
    assert _accepts(logits, drafts, Options(accept="top1")).tolist() == [False, False, False]
    assert _accepts(logits, drafts, Options(accept="topk", k=2)).tolist() == [True, False, True]
    # p(draft) >= 0.7 * max p: 0.3 < 0.35 rejects row 0; 0.35 >= 0.28 accepts row 2.
    assert _accepts(logits, drafts, Options(accept="topk_rel", k=2, tau=0.7)).tolist() == [False, False, True]
    assert _accepts(logits, drafts, Options(accept="all")).all()


def test_rejecting_guide_still_commits_one_dlm_token_per_step() -> None:
    dlm, guide = _random_pair(2)
    pr = encode_prompt(TOK, "R12345=")
    with torch.no_grad():
        guide.head.weight.zero_()
        guide.head.weight[TOK.pad_id] = 1.0  # always predicts [PAD]: never agrees with a draft
    res = sample(dlm, pr, Options(accept="top1"), TOK.mask_id, TOK.eos_id, guide=guide)
    gains = [b - a for a, b in zip([0] + res.stats.commits, res.stats.commits, strict=False)]
    assert res.stats.steps == len(res.stats.commits)
    assert all(g == 1 for g in gains[:-1]) and gains[-1] >= 1


def test_mismatched_guide_and_bad_options_are_clear_errors() -> None:
    dlm, _ = _random_pair()
    _, other = _random_pair(vocab=TOK.vocab_size + 5)
    pr = encode_prompt(TOK, "R12=")
    with pytest.raises(InvalidArgument, match="guide"):
        sample(dlm, pr, Options(), TOK.mask_id, TOK.eos_id, guide=other)
    for bad, field in ((Options(cache="nope"), "cache"), (Options(block=5), "block"),
                       (Options(steps_per_block=9), "steps_per_block"), (Options(tau=2.0), "tau"),
                       (Options(gen_len=48), "gen_len")):
        with pytest.raises(InvalidArgument, match=field):
            sample(dlm, pr, bad, TOK.mask_id, TOK.eos_id)


def test_checkpoint_sha256_is_checked(tmp_path) -> None:
    for name in ("dlm.pt", "dlm.sha256", "guide.pt", "guide.sha256"):
        shutil.copy(CHECKPOINT_DIR / name, tmp_path / name)
    load(tmp_path / "dlm.pt")
    with open(tmp_path / "dlm.pt", "ab") as f:
        f.write(b"x")
    with pytest.raises(InvalidArgument, match="sha256"):
        load(tmp_path / "dlm.pt")
    other = CharTokenizer(chars="0123456789+=ARSX", name="other")
    save(_random_pair()[1], other, tmp_path / "guide.pt")
    save(_random_pair()[0], TOK, tmp_path / "dlm.pt")
    with pytest.raises(InvalidArgument, match="tokenizer"):
        load_pair(tmp_path)


def test_wilson_interval() -> None:
    lo, hi = wilson(50, 100)
    assert lo < 0.5 < hi and abs((lo + hi) / 2 - 0.5) < 1e-9
    assert wilson(10, 10)[1] == pytest.approx(1.0)


def test_guide_partially_accepts_weak_dlm_drafts() -> None:
    """With the weak DLM the guide accepts some drafts and rejects others: several steps, each growing the
    committed contiguous prefix by at least one token, until the whole response is committed."""
    dlm, _, tok = load_pair(dlm_path=CHECKPOINT_DIR / "dlm_weak.pt")
    _, guide, _ = load_pair()
    steps = []
    for ex in eval_set(6):
        pr = encode_prompt(tok, ex.prompt)
        res = sample(dlm, pr, Options(), tok.mask_id, tok.eos_id, guide=guide)
        commits = res.stats.commits
        assert commits == sorted(commits) and commits[-1] == GEN_LEN
        assert all(b > a for a, b in zip([0] + commits, commits, strict=False))
        steps.append(res.stats.steps)
    assert max(steps) > 1 and min(steps) < GEN_LEN


@pytest.mark.parametrize("cache", ["off", "freecache", "refresh_block"])
def test_batched_sampling_gives_each_row_its_solo_tokens(trained, cache: str) -> None:
    dlm, _, tok = trained
    opts = Options(block=2, steps_per_block=2, cache=cache)
    prompts = [encode_prompt(tok, ex.prompt) for ex in eval_set(6, seed=99)]
    solo = [sample(dlm, pr, opts, tok.mask_id, tok.eos_id) for pr in prompts]
    batch = sample_batch(dlm, prompts, opts, tok.mask_id, tok.eos_id)
    assert [r.tokens for r in batch] == [r.tokens for r in solo]
    # forwards are counted once per batch, positions per sequence: the same as one solo run
    assert batch[0].stats.forward_passes == solo[0].stats.forward_passes
    assert batch[0].stats.dlm_tokens == solo[0].stats.dlm_tokens


def test_batched_sampling_rejects_ragged_prompts_guides_and_cpu_graphs(trained) -> None:
    dlm, guide, tok = trained
    a, b = (encode_prompt(tok, ex.prompt) for ex in eval_set(2, seed=5))
    with pytest.raises(InvalidArgument, match="prompt: a batch needs prompts of one length"):
        sample_batch(dlm, [a, b[1:]], Options(), tok.mask_id, tok.eos_id)
    with pytest.raises(InvalidArgument, match="guide: guided sampling runs one prompt at a time"):
        sample_batch(dlm, [a, b], Options(), tok.mask_id, tok.eos_id, guide=guide)
    with pytest.raises(InvalidArgument, match="graphs: CUDA graphs need"):
        sample(dlm, a, Options(), tok.mask_id, tok.eos_id, graphs=CudaGraphs())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("cache", ["off", "freecache"])
def test_cuda_graph_replay_equals_eager_on_gpu(cache: str) -> None:
    dlm, _ = _random_pair(3)
    dlm = dlm.cuda()
    opts = Options(gen_len=16, block=4, steps_per_block=4, cache=cache)
    graphs = CudaGraphs()
    for seed in range(3):  # later generations replay the graphs captured by the first
        pr = torch.randint(3, TOK.vocab_size, (20,), generator=torch.Generator().manual_seed(seed)).tolist()
        eager = sample(dlm, pr, opts, TOK.mask_id, TOK.eos_id)
        assert sample(dlm, pr, opts, TOK.mask_id, TOK.eos_id, graphs=graphs).tokens == eager.tokens
