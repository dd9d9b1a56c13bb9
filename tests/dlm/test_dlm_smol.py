"""The real-tokenizer path: a DLM on SmolLM2's tokenizer guided by SmolLM2-135M (Tandem's engine)."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from services.bench.dlm_exact import all_drafts
from services.contracts.errors import InvalidArgument
from services.dlm.checkpoint import CHECKPOINT_DIR
from services.dlm.checkpoint import load as load_char
from services.dlm.engine_guide import EngineGuide
from services.dlm.sampler import Options, sample, sample_iter
from services.dlm.smol import SMOL_CHECKPOINT, SmolBridge, load, smol_tokenizer, tokenizer_fingerprint
from services.dlm.smol_tasks import GEN_LEN, PROMPT_LEN, eval_set, preamble
from services.dlm.tasks import encode_prompt

OPTS = Options(gen_len=GEN_LEN, block=4, steps_per_block=4)


@pytest.fixture(scope="module")
def smol():
    dlm, bridge, meta = load(SMOL_CHECKPOINT)
    return dlm, bridge, smol_tokenizer()


@pytest.fixture(scope="module")
def guide(smol_engine, smol):
    return EngineGuide(smol_engine, preamble=preamble(), skip_ids=(smol[1].pad_id,))


def _prompts(smol, n: int = 4) -> list[list[int]]:
    _, bridge, tok = smol
    return [bridge.encode_prompt(tok, ex.prompt) for ex in eval_set(n, seed=777)]


def test_bridge_round_trip_and_table(smol):
    dlm, bridge, tok = smol
    assert bridge.fingerprint == tokenizer_fingerprint(tok)
    assert bridge == replace(SmolBridge.build(tok), vocab_size=bridge.vocab_size)  # table rebuilt from the corpus
    for ex in eval_set(8):
        ids = bridge.encode_example(tok, ex)
        assert len(ids) == PROMPT_LEN + GEN_LEN and bridge.mask_id not in ids
        assert bridge.decode(tok, ids[PROMPT_LEN:]) == ex.answer
    with pytest.raises(InvalidArgument, match="^prompt:.*vocabulary"):
        bridge.encode_prompt(tok, "hello =")


def test_remapped_logits_live_in_smollm2_ids(smol):
    dlm, bridge, _ = smol
    x = torch.tensor([_prompts(smol, 1)[0] + [bridge.mask_id] * GEN_LEN])
    out = dlm(x)
    assert out.shape[-1] == bridge.vocab_size + 1
    inner = dlm.inner(dlm.to_compact[x])
    assert torch.equal(out[..., list(bridge.ids)], inner[..., :-1])
    outside = torch.ones(bridge.vocab_size + 1, dtype=torch.bool)
    outside[list(bridge.ids)] = False
    assert outside[bridge.mask_id] and torch.isinf(out[..., outside]).all()
    assert (out[0, PROMPT_LEN:].argmax(-1) != bridge.mask_id).all()


@pytest.mark.slow
def test_accept_all_guided_equals_committing_all_drafts(smol, guide):
    dlm, bridge, _ = smol
    for pr in _prompts(smol):
        want = all_drafts(dlm, pr, GEN_LEN, bridge.mask_id, bridge.eos_id)
        for cache in ("off", "freecache"):
            res = sample(dlm, pr, replace(OPTS, cache=cache, accept="all"), bridge.mask_id, bridge.eos_id, guide=guide)
            assert res.tokens == want
            assert res.stats.forward_passes == 1 and res.stats.guide_passes >= 1


@pytest.mark.slow
def test_cropped_guide_scores_equal_a_fresh_guide(smol, guide, smol_engine):
    pr = _prompts(smol, 1)[0]
    a, b = [33, 34, 35, 36], [40, 41, 198, 198]  # two different continuations after " "
    cache = guide.new_cache(capacity=8)  # small on purpose: reading past it must grow the buffer
    guide.extend(torch.tensor([pr + [216]]), cache)
    guide.extend(torch.tensor([a]), cache)
    cache.crop(len(pr) + 1)
    assert cache.length == len(pr) + 1
    got = guide.extend(torch.tensor([b]), cache)[0]
    fresh = guide.new_cache()
    want = guide.extend(torch.tensor([pr + [216] + b]), fresh)[0, -len(b):]
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)
    # An independent reference: a plain engine prefill of preamble + the real (unpadded) tokens.
    real = [t for t in pr if t != smol[1].pad_id] + [216] + b
    ids = smol_engine.tokenizer.encode(preamble(), add_special_tokens=False) + real
    ref = smol_engine.prefill([ids], smol_engine.new_kv(1, len(ids)), [0])[0]
    assert torch.allclose(got[-1], ref, atol=1e-4, rtol=1e-4)
    # Cropping into the padding and reading again: pad rows repeat the preamble's next-token logits.
    cache.crop(2)
    rows = guide.extend(torch.tensor([pr[2:]]), cache)[0]
    assert torch.allclose(rows[-1], guide.extend(torch.tensor([pr]), guide.new_cache())[0, -1], atol=1e-4, rtol=1e-4)
    assert torch.allclose(rows[0], guide.pre_last, atol=1e-4)


@pytest.mark.slow
def test_top1_guided_commits_only_smollm2_greedy_tokens(smol, guide, smol_engine):
    """Every token of a step after its first must be SmolLM2's own greedy choice (checked by fresh prefills)."""
    dlm, bridge, _ = smol
    pre = smol_engine.tokenizer.encode(preamble(), add_special_tokens=False)
    pr = _prompts(smol, 1)[0]
    opts = replace(OPTS, accept="top1")
    prev = 0
    for x, stats in sample_iter(dlm, pr, opts, bridge.mask_id, bridge.eos_id, guide=guide):
        n = stats.commits[-1]
        seq = x[0].tolist()
        assert n > prev
        for i in range(PROMPT_LEN + prev + 1, PROMPT_LEN + n):
            if seq[i - 1] == bridge.eos_id:
                break  # EOS filled the rest
            ctx = pre + [t for t in seq[:i] if t != bridge.pad_id]
            ref = smol_engine.prefill([ctx], smol_engine.new_kv(1, len(ctx)), [0])[0]
            assert int(ref.argmax()) == seq[i]
        prev = n
    assert stats.guide_passes >= 2 and stats.steps <= GEN_LEN


