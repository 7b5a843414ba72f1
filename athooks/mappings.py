"""Attention mappings: a feature map ``(B, C, *S)`` becomes a spatial attention map ``(B, *S)``.

``S`` is one to three spatial dimensions: ``(B, C, T)`` for a 1-D signal (or a token sequence a
transform turned channels-first), ``(B, C, H, W)`` for an image, ``(B, C, T, H, W)`` for a video;
the attention maps are ``(B, T)``, ``(B, H, W)`` and ``(B, T, H, W)``. A mapping reduces the
channel dimension only.

The built-ins are the activation-based mappings of Zagoruyko & Komodakis (ICLR 2017, section 3.1):

* ``sum``:   ``F_sum(A)   = sum_c |A_c|``
* ``sum_p``: ``F_sum^p(A) = sum_c |A_c|^p`` (default ``p = 2``, the paper's best)
* ``max_p``: ``F_max^p(A) = max_c |A_c|^p``

They are computed in float32 (float64 for float64 input) whatever the input dtype, so bf16/fp16
autocast cannot overflow them,
and for backward they keep only the feature map itself, which the network usually keeps anyway:
no extra full-size tensor is saved per tapped layer.

Any callable ``(B, C, *S) -> (B, *S)`` can be used where a mapping is expected; a mapping with
parameters is an :class:`torch.nn.Module` (subclass :class:`Mapping`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from athooks.checks import check_real
from athooks.context import functorch_active
from athooks.errors import CaptureError, ConfigurationError, PluginError
from athooks.registry import build

__all__ = [
    "Embedding",
    "Features",
    "FunctionMapping",
    "MaxP",
    "Mapping",
    "Sum",
    "SumP",
    "abs_pow_sum",
    "as_mapping",
    "mapping",
]


class Mapping(nn.Module):
    """Base class of attention mappings: ``forward(features (B, C, *S)) -> (B, *S)``.

    ``S`` is one to three spatial dimensions (1-D signal ``(T,)``, image ``(H, W)``, video
    ``(T, H, W)``); reduce over the channel dimension (``dim=1``) and the mapping works on all
    of them. A mapping that only makes sense for one layout (a 2-D convolution inside it, say)
    should raise a clear error for the others. Subclass it for a mapping with options or
    parameters; plain callables are wrapped in :class:`FunctionMapping`. ``name`` is the
    registry name (set by the registry for built-ins and plugins). A mapping that returns
    something other than a spatial map, e.g. channel descriptors ``(B, C)``, sets
    ``is_attention_map = False``: its output is then not checked against ``(B, *S)`` and never
    resized, and the two sides of a pair must agree in shape.

    Example:
        ```python
        import torch
        from athooks.plugin import Mapping

        class MeanAbs(Mapping):
            name = "mean_abs"

            def forward(self, features: torch.Tensor) -> torch.Tensor:
                return features.abs().mean(dim=1)

        print(MeanAbs()(torch.randn(2, 8, 4, 4)).shape)  # torch.Size([2, 4, 4])
        print(MeanAbs()(torch.randn(2, 8, 16)).shape)  # a 1-D signal: torch.Size([2, 16])
        ```
    """

    name: str = "mapping"
    provider: str = ""
    is_attention_map: bool = True

    def forward(self, features: Tensor) -> Tensor:  # pragma: no cover - abstract
        """Map a ``(B, C, *S)`` feature map to a ``(B, *S)`` attention map."""
        raise NotImplementedError

    def __repr__(self) -> str:
        extra = self.extra_repr()
        if list(self.children()):
            return super().__repr__()
        return f"{self.name}({extra})"


_WIDE = (torch.float32, torch.float64)  # float32 or wider: the dtypes maps are computed in


def at_least_float32(t: Tensor) -> Tensor:
    """``t`` in float32, or in its own dtype if that is wider (float64).

    Args:
        t: A floating tensor.

    Returns:
        The tensor, cast only when its dtype is narrower than float32.
    """
    if t.dtype in _WIDE:  # no dispatch for the common case: two calls per map otherwise
        return t
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _abs_pow_sum_forward(a: Tensor, p: float) -> Tensor:
    af = at_least_float32(a)
    if p == 2:
        return af.square().sum(dim=1)
    if p == 1:
        return af.abs().sum(dim=1)
    return af.abs().pow(p).sum(dim=1)


def _abs_pow_sum_backward(a: Tensor, p: float, grad: Tensor) -> Tensor:
    # type promotion computes in the gradient's float32 (or wider) without a widened copy
    # of `a`; for p = 2 a single full-size product (the small (B, *S) side is scaled)
    if p == 2:
        ga = a * (2.0 * grad).unsqueeze(1)
    elif p == 1:
        ga = a.sign() * grad.unsqueeze(1)
    else:
        af = at_least_float32(a)
        ga = grad.unsqueeze(1) * (p * af.abs().pow(p - 1) * af.sign())
    return ga.to(a.dtype)


class _AbsPowSum(torch.autograd.Function):
    """``sum_c |a_c|^p`` in float32 or wider, saving only ``a`` for backward.

    Written with ``setup_context`` so that ``torch.func`` transforms can differentiate it, and
    used there and under ``torch.compile``; elsewhere :class:`_AbsPowSumEager` runs, since
    ``Function.apply`` binds a ``setup_context`` function's arguments with
    ``inspect.signature`` at every call (about 0.08 ms a call on CPU, 6 calls a step).
    """

    @staticmethod
    def forward(a: Tensor, p: float) -> Tensor:
        return _abs_pow_sum_forward(a, p)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor, float], output: Tensor) -> None:
        a, p = inputs
        ctx.save_for_backward(a)
        ctx.p = p

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None]:
        (a,) = ctx.saved_tensors
        return _abs_pow_sum_backward(a, ctx.p, grad), None


class _AbsPowSumEager(torch.autograd.Function):
    """:class:`_AbsPowSum` in the classic form (``forward(ctx, ...)``): no argument binding."""

    @staticmethod
    def forward(ctx: Any, a: Tensor, p: float) -> Tensor:
        ctx.save_for_backward(a)
        ctx.p = p
        return _abs_pow_sum_forward(a, p)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None]:
        (a,) = ctx.saved_tensors
        return _abs_pow_sum_backward(a, ctx.p, grad), None


def abs_pow_sum(features: Tensor, p: float = 2.0) -> Tensor:
    """``sum over channels of |features|^p`` in float32 or wider, memory-lean in backward.

    Args:
        features: A ``(B, C, *S)`` tensor of any floating dtype (``S``: one to three spatial
            dimensions).
        p: The exponent, ``p >= 1``.

    Returns:
        A ``(B, *S)`` tensor, float32 (float64 for float64 input).

    Example:
        ```python
        import torch
        from athooks.mappings import abs_pow_sum

        x = torch.randn(2, 3, 4, 4)
        assert torch.allclose(abs_pow_sum(x, 2), x.pow(2).sum(1))
        video = torch.randn(2, 3, 5, 4, 4)  # (B, C, T, H, W) -> (B, T, H, W)
        assert abs_pow_sum(video, 2).shape == (2, 5, 4, 4)
        ```
    """
    if torch.compiler.is_compiling() or functorch_active():
        out: Tensor = _AbsPowSum.apply(features, float(p))
    elif not (torch.is_grad_enabled() and features.requires_grad):
        out = _abs_pow_sum_forward(features, float(p))  # nothing to differentiate
    elif p in (1, 2) and features.dtype in _WIDE and features.numel() <= _SMALL:
        # autograd's own ops: they save only `features` too (square and abs save their
        # input), and for a small map cost less than the Python calls of a Function
        out = _abs_pow_sum_forward(features, float(p))
    else:
        out = _AbsPowSumEager.apply(features, float(p))
    return out


# below this many elements, the extra full-size pass of autograd's backward of square/abs
# (0.3 ns an element on a 2026 CPU core) costs less than a Function's forward and backward
# Python calls (0.3 ms a step on WRN-16 at batch 2 in an interleaved ablation; the Performance
# page, "Fewer Python calls per step")
_SMALL = 1 << 17


def _check_p(p: Any, name: str) -> float:
    return check_real(
        p,
        owner=name,
        option="p",
        minimum=1.0,
        reason=" (|A|^p is not differentiable at 0 for p < 1)",
    )


class Sum(Mapping):
    """``F_sum(A) = sum_c |A_c|`` (paper section 3.1), for ``(B, C, *S) -> (B, *S)``.

    Example:
        ```python
        import torch
        import athooks

        amap = athooks.mapping("sum")(torch.randn(2, 16, 8, 8))
        assert amap.shape == (2, 8, 8)
        assert athooks.mapping("sum")(torch.randn(2, 16, 32)).shape == (2, 32)  # 1-D
        ```
    """

    name = "sum"

    def forward(self, features: Tensor) -> Tensor:
        """Sum of absolute values over channels."""
        return abs_pow_sum(features, 1.0)


class _PowerMapping(Mapping):
    """A mapping with an exponent ``p >= 1``."""

    def __init__(self, p: float = 2.0) -> None:
        super().__init__()
        self.p = _check_p(p, self.name)

    def extra_repr(self) -> str:
        """The exponent, for ``repr``."""
        return f"p={self.p:g}"


class SumP(_PowerMapping):
    """``F_sum^p(A) = sum_c |A_c|^p`` (paper section 3.1); ``p = 2`` is the paper's default.

    Any layout ``(B, C, *S) -> (B, *S)``: 1-D signals, images, videos.

    Args:
        p: The exponent (``p >= 1``; the paper uses 1, 2 and 4).

    Example:
        ```python
        import torch
        import athooks

        f = torch.randn(2, 16, 8, 8)
        assert torch.allclose(athooks.mapping("sum_p", p=4)(f), f.abs().pow(4).sum(1))
        ```
    """

    name = "sum_p"

    def forward(self, features: Tensor) -> Tensor:
        """Sum of ``|A_c|^p`` over channels."""
        return abs_pow_sum(features, self.p)


class MaxP(_PowerMapping):
    """``F_max^p(A) = max_c |A_c|^p`` (paper section 3.1), for ``(B, C, *S) -> (B, *S)``.

    The maximum of ``|A_c|`` is taken as ``max(max_c A_c, -min_c A_c)`` so that no full-size
    ``|A|`` tensor is kept for backward.

    Args:
        p: The exponent (``p >= 1``).

    Example:
        ```python
        import torch
        import athooks

        f = torch.randn(2, 16, 8, 8)
        assert torch.allclose(athooks.mapping("max_p", p=2)(f), f.abs().amax(1).pow(2))
        video = torch.randn(2, 16, 3, 8, 8)
        assert athooks.mapping("max_p")(video).shape == (2, 3, 8, 8)
        ```
    """

    name = "max_p"

    def forward(self, features: Tensor) -> Tensor:
        """Largest ``|A_c|^p`` over channels."""
        top = torch.maximum(features.amax(dim=1), features.amin(dim=1).neg())
        return at_least_float32(top).pow(self.p)


class Features(Mapping):
    """The feature map itself, kept whole at capture (for losses such as F-ActT).

    Not an attention map: :meth:`athooks.plugin.Step.features` returns what it keeps, the
    ``(B, C, *S)`` tensor of any layout.
    """

    name = "features"
    is_attention_map = False

    def forward(self, features: Tensor) -> Tensor:
        """Return the features unchanged."""
        return features


class Embedding(Mapping):
    """A vector per sample, ``(B, D)``: the pre-logit features (for losses on embeddings).

    A ``(B, D)`` tensor is kept as it is, and a ``(B, C, 1, ..., 1)`` one (a pooled feature map)
    flattened to ``(B, C)``; anything with a spatial extent is refused.

    Example:
        ```python
        import torch
        from athooks.mappings import Embedding

        assert Embedding()(torch.randn(2, 8, 1, 1)).shape == (2, 8)
        ```
    """

    name = "embedding"
    is_attention_map = False

    def forward(self, features: Tensor) -> Tensor:
        """The ``(B, D)`` vector."""
        if features.dim() == 2:
            return features
        if features.dim() > 2 and features.shape[2:].numel() == 1:
            return features.flatten(1)
        raise CaptureError(
            f"the embedding layer gives a tensor of shape {tuple(features.shape)}, but losses on "
            "embeddings need one vector per sample (B, D), the pre-logit features; name the "
            "layer after the pooling (Distiller(..., embedding=Layer(name)), e.g. the "
            "classifier's input: Layer('fc', of='input')), or give it a transform that pools"
        )


class FunctionMapping(Mapping):
    """Wraps a plain callable ``(B, C, *S) -> (B, *S)`` as a :class:`Mapping`.

    The callable sees every layout the tapped layers produce (``(B, C, T)``, ``(B, C, H, W)``,
    ``(B, C, T, H, W)``); its output is checked against ``(B, *S)`` at capture.

    Args:
        fn: The callable.
        name: Its display name (defaults to the callable's ``__name__``).

    Example:
        ```python
        import torch
        from athooks.mappings import FunctionMapping

        m = FunctionMapping(lambda f: f.mean(1), name="mean")
        assert m(torch.ones(1, 3, 2, 2)).shape == (1, 2, 2)
        assert m(torch.ones(1, 3, 7)).shape == (1, 7)
        ```
    """

    def __init__(self, fn: Callable[[Tensor], Tensor], name: str | None = None) -> None:
        super().__init__()
        self.fn = fn
        self.name = str(name or getattr(fn, "__name__", type(fn).__name__))

    def forward(self, features: Tensor) -> Tensor:
        """Call the wrapped function."""
        return self.fn(features)


def as_mapping(mapping: Any, **options: Any) -> Mapping:
    """Turn a name, a :class:`Mapping` or a callable into a :class:`Mapping`.

    Args:
        mapping: A registered name (``"sum_p"``), a mapping object, or a callable
            ``(B, C, *S) -> (B, *S)``.
        **options: Options for a named mapping (e.g. ``p=4``); not allowed with an object.

    Returns:
        A mapping module.

    Raises:
        ConfigurationError: If options are given with an object, or the argument is not usable.

    Example:
        ```python
        from athooks.mappings import as_mapping

        print(as_mapping("max_p", p=4))  # max_p(p=4)
        ```
    """
    if isinstance(mapping, str):
        named: Mapping = _named_mapping(mapping, **options)
        return named
    if options:
        raise ConfigurationError(
            f"mapping options {sorted(options)} were given with a mapping object {mapping!r}; "
            "options only apply to a mapping given by name, e.g. mapping='sum_p', p=4"
        )
    if isinstance(mapping, Mapping):
        return mapping
    if isinstance(mapping, nn.Module) or callable(mapping):
        if isinstance(mapping, nn.Module):
            wrapped = FunctionMapping(mapping, name=type(mapping).__name__)
        else:
            wrapped = FunctionMapping(mapping)
        return wrapped
    raise ConfigurationError(
        f"mapping must be a registered name (see athooks.list_mappings()), an athooks Mapping, "
        f"or a callable (B, C, *S) -> (B, *S); got {type(mapping).__name__}: {mapping!r}"
    )


#: The layouts a mapping accepts, by the number of spatial dimensions, for messages.
LAYOUTS = "(B, C, T) for a 1-D signal, (B, C, H, W) for an image, (B, C, T, H, W) for a video"


def apply_mapping(mapping: Mapping, features: Tensor, where: str) -> Tensor:
    """Apply ``mapping`` to a captured feature map, checking input and output shapes.

    A feature map is ``(B, C, *S)`` with one to three spatial dimensions ``S``: ``(B, C, T)``
    (a 1-D signal, or a token sequence turned channels-first by a transform), ``(B, C, H, W)``
    (an image), ``(B, C, T, H, W)`` (a video). An attention map is ``(B, *S)``.

    Args:
        mapping: The mapping.
        features: The captured tensor.
        where: A description of the layer for error messages.

    Returns:
        The ``(B, *S)`` attention map.

    Raises:
        CaptureError: If the feature map has fewer than 3 or more than 5 dimensions, or the
            mapping returns a wrong shape/dtype.

    Example:
        ```python
        import torch
        import athooks
        from athooks.mappings import apply_mapping

        sum_p = athooks.mapping("sum_p")
        video = torch.randn(2, 8, 4, 6, 6)  # (B, C, T, H, W)
        assert apply_mapping(sum_p, video, "layer 'x'").shape == (2, 4, 6, 6)
        ```
    """
    if not mapping.is_attention_map and features.dim() >= 2:
        kept: Tensor = mapping(features)
        return kept
    if not 3 <= features.dim() <= 5:
        kind = (
            "a vector per sample, with no spatial dimension left (a pooled or linear output)"
            if features.dim() == 2
            else f"a {features.dim()}-D tensor"
        )
        raise CaptureError(
            f"{where} produced a tensor of shape {tuple(features.shape)}, {kind}; attention "
            f"mappings need a feature map (B, C, *S) with 1 to 3 spatial dimensions: {LAYOUTS}. "
            "Tap a layer before the pooling, or give the layer a transform, e.g. "
            "athooks.Layer(name, transform=lambda t: ...) that returns one of these layouts"
        )
    out = mapping(features)
    expected = (features.shape[0], *features.shape[2:])
    if not isinstance(out, Tensor) or tuple(out.shape) != expected or not out.is_floating_point():
        got = (
            f"{out.dtype} tensor of shape {tuple(out.shape)}"
            if isinstance(out, Tensor)
            else type(out).__name__
        )
        source = f" (from {mapping.provider})" if mapping.provider else ""
        raise CaptureError(
            f"mapping {getattr(mapping, 'name', mapping)!r}{source} returned a {got} for "
            f"{where}; a mapping must return a floating tensor of shape (B, *S) = "
            f"{tuple(expected)} for a feature map (B, C, *S) of shape {tuple(features.shape)}"
        )
    return out


def mapping(name: str, **options: Any) -> Mapping:
    """A configured attention mapping, by registry name.

    The result is an :class:`athooks.plugin.Mapping` (an ``nn.Module``) that turns a
    ``(B, C, *S)`` tensor into a ``(B, *S)`` attention map (``S``: one to three spatial
    dimensions).

    Args:
        name: A registered mapping name (``athooks.list_mappings()``).
        **options: The mapping's options, e.g. ``p=4``.

    Returns:
        The mapping.

    Raises:
        UnknownNameError: If no plugin registers ``name``.
        ConfigurationError: If an option is not accepted.
        PluginError: If the plugin's factory fails or builds something that is not callable.

    Example:
        ```python
        import torch
        import athooks

        amap = athooks.mapping("sum_p", p=4)(torch.randn(2, 64, 8, 8))
        assert amap.shape == (2, 8, 8)
        ```
    """
    made, provider = build("mapping", name, options)
    if isinstance(made, Mapping):
        obj: Mapping = made
    elif callable(made):
        obj = FunctionMapping(made, name=name)
    else:
        raise PluginError(
            f"mapping {name!r} from {provider} built a {type(made).__name__}, which is not "
            "callable; a mapping factory must return an athooks.plugin.Mapping or a "
            "callable (B, C, *S) -> (B, *S)"
        )
    obj.name = name
    obj.provider = provider
    return obj


_named_mapping = mapping  # as_mapping's own argument is called `mapping`
