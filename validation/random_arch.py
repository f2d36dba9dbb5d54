"""Random small architectures from a grammar of layers, for property-based checks of graphcost.

    arch = generate(7)
    print(arch)                          # the architecture, readable (the seed reproduces it)
    model = arch.make_module()           # under any default device: meta for graphcost, cpu to run
    inputs = arch.make_inputs(torch.device("cpu"), torch.float32)

`generate(seed)` draws a structure from `random.Random(seed)` and `make_module()` builds it again
from the same seed every time, so the meta and the CPU builds are the same architecture (their
weights come from torch's RNG, which the caller seeds). Every shape is consistent by construction:
the generator tracks the activation's shape (batch excluded) through a layout, one of

    tokens (T,)        int64 ids, only at the input; an Embedding turns them into seq
    seq    (T, D)      features last: Linear, LayerNorm, RMSNorm, attention
    flat   (D,)        features last: Linear, LayerNorm, RMSNorm, BatchNorm1d
    c1d    (C, L)      channels first: Conv1d, BatchNorm1d, GroupNorm, pooling
    c2d    (C, H, W)   channels first: Conv2d, BatchNorm2d, GroupNorm, pooling, channels-last LN

The grammar (a model is an input, a body of blocks, an optional head):

    model     := input body head?
    input     := tokens Embedding PosEmbed? | seq | flat | c1d | c2d
    body      := block{2..5}
    block     := pointwise | mixer | residual | parallel | gate | shared | stack | resample
                 | transition
    pointwise := norm | activation | Dropout(p>0) | attention (seq) | same-size pooling
                 | channels-last LayerNorm (c2d) | x * scalar          (shape kept)
    mixer     := Linear(bias?) | Conv(groups, dilation, same padding; depthwise) (width changes)
    branch    := (pointwise | mixer | residual){1..3} ending at a given width (geometry kept)
    residual  := x + branch(x)
    parallel  := combine(branch_1(x), ..., branch_k(x)),  combine in add, sub, mul, maximum, cat
    gate      := branch(x) * sigmoid(branch(x)) | silu(branch(x)) * branch(x)
    shared    := one pointwise/residual module applied 2-3 times (shared parameters)
    stack     := 4 identical residual blocks in an nn.Sequential or an nn.ModuleList (graphcost's
                 repeated-block path)
    resample  := Conv(stride, padding, dilation, groups) | MaxPool | AvgPool | Adaptive pools
    transition:= a layout change by transpose / permute / reshape / flatten / mean
    head      := Linear to a few outputs | Linear tied to the Embedding's weight (tokens)

Attention is F.scaled_dot_product_attention (is_causal or not), an explicit softmax(q kᵀ) v (with
a causal mask made in forward or kept as a buffer, or none), or nn.MultiheadAttention
(need_weights or not). About one parameterized layer in six is frozen (requires_grad=False);
the input sometimes requires grad. Everything is tiny: batch 2, widths 4..32, so a real CPU
training step takes a few milliseconds.

>>> arch = generate(0)
>>> arch == generate(0) and str(arch) == str(generate(0))
True
>>> model = arch.make_module()
>>> out = model(*arch.make_inputs(torch.device("cpu"), torch.float32))
"""

from __future__ import annotations

import dataclasses
import functools
import math
import random
from collections.abc import Callable

import torch
from torch import nn

from validation.random_layers import (
    MHA,
    ChannelsLastLayerNorm,
    Gate,
    Parallel,
    PosEmbed,
    RandomArch,
    Residual,
    Scale,
    SelfAttention,
    Shared,
    Stack,
    State,
    TiedHead,
    Transform,
)

# The layers (validation/random_layers.py) are importable from here too, for hand-written
# architectures built like the generated ones (tests/test_random_architectures.py).
__all__ = ["Arch", "RandomArch", "State", "generate"]

BATCH = 2


# --- the grammar -------------------------------------------------------------------------------


ACTIVATIONS: tuple[Callable[[random.Random], nn.Module], ...] = (
    lambda r: nn.ReLU(), lambda r: nn.GELU(approximate=r.choice(["none", "tanh"])),
    lambda r: nn.SiLU(), lambda r: nn.Tanh(), lambda r: nn.Sigmoid(), lambda r: nn.Softplus(),
    lambda r: nn.Hardswish(), lambda r: nn.LeakyReLU(r.choice([0.01, 0.2])), lambda r: nn.ELU(),
    lambda r: nn.Mish(),
)
INPLACE_ACTIVATIONS = (nn.ReLU, nn.SiLU, nn.LeakyReLU, nn.Hardswish, nn.ELU, nn.Mish)


