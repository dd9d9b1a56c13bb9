"""Semi-autoregressive block denoising for the diffusion LM, with its speed options in one place:

- cache="off": LLaDA's reference loop, a full forward per step (the baseline);
- cache="freecache": step 0 is a full forward; afterwards each step runs only the window "current block ->
  end" against the frozen K/V of everything before it; a finished block keeps the K/V of its last step;
- cache="freecache_lag": as freecache, but the first step of a block still re-reads the previous block,
  so a finished block is frozen from a forward in which all its tokens are real (one-block overlap);
- cache="refresh_block": as freecache, plus a full forward at the first step of every block (ablation,
  Fast-dLLM's prefix cache); cache="refresh_step": refresh before every step (must equal the baseline);
- guide=ARGuide: Guided Diffusion -- the DLM drafts every masked position in one forward, the guide
  accepts a left-to-right prefix of the drafts, at least one DLM token is committed per step.

The block samplers also run a batch of equal-length prompts in one forward per step (`sample_batch`), and on
a GPU can replay each forward from a CUDA graph (`CudaGraphs`): both cut the per-op overhead that otherwise
hides FreeCache's saved arithmetic.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from services.contracts.errors import InvalidArgument
from services.dlm.guide import ARGuide, GuideCache
from services.dlm.model import DiffusionLM, WindowKV

CACHE_MODES = ("off", "freecache", "freecache_lag", "refresh_block", "refresh_step")
ACCEPT_RULES = ("top1", "topk", "topk_rel", "all")


@dataclass(slots=True)
class Options:
    gen_len: int = 24
    block: int = 4
    steps_per_block: int = 4
    cache: str = "off"
    accept: str = "topk_rel"
    k: int = 2
    tau: float = 0.5
    guide_chunk: int = 4

    def validate(self, max_len: int, prompt_len: int) -> None:
        if self.cache not in CACHE_MODES:
            raise InvalidArgument(f"cache: {self.cache!r} is not one of {CACHE_MODES}", param="cache")
        if self.accept not in ACCEPT_RULES:
            raise InvalidArgument(f"accept: {self.accept!r} is not one of {ACCEPT_RULES}", param="accept")
        for name in ("gen_len", "block", "steps_per_block", "k", "guide_chunk"):
            if getattr(self, name) < 1:
                raise InvalidArgument(f"{name}: must be at least 1", param=name)
        if self.gen_len % self.block:
            raise InvalidArgument(f"block: {self.block} does not divide gen_len {self.gen_len}", param="block")
        if self.steps_per_block > self.block:
            raise InvalidArgument(f"steps_per_block: {self.steps_per_block} exceeds block {self.block}",
                                  param="steps_per_block")
        if not 0.0 <= self.tau <= 1.0:
            raise InvalidArgument(f"tau: {self.tau} is not in [0, 1]", param="tau")
        if prompt_len + self.gen_len > max_len:
            raise InvalidArgument(f"gen_len: prompt {prompt_len} + gen_len {self.gen_len} exceeds the model's "
                                  f"{max_len} positions", param="gen_len")


@dataclass(slots=True)
class Stats:
    steps: int = 0              # denoising steps (one DLM logits evaluation each)
    forward_passes: int = 0     # DLM forward calls (refresh forwards count too)
    dlm_tokens: int = 0         # positions pushed through the DLM: the linear (projection/FFN) work
    guide_passes: int = 0
    guide_tokens: int = 0
    commits: list[int] = field(default_factory=list)  # contiguous committed response length after each step


@dataclass(slots=True)
class Result:
    tokens: list[int]
    stats: Stats


def transfer_schedule(block: int, steps: int) -> list[int]:
    """How many tokens each step of a block unmasks: as even as possible, remainder first (LLaDA)."""
    base, rem = divmod(block, steps)
    return [base + (1 if i < rem else 0) for i in range(steps)]


class CudaGraphs:
    """Replays the DLM forward from CUDA graphs, one per window start, for a fixed (model, batch, length,
    cache) shape; a different shape re-captures. The sequence and the K/V store live in static buffers
    owned here, so graphs stay valid across generations. Only the block samplers use it (every window
    start is known in advance); a forward is a pure function of the sequence and the store's frozen
    prefix, so the warm-up and capture runs leave the same store a single eager call would."""

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.x: torch.Tensor | None = None
        self.store: WindowKV | None = None
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None

    def bind(self, model: DiffusionLM, x: torch.Tensor, cached: bool) -> tuple[torch.Tensor, WindowKV | None]:
        if x.device.type != "cuda":
            raise InvalidArgument("graphs: CUDA graphs need the model on a CUDA device", param="graphs")
        key = (id(model), tuple(x.shape), cached)
        if key != self.key:
            self.key, self.graphs, self.pool = key, {}, torch.cuda.graph_pool_handle()
            self.x = torch.empty_like(x)
            self.store = WindowKV(model.cfg, x.shape[0], x.shape[1], x.device, model.embed.weight.dtype) \
                if cached else None
        self.x.copy_(x)
        return self.x, self.store

    def forward(self, model: DiffusionLM, start: int) -> torch.Tensor:
        if start not in self.graphs:
            def fwd() -> torch.Tensor:
                return model.forward_window(self.x[:, start:], start, self.store)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                fwd()
            torch.cuda.current_stream().wait_stream(side)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=self.pool):
                out = fwd()
            self.graphs[start] = (g, out)
        g, out = self.graphs[start]
        g.replay()
        return out


class _Runner:
    """Owns the sequence, the K/V store and the counters; `logits` hides which cache mode is used."""

    def __init__(self, model: DiffusionLM, x: torch.Tensor, cache: str, stats: Stats,
                 graphs: CudaGraphs | None = None) -> None:
        self.model, self.cache, self.stats, self.graphs = model, cache, stats, graphs
        if graphs is not None:
            self.x, self.store = graphs.bind(model, x, cache != "off")
        else:
            self.x = x
            self.store = None if cache == "off" else WindowKV(model.cfg, x.shape[0], x.shape[1], x.device,
                                                              model.embed.weight.dtype)

    def _fwd(self, start: int) -> torch.Tensor:
        self.stats.forward_passes += 1
        self.stats.dlm_tokens += self.x.shape[1] - start
        if self.graphs is not None:
            return self.graphs.forward(self.model, start)
        return self.model.forward_window(self.x[:, start:], start, self.store)

    def logits(self, window_start: int, refresh: bool) -> tuple[torch.Tensor, int]:
        """(logits, offset): logits[:, i] belongs to position offset + i, and offset <= window_start."""
        self.stats.steps += 1
        if self.cache == "off":
            return self._fwd(0), 0
        if refresh or self.cache == "refresh_step":
            full = self._fwd(0)
            if self.cache != "refresh_step" or window_start == 0:
                return full, 0
        return self._fwd(window_start), window_start


@torch.inference_mode()
def sample_iter(model: DiffusionLM, prompt: list[int], opts: Options, mask_id: int, eos_id: int,
                guide: ARGuide | None = None) -> Iterator[tuple[torch.Tensor, Stats]]:
    """Yields (sequence, stats) after every step; the last yield is the finished sequence."""
    yield from _iterate(model, [prompt], opts, mask_id, eos_id, guide, None)


def _iterate(model: DiffusionLM, prompts: list[list[int]], opts: Options, mask_id: int, eos_id: int,
             guide: ARGuide | None, graphs: CudaGraphs | None) -> Iterator[tuple[torch.Tensor, Stats]]:
    if not prompts:
        raise InvalidArgument("prompt: no prompts given", param="prompt")
    p = len(prompts[0])
    if any(len(pr) != p for pr in prompts):
        raise InvalidArgument("prompt: a batch needs prompts of one length (left-pad them)", param="prompt")
    opts.validate(model.cfg.max_len, p)
    if guide is not None:
        if len(prompts) > 1 or graphs is not None:
            raise InvalidArgument("guide: guided sampling runs one prompt at a time, eagerly", param="guide")
        check_guide(model, guide)
        if guide.cfg.max_len < p + opts.gen_len:
            raise InvalidArgument("guide: too few positions for prompt + gen_len", param="guide")
    dev = model.embed.weight.device
    x = torch.tensor([pr + [mask_id] * opts.gen_len for pr in prompts], device=dev)
    stats = Stats()
    run = _Runner(model, x, opts.cache, stats, graphs)
    x = run.x
    steps = _guided_steps(run, p, opts, mask_id, eos_id, guide) if guide is not None else \
        _block_steps(run, p, opts, mask_id)
    for _ in steps:
        stats.commits.append(_contiguous(x[:, p:], mask_id))
        yield x, stats


def check_guide(model: DiffusionLM, guide: ARGuide) -> None:
    """Guide and DLM must share a tokenizer. Models on a named vocabulary (`vocab_name`, e.g. SmolLM2's,
    see smol.py) must carry the same name; unnamed ones (the task char tokenizer) must match in size."""
    mine, theirs = getattr(model, "vocab_name", None), getattr(guide, "vocab_name", None)
    if mine != theirs:
        raise InvalidArgument(f"guide: its tokenizer ({theirs or 'the task char tokenizer'}) is not the diffusion "
                              f"model's ({mine or 'the task char tokenizer'})", param="guide")
    if mine is None and guide.cfg.vocab_size != model.cfg.vocab_size:
        raise InvalidArgument("guide: its vocabulary does not match the diffusion model's", param="guide")


def sample(model: DiffusionLM, prompt: list[int], opts: Options, mask_id: int, eos_id: int,
           guide: ARGuide | None = None, graphs: CudaGraphs | None = None) -> Result:
    return sample_batch(model, [prompt], opts, mask_id, eos_id, guide, graphs)[0]


@torch.inference_mode()
def sample_batch(model: DiffusionLM, prompts: list[list[int]], opts: Options, mask_id: int, eos_id: int,
                 guide: ARGuide | None = None, graphs: CudaGraphs | None = None) -> list[Result]:
    """Generate for several prompts of one length at once (one forward per step for the whole batch); each
    row gets exactly the tokens it would get alone, up to float differences of batched arithmetic. The
    stats count forwards once for the batch and positions per sequence. `graphs` replays CUDA graphs."""
    *_, (x, stats) = _iterate(model, prompts, opts, mask_id, eos_id, guide, graphs)
    p = len(prompts[0])
    return [Result(row[p:].tolist(), stats) for row in x]


def _contiguous(resp: torch.Tensor, mask_id: int) -> int:
    """Committed prefix length, the shortest over the batch."""
    masked = resp == mask_id
    first = torch.where(masked.any(1), masked.int().argmax(1), resp.shape[1])
    return int(first.min())


def _block_steps(run: _Runner, p: int, opts: Options, mask_id: int) -> Iterator[None]:
    x, b = run.x, opts.block
    for blk in range(opts.gen_len // b):
        lo, hi = p + blk * b, p + (blk + 1) * b
        for j, n in enumerate(transfer_schedule(b, opts.steps_per_block)):
            # Step 0 of the whole run is a full forward: the window start of block 0 has no K/V yet.
            first = blk == 0 and j == 0
            start = lo - b if j == 0 and blk > 0 and run.cache == "freecache_lag" else lo
            logits, off = run.logits(start, refresh=first or (j == 0 and run.cache == "refresh_block"))
            conf, pred = logits[:, lo - off:hi - off].softmax(-1).max(-1)
            masked = x[:, lo:hi] == mask_id
            conf = torch.where(masked, conf, torch.tensor(-1.0, device=conf.device))
            # Every row has at least n masks left here (the schedule sums to b), so no host sync is needed.
            pick = conf.topk(n, dim=-1).indices
            x[:, lo:hi] = x[:, lo:hi].scatter(1, pick, pred.gather(1, pick))
            yield


def _accepts(guide_logits: torch.Tensor, drafts: torch.Tensor, opts: Options) -> torch.Tensor:
    """Per-position verdict of the guide on the DLM drafts (guide_logits[i] predicts drafts[i])."""
    if opts.accept == "all":
        return torch.ones_like(drafts, dtype=torch.bool)
    probs = guide_logits.softmax(-1)
    if opts.accept == "top1":
        return probs.argmax(-1) == drafts
    top = probs.topk(min(opts.k, probs.shape[-1]), dim=-1)
    in_top = (top.indices == drafts[:, None]).any(-1)
    if opts.accept == "topk":
        return in_top
    p_draft = probs.gather(-1, drafts[:, None])[:, 0]
    return in_top & (p_draft >= opts.tau * top.values[:, 0])


def _guided_steps(run: _Runner, p: int, opts: Options, mask_id: int, eos_id: int,
                  guide: ARGuide) -> Iterator[None]:
    x, total = run.x, run.x.shape[1]
    # A guide that owns another kind of cache (the engine guide's KVBuffer) makes its own.
    gcache = guide.new_cache() if hasattr(guide, "new_cache") else GuideCache()
    c, frozen, first = p, p, True
    while c < total:
        # FreeCache here freezes with a one-step lag: tokens committed by the previous step were masks in
        # that step's input, so their K/V is taken from this step's forward, where they are real tokens.
        logits, off = run.logits(frozen, refresh=first)
        first, frozen = False, c
        drafts = logits[0, c - off:].argmax(-1)
        n = _verify(guide, gcache, x, c, drafts, opts, run.stats)
        n = max(n, 1)  # the DLM always commits at least its first draft
        x[0, c:c + n] = drafts[:n]
        hit = (drafts[:n] == eos_id).nonzero()
        if len(hit):
            x[0, c + int(hit[0, 0]):] = eos_id  # EOS ends the answer: fill the rest
            c = total
        else:
            c += n
        yield


def _verify(guide: ARGuide, cache: GuideCache, x: torch.Tensor, c: int, drafts: torch.Tensor,
            opts: Options, stats: Stats) -> int:
    """Length of the draft prefix the guide accepts; its cache ends up holding exactly x[:c] + accepted."""
    # Re-read the last committed token (or catch up on forced commits / the prompt) to get the guide's
    # prediction for position c; the cache never holds more than the committed prefix after this.
    cache.crop(c - 1)
    start = cache.length
    nxt = guide.extend(x[:, start:c], cache)[0, -1]
    stats.guide_passes += 1
    stats.guide_tokens += c - start
    accepted = 0
    while accepted < len(drafts):
        chunk = drafts[accepted:accepted + opts.guide_chunk]
        out = guide.extend(chunk[None], cache)[0]
        stats.guide_passes += 1
        stats.guide_tokens += len(chunk)
        preds = torch.cat([nxt[None], out[:-1]])
        ok = _accepts(preds, chunk, opts)
        r = int(ok.long().cumprod(0).sum())
        accepted += r
        if r < len(chunk):
            cache.crop(c + accepted)
            break
        nxt = out[-1]
    return accepted