@pytest.mark.slow
def test_mismatched_pair_is_invalid_argument_naming_guide(smol, guide):
    char_dlm, char_tok, _ = load_char(CHECKPOINT_DIR / "dlm_weak.pt")
    pr = encode_prompt(char_tok, "R123=")
    with pytest.raises(InvalidArgument, match="^guide:") as e:
        sample(char_dlm, pr, Options(), char_tok.mask_id, char_tok.eos_id, guide=guide)
    assert e.value.param == "guide" and e.value.code == "INVALID_ARGUMENT"
    char_guide, _, _ = load_char(CHECKPOINT_DIR / "guide.pt")
    dlm, bridge, _ = smol
    with pytest.raises(InvalidArgument, match="^guide:"):
        sample(dlm, _prompts(smol, 1)[0], OPTS, bridge.mask_id, bridge.eos_id, guide=char_guide)


@pytest.mark.slow
def test_bench_dlm_smollm2_json(tmp_path) -> None:
    out = tmp_path / "smol.json"
    cmd = [sys.executable, "-m", "services.cli", "bench", "dlm", "--smollm2", "--n", "1", "--exact-prompts", "1",
           "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(out.read_text())
    for name in ("baseline", "guided", "freecache_guided"):
        for key in ("accuracy", "forward_passes", "guide_forward_passes", "seconds"):
            assert isinstance(res[name][key], float | int), (name, key)
    assert res["baseline"]["guide_forward_passes"] == 0 and res["guided"]["guide_forward_passes"] > 0
    assert res["guided"]["forward_passes"] <= res["baseline"]["forward_passes"] == GEN_LEN
    assert res["exact_checks"] and all(res["exact_checks"].values())


def test_bench_dlm_smollm2_rejects_bad_flags() -> None:
    cmd = [sys.executable, "-m", "services.cli", "bench", "dlm", "--smollm2", "--block", "3"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "block" in proc.stderr and "Traceback" not in proc.stderr