class _Grammar:
    def __init__(self, seed: int) -> None:
        self.r = random.Random(seed)
        self.params_made: list[nn.Module] = []  # layers with parameters, in creation order

    # helpers

    def _p(self, module: nn.Module) -> nn.Module:
        if any(True for _ in module.parameters(recurse=False)) or isinstance(
                module, (nn.MultiheadAttention,)):
            self.params_made.append(module)
        return module

    def divisor(self, n: int, cap: int | None = None) -> int:
        options = [g for g in range(1, n + 1) if n % g == 0 and (cap is None or g <= cap)]
        return self.r.choice(options)

    def width(self, around: int) -> int:
        return self.r.choice([w for w in (4, 6, 8, 12, 16, 24, 32) if w <= max(8, 2 * around)])

    # pieces

    def norm(self, s: State) -> nn.Module:
        r, w = self.r, s.width
        if s.layout in ("seq", "flat"):
            kinds = ["layernorm", "rmsnorm"] + (["batchnorm"] if s.layout == "flat" else [])
        else:
            kinds = ["batchnorm", "groupnorm"] + (["channels-last-ln"] if s.layout == "c2d" else [])
        kind = r.choice(kinds)
        if kind == "layernorm":
            affine = r.random() < 0.8
            return self._p(nn.LayerNorm(w, elementwise_affine=affine,
                                        bias=affine and r.random() < 0.7))
        if kind == "rmsnorm":
            return self._p(nn.RMSNorm(w, elementwise_affine=r.random() < 0.8))
        if kind == "batchnorm":
            cls = nn.BatchNorm2d if s.layout == "c2d" else nn.BatchNorm1d
            return self._p(cls(w, affine=r.random() < 0.8))
        if kind == "groupnorm":
            return self._p(nn.GroupNorm(self.divisor(w), w, affine=r.random() < 0.8))
        return self._channels_last_ln(w)

    def _channels_last_ln(self, w: int) -> nn.Module:
        m = ChannelsLastLayerNorm(w)
        self._p(m.norm)
        return m

    def activation(self, inplace_ok: bool) -> nn.Module:
        act = self.r.choice(ACTIVATIONS)(self.r)
        if inplace_ok and isinstance(act, INPLACE_ACTIVATIONS) and self.r.random() < 0.3:
            act.inplace = True
        return act

    def attention(self, s: State) -> nn.Module:
        r = self.r
        t, d = s.shape
        heads = self.divisor(d, cap=4)
        kind = r.choice(["sdpa", "explicit", "mha"])
        bias = r.random() < 0.6
        if kind == "mha":
            m = MHA(d, heads, bias, need_weights=r.random() < 0.5)
            self._p(m.attn)
            return m
        mask = r.choice(["causal", "none"] if kind == "sdpa" else ["causal", "causal-buffer", "none"])
        m = SelfAttention(t, d, heads, kind, mask, bias)
        self._p(m.qkv), self._p(m.proj)
        return m

    def same_pool(self, s: State) -> nn.Module:
        """A pooling that keeps the size (kernel 3, stride 1, padding 1)."""
        two = s.layout == "c2d"
        if self.r.random() < 0.5:
            return (nn.MaxPool2d if two else nn.MaxPool1d)(3, stride=1, padding=1)
        return (nn.AvgPool2d if two else nn.AvgPool1d)(3, stride=1, padding=1,
                                                      count_include_pad=self.r.random() < 0.5)

    def pointwise(self, s: State, after_mixer: bool = False) -> nn.Module:
        """A layer that keeps the shape."""
        r = self.r
        options = ["norm", "act", "act", "dropout", "scale"]
        if s.layout == "seq" and s.shape[1] >= 4:
            options += ["attention", "attention"]
        if s.layout in ("c1d", "c2d"):
            options += ["pool"]
        kind = r.choice(options)
        if kind == "norm":
            return self.norm(s)
        if kind == "act":
            return self.activation(inplace_ok=after_mixer)
        if kind == "dropout":
            p = r.choice([0.1, 0.25, 0.5])
            if s.layout == "c2d" and r.random() < 0.3:
                return nn.Dropout2d(p)
            return nn.Dropout(p)
        if kind == "scale":
            return Scale(r.choice([0.5, 2.0]))
        if kind == "attention":
            return self.attention(s)
        return self.same_pool(s)

    def mixer(self, s: State, width: int) -> nn.Module:
        """A layer that changes the width to `width` and keeps the rest of the shape."""
        r = self.r
        if s.layout in ("seq", "flat"):
            return self._p(nn.Linear(s.width, width, bias=r.random() < 0.7))
        cin = s.width
        if width % cin == 0 and r.random() < 0.3:
            groups = cin  # depthwise (channel multiplier width // cin)
        else:
            groups = self.divisor(math.gcd(cin, width))
        k = r.choice([1, 3, 3, 5]) if s.layout == "c1d" else r.choice([1, 3, 3])
        dilation = r.choice([1, 1, 2]) if k > 1 else 1
        cls = nn.Conv1d if s.layout == "c1d" else nn.Conv2d
        return self._p(cls(cin, width, k, padding=dilation * (k - 1) // 2, dilation=dilation,
                           groups=groups, bias=r.random() < 0.6))

    def branch(self, s: State, width: int, depth: int) -> nn.Module:
        """1..3 layers from `s` to `s.with_width(width)`."""
        r = self.r
        layers: list[nn.Module] = []
        cur = s
        n = r.randint(1, 3)
        for i in range(n):
            last = i == n - 1
            choice = r.random()
            if last and cur.width != width:
                layers.append(self.mixer(cur, width))
                cur = cur.with_width(width)
            elif choice < 0.4:
                hidden = width if last else self.width(cur.width)
                layers.append(self.mixer(cur, hidden))
                cur = cur.with_width(hidden)
            elif choice < 0.55 and depth > 0:
                layers.append(Residual(self.branch(cur, cur.width, depth - 1)))
            else:
                after = bool(layers) and isinstance(layers[-1], (nn.Linear, nn.Conv1d, nn.Conv2d))
                layers.append(self.pointwise(cur, after_mixer=after))
        return layers[0] if len(layers) == 1 else nn.Sequential(*layers)

    def resample(self, s: State) -> tuple[nn.Module, State]:
        """A convolution with any stride/padding/dilation/groups, or a pooling."""
        r = self.r
        two = s.layout == "c2d"
        spatial = s.shape[1:]
        kind = r.choice(["conv", "conv", "maxpool", "avgpool", "adaptive"])
        if kind == "adaptive":
            out = tuple(r.randint(1, max(1, x // 2)) for x in spatial)
            if r.random() < 0.5:
                m = (nn.AdaptiveAvgPool2d if two else nn.AdaptiveAvgPool1d)(out)
            else:
                m = (nn.AdaptiveMaxPool2d if two else nn.AdaptiveMaxPool1d)(out)
            return m, State(s.layout, (s.width,) + out)
        if kind in ("maxpool", "avgpool"):
            k = r.choice([2, 3])
            stride = r.choice([1, 2]) if k == 3 else 2
            pad = r.choice([0, 1]) if k == 3 else 0
            if any(x + 2 * pad < k for x in spatial):
                return self.pointwise(s), s
            out = tuple((x + 2 * pad - k) // stride + 1 for x in spatial)
            if kind == "maxpool":
                m = (nn.MaxPool2d if two else nn.MaxPool1d)(k, stride=stride, padding=pad)
            else:
                m = (nn.AvgPool2d if two else nn.AvgPool1d)(k, stride=stride, padding=pad)
            return m, State(s.layout, (s.width,) + out)
        cin = s.width
        cout = self.width(cin)
        if cout % cin == 0 and r.random() < 0.3:
            groups = cin
        else:
            groups = self.divisor(math.gcd(cin, cout))
        for _ in range(10):
            k = r.choice([1, 2, 3, 5] if not two else [1, 2, 3])
            stride, dilation = r.choice([1, 2, 2]), r.choice([1, 1, 2])
            pad = r.randint(0, 2)
            out = tuple((x + 2 * pad - dilation * (k - 1) - 1) // stride + 1 for x in spatial)
            if min(out) >= 2:
                break
        else:
            return self.pointwise(s), s
        cls = nn.Conv2d if two else nn.Conv1d
        m = self._p(cls(cin, cout, k, stride=stride, padding=pad, dilation=dilation,
                        groups=groups, bias=r.random() < 0.6))
        return m, State(s.layout, (cout,) + out)

    def transition(self, s: State) -> tuple[nn.Module, State]:
        """A layout change (no parameters)."""
        r = self.r
        if s.layout == "seq":
            t, d = s.shape
            kind = r.choice(["to-c1d", "to-c1d", "mean", "flatten"])
            if kind == "to-c1d":
                return Transform(r.choice(["transpose(1,2)", "transpose(1,2).contiguous"])), \
                    State("c1d", (d, t))
            if kind == "mean":
                return Transform("mean(1)"), State("flat", (d,))
            return Transform("flatten(1)"), State("flat", (t * d,))
        if s.layout == "flat":
            (d,) = s.shape
            splits = [(a, d // a) for a in range(2, d) if d % a == 0 and 2 <= d // a <= 32]
            if not splits:
                return self.pointwise(s), s
            a, b = r.choice(splits)
            if r.random() < 0.5:
                return Transform(r.choice(["view", "reshape"]), (a, b)), State("seq", (a, b))
            return Transform("view", (a, b)), State("c1d", (a, b))
        if s.layout == "c1d":
            c, length = s.shape
            kind = r.choice(["to-seq", "to-seq", "flatten", "mean"])
            if kind == "to-seq":
                return Transform("transpose(1,2)"), State("seq", (length, c))
            if kind == "mean":
                return Transform("mean(-1)"), State("flat", (c,))
            return Transform("flatten(1)"), State("flat", (c * length,))
        c, h, w = s.shape
        kind = r.choice(["to-seq", "to-c1d", "flatten", "channels-last"])
        if kind == "to-seq":
            return Transform("flatten(2).transpose(1,2)"), State("seq", (h * w, c))
        if kind == "to-c1d":
            return Transform("flatten(2)"), State("c1d", (c, h * w))
        if kind == "channels-last":
            return Transform("permute(0,2,3,1).reshape.permute"), s
        return Transform("flatten(1)"), State("flat", (c * h * w,))

    def block(self, s: State) -> tuple[nn.Module, State]:
        r = self.r
        options = ["pointwise", "mixer", "residual", "residual", "parallel", "gate", "shared",
                   "transition", "stack"]
        if s.layout in ("c1d", "c2d"):
            options += ["resample", "resample"]
        kind = r.choice(options)
        if kind == "pointwise":
            return self.pointwise(s), s
        if kind == "mixer":
            width = self.width(s.width)
            return self.mixer(s, width), s.with_width(width)
        if kind == "residual":
            return Residual(self.branch(s, s.width, depth=1)), s
        if kind == "parallel":
            combine = r.choice(["add", "sub", "mul", "maximum", "cat", "cat"])
            k = r.choice([2, 2, 3])
            if combine == "cat":
                widths = [self.width(s.width) for _ in range(k)]
            else:
                widths = [self.width(s.width)] * k
            branches = [self.branch(s, w, depth=1) for w in widths]
            return Parallel(branches, combine, s.feature_dim), s.with_width(sum(widths) if
                                                                            combine == "cat"
                                                                            else widths[0])
        if kind == "gate":
            width = self.width(s.width)
            value, gate = self.branch(s, width, 0), self.branch(s, width, 0)
            return Gate(value, gate, r.choice(["sigmoid", "swiglu"])), s.with_width(width)
        if kind == "shared":
            layer = self.pointwise(s) if r.random() < 0.4 else Residual(self.branch(s, s.width, 0))
            return Shared(layer, r.choice([2, 3])), s
        if kind == "stack":
            seed = r.randrange(2**31)
            blocks = []
            for _ in range(4):  # the same draws for each: identical blocks
                sub = _Grammar(seed)
                blocks.append(Residual(sub.branch(s, s.width, depth=0)))
                self.params_made += sub.params_made
            return (nn.Sequential(*blocks) if r.random() < 0.5 else Stack(blocks)), s
        if kind == "resample":
            return self.resample(s)
        return self.transition(s)

    def model(self, seed: int) -> tuple[RandomArch, State, int | None]:
        r = self.r
        layout = r.choice(["tokens", "tokens", "seq", "flat", "c1d", "c2d", "c2d"])
        vocab = None
        embedding = None
        if layout == "tokens":
            t, d, vocab = r.randint(4, 12), self.width(16), r.choice([16, 32, 50])
            embedding = self._p(nn.Embedding(vocab, d, padding_idx=0 if r.random() < 0.3 else None))
            stem: nn.Module = embedding
            if r.random() < 0.5:
                pos = PosEmbed(t, d)
                self._p(pos)
                stem = nn.Sequential(embedding, pos)
            input_state, s = State("tokens", (t,)), State("seq", (t, d))
        else:
            stem = nn.Identity()
            if layout == "seq":
                s = State("seq", (r.randint(4, 12), self.width(16)))
            elif layout == "flat":
                s = State("flat", (self.width(16),))
            elif layout == "c1d":
                s = State("c1d", (r.choice([3, 4, 6, 8]), r.randint(8, 16)))
            else:
                s = State("c2d", (r.choice([3, 4, 6, 8]), r.randint(6, 12), r.randint(6, 12)))
            input_state = s
        body = []
        for _ in range(r.randint(2, 5)):
            m, s = self.block(s)
            body.append(m)
        head: nn.Module = nn.Identity()
        choice = r.random() if self.params_made else 0.0  # something must train
        if embedding is not None and s.layout == "seq" and s.width == embedding.embedding_dim \
                and choice < 0.5:
            head = TiedHead(embedding)
        elif choice < 0.4:
            if s.layout in ("c1d", "c2d"):
                head = nn.Sequential(Transform("flatten(1)"),
                                     self._p(nn.Linear(s.numel(), r.choice([3, 5, 10]))))
            else:
                head = self._p(nn.Linear(s.width, r.choice([3, 5, 10]), bias=r.random() < 0.7))
        model = RandomArch(seed, input_state, stem, nn.Sequential(*body), head, [],
                           input_requires_grad=input_state.layout != "tokens" and r.random() < 0.1)
        return model, input_state, vocab

    def freeze(self, model: RandomArch) -> None:
        """Freeze about one parameterized layer in six (never all of them)."""
        r = self.r
        layers = list(dict.fromkeys(self.params_made))
        chosen = [m for m in layers if r.random() < 0.17]
        names = {id(m): n for n, m in model.named_modules()}
        trainable = {p for m in layers if m not in chosen for p in m.parameters()}
        if not trainable and not model.input_requires_grad:
            chosen = chosen[1:]
        for m in chosen:
            m.requires_grad_(False)
        model.frozen = [names[id(m)] for m in chosen]


@dataclasses.dataclass(frozen=True)
class Arch:
    """An architecture: build it with `make_module()` (under the default device) and feed it
    `make_inputs(device, dtype)` (a tuple). `generate(seed)` makes one from the grammar;
    `Arch.custom` wraps a hand-written factory (a minimal reproducer) the same way."""

    name: str  # "seed7", or a reproducer's name
    description: str
    input_state: State
    vocab: int | None
    input_requires_grad: bool
    factory: Callable[[], nn.Module] = dataclasses.field(repr=False, compare=False)
    seed: int = 0

    def make_module(self) -> nn.Module:
        return self.factory()

    def make_inputs(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor]:
        shape = (BATCH,) + self.input_state.shape
        if self.vocab is not None:
            ids = torch.randint(self.vocab, shape, generator=torch.Generator().manual_seed(self.seed))
            return (ids.to(device),)
        x = torch.randn(shape, generator=torch.Generator().manual_seed(self.seed), dtype=dtype)
        return (x.to(device).requires_grad_(self.input_requires_grad),)

    def __str__(self) -> str:
        return self.description

    @classmethod
    def custom(cls, name: str, input_state: State, factory: Callable[[], nn.Module], *,
               vocab: int | None = None, input_requires_grad: bool = False) -> Arch:
        """A hand-written architecture: `factory()` builds the module, the input is a batch of
        `input_state` (token ids below `vocab` when given)."""
        with torch.device("meta"):
            description = f"{name}: input={input_state}" + (
                ", input requires grad" if input_requires_grad else "") + f"\n{factory()!r}"
        return cls(name, description, input_state, vocab, input_requires_grad, factory)


def _build(seed: int) -> tuple[RandomArch, State, int | None]:
    g = _Grammar(seed)
    model, input_state, vocab = g.model(seed)
    g.freeze(model)
    return model, input_state, vocab


def _model_of(seed: int) -> RandomArch:
    return _build(seed)[0]


def generate(seed: int) -> Arch:
    """The architecture of `seed` (deterministic); its str is the model's repr."""
    with torch.device("meta"):
        model, input_state, vocab = _build(seed)
    return Arch(f"seed{seed}", repr(model), input_state, vocab, model.input_requires_grad,
                functools.partial(_model_of, seed), seed)
