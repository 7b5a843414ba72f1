"""The LTPA head: Learn To Pay Attention (Jetley et al., ICLR 2018) attached to any CNN.

The paper's attention module, in its notation (section 3 of the paper; the facts athooks follows
are summarised in ``shared/reference/attention-transfer.md``, "Learn To Pay Attention"):

* local features ``l_i`` (one ``C``-vector per spatial position ``i``) from intermediate layers,
  captured here by PyTorch forward hooks on the layers you name (athooks layer patterns);
* a global descriptor ``g`` from the end of the network, here the input of the model's final
  ``nn.Linear`` (its classifier), found by a forward pre-hook, or the output of a module you name;
* where ``l`` and ``g`` differ in channels, one side is projected: by default ``l`` to the width
  of ``g`` with a 1x1 convolution without bias (``project="local"``), or ``g`` to the width of
  ``l`` with a linear map without bias (``project="global"``);
* a compatibility score per position: ``"pc"`` (parametrised) ``c_i = <u, l_i + g>`` with ``u`` a
  learned 1x1 convolution to one channel, one ``u`` per layer; ``"dp"`` (dot product)
  ``c_i = <l_i, g>``;
* scores normalised over the positions of each image: ``"softmax"`` (the paper's main choice, the
  weights sum to one) or ``"sigmoid"`` (the variant; each weight in ``(0, 1)`` on its own);
* the attention-weighted descriptor ``g_a = sum_i a_i l_i`` replaces ``g`` for classification. With
  ``"sigmoid"`` the weights do not sum to one, and the reference file is silent on the
  normalisation: athooks-ltpa averages instead of summing (``g_a = mean_i a_i l_i``), as the
  widely used PyTorch re-implementation does, so that ``g_a`` does not grow with the number of
  positions;
* with several layers, the ``g_a`` of all layers are concatenated and classified by one linear
  layer (the paper's "concat"), or (``independent=True``) each ``g_a`` has its own linear
  classifier and their scores (logits) are averaged.

The head is an ``nn.Module`` that owns the model: ``head.parameters()`` are the model's and the
attention module's, ``head(x)`` runs the model (its own classifier's output is not used) and
returns the head's logits. The attention is computed inside the model's forward, when ``g`` is
reached, so ``head.attention_maps`` is up to date after any forward of the model.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from athooks import CaptureError, ConfigurationError, Layer, LayerResolutionError
from athooks.discovery import default_input_size, probe
from athooks.layers import match_modules
from athooks.taps import select_tensor

__all__ = ["LTPAHead", "LTPALayer", "attach"]

Compatibility = Literal["pc", "dp"]
Normalise = Literal["softmax", "sigmoid"]
Project = Literal["local", "global"]

TAG = "_athooks_ltpa"  # the attribute the head's Layer transforms set on a tagged feature map


@dataclass(frozen=True)
class LTPALayer:
    """One local-feature layer of an :class:`LTPAHead`.

    Attributes:
        name: The module's name in the model (as ``model.named_modules()`` gives it).
        channels: Channels ``C`` of its feature map.
        layer: The :class:`athooks.Layer` (pattern, ``select``, ``transform``) the head reads it by.
    """

    name: str
    channels: int
    layer: Layer


class _Tag:
    """A Layer transform that marks a feature map as the head's local features of one layer.

    The ``ltpa`` mapping reads the mark to know which head and layer a feature map belongs to.
    The mark is put on a view of the tensor (no copy), never on the model's own output.
    """

    def __init__(self, head: LTPAHead, index: int, inner: Any) -> None:
        self.head_ref = weakref.ref(head)
        self.index = index
        self.inner = inner

    def __call__(self, features: Tensor) -> Tensor:
        if self.inner is not None:
            features = self.inner(features)
        view = features.view_as(features)
        setattr(view, TAG, (self.head_ref, self.index))
        return view

    def __repr__(self) -> str:
        return f"ltpa_tag(layer={self.index})"


class _LocalHook:
    """Forward hook on a local-feature layer: keeps its (selected, transformed) output."""

    def __init__(self, head: LTPAHead, index: int) -> None:
        self.head = head
        self.index = index

    def __call__(self, module: nn.Module, args: Any, output: Any) -> None:
        self.head._on_local(self.index, output)


class _GlobalPreHook:
    """Forward pre-hook on the classifier: its input is ``g``; the attention is computed then."""

    def __init__(self, head: LTPAHead) -> None:
        self.head = head

    def __call__(self, module: nn.Module, args: Any) -> None:
        if not args or not isinstance(args[0], Tensor):
            raise CaptureError(
                f"ltpa: the classifier {self.head.global_name!r} was called without a tensor "
                "input, so the global descriptor g cannot be read; name the module whose output "
                "is g with attach(..., global_layer=...)"
            )
        self.head._on_global(args[0])


class _GlobalHook:
    """Forward hook on a user-named module: its output is ``g`` (pooled if it is a map)."""

    def __init__(self, head: LTPAHead) -> None:
        self.head = head

    def __call__(self, module: nn.Module, args: Any, output: Any) -> None:
        layer = self.head._global_layer
        assert layer is not None
        g = select_tensor(output, layer.select, f"global layer {self.head.global_name!r}")
        if layer.transform is not None:
            g = layer.transform(g)
        self.head._on_global(g)


class _RunState:
    """What one forward of the model left in the head: not part of a copy or a pickle.

    A deep copy of the head (an EMA copy) or an unpickled head starts empty; the tensors of the
    last forward belong to the original's autograd graph.
    """

    def __init__(self, n: int) -> None:
        self.n = n
        self.local: list[Tensor | None] = [None] * n
        self.versions: list[int] = [0] * n
        self.maps: dict[str, Tensor] = {}
        self.descriptors: list[Tensor] | None = None
        self.pending: list[tuple[int, Tensor]] = []

    def reset_locals(self) -> None:
        self.local = [None] * self.n

    def __deepcopy__(self, memo: dict[int, Any]) -> _RunState:
        return _RunState(self.n)

    def __reduce__(self) -> tuple[type, tuple[int]]:
        return (_RunState, (self.n,))


class LTPAHead(nn.Module):
    """Learn To Pay Attention on top of ``model``: classify from attention-weighted local features.

    Build it with :func:`attach`; see the module docs for the formulas.

    Attributes:
        model: The model it is attached to (a submodule: its parameters are the head's too).
        local_layers: The :class:`LTPALayer` of each local-feature layer, in forward order.
        global_name: The module ``g`` comes from (the classifier whose input is ``g``, or the
            module named by ``global_layer``).
        global_dim: The width ``D`` of ``g``.
        compatibility: ``"pc"`` or ``"dp"``.
        normalise: ``"softmax"`` or ``"sigmoid"``.
        project: ``"local"`` or ``"global"``: which side is projected when widths differ.
        independent: Whether each layer has its own classifier (scores averaged).
        projections: The 1x1 convolutions (``"local"``) or linear maps (``"global"``), keyed
            by layer position as a string; only for layers whose width differs from ``D``.
        u: ``"pc"`` only: the 1x1 convolutions to one channel, one per layer.
        classifier: The linear classifier of the concatenated ``g_a`` (``independent=False``).
        classifiers: One linear classifier per layer (``independent=True``).
    """

    def __init__(
        self,
        model: nn.Module,
        local_layers: Sequence[LTPALayer],
        *,
        global_name: str,
        global_module: nn.Module,
        global_dim: int,
        global_layer: Layer | None,
        num_classes: int,
        compatibility: Compatibility = "pc",
        normalise: Normalise = "softmax",
        project: Project = "local",
        independent: bool = False,
        copy: Sequence[str] = (),
    ) -> None:
        super().__init__()
        self.model = model
        self.local_layers = tuple(local_layers)
        self.global_name = global_name
        self.global_dim = int(global_dim)
        self._global_layer = global_layer
        self.compatibility: Compatibility = compatibility
        self.normalise: Normalise = normalise
        self.project: Project = project
        self.independent = bool(independent)
        self.num_classes = int(num_classes)

        ref = next((p for p in model.parameters() if p.is_floating_point()), None)
        factory: dict[str, Any] = {}
        if ref is not None:
            factory = {"device": ref.device, "dtype": ref.dtype}
        d = self.global_dim
        self.projections = nn.ModuleDict()
        dims: list[int] = []
        for k, spec in enumerate(self.local_layers):
            if spec.channels == d:
                dims.append(d)
                continue
            if project == "local":
                self.projections[str(k)] = nn.Conv2d(spec.channels, d, 1, bias=False, **factory)
                dims.append(d)
            else:
                self.projections[str(k)] = nn.Linear(d, spec.channels, bias=False, **factory)
                dims.append(spec.channels)
        self.dims = tuple(dims)
        self.u = nn.ModuleList(
            [nn.Conv2d(dim, 1, 1, bias=False, **factory) for dim in dims]
            if compatibility == "pc"
            else []
        )
        if independent:
            self.classifier = None
            self.classifiers = nn.ModuleList(
                [nn.Linear(dim, num_classes, **factory) for dim in dims]
            )
        else:
            self.classifier = nn.Linear(sum(dims), num_classes, **factory)
            self.classifiers = None

        self._copy = [spec.name in set(copy) for spec in self.local_layers]
        self._run = _RunState(len(self.local_layers))
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        for k, spec in enumerate(self.local_layers):
            module = model.get_submodule(spec.name)
            self._handles.append(module.register_forward_hook(_LocalHook(self, k)))
        if global_layer is None:
            self._handles.append(global_module.register_forward_pre_hook(_GlobalPreHook(self)))
        else:
            self._handles.append(global_module.register_forward_hook(_GlobalHook(self)))

    # ------------------------------------------------------------------ public

    @property
    def attention_maps(self) -> dict[str, Tensor]:
        """The attention ``a`` of each local layer in the last forward, ``{name: (B, H, W)}``.

        After normalisation: with ``"softmax"`` each map sums to one over its positions. The maps
        keep their autograd graph (they are what ``g_a`` was computed from).

        Raises:
            CaptureError: Before the first forward.
        """
        if not self._run.maps:
            raise CaptureError(
                "head.attention_maps is empty: run the model (head(x)) first; the maps are those "
                "of the last forward"
            )
        return dict(self._run.maps)

    @property
    def descriptors(self) -> list[Tensor]:
        """The attention-weighted descriptors ``g_a`` of the last forward, ``(B, D_k)`` each."""
        if self._run.descriptors is None:
            raise CaptureError("head.descriptors is empty: run the model (head(x)) first")
        return list(self._run.descriptors)

    @property
    def layers(self) -> list[Layer]:
        """The local layers as :class:`athooks.Layer` objects naming modules of the *head*.

        Use them to tap the head with athooks (the names start with ``model.``, the head's
        attribute holding the model): with the ``ltpa`` mapping they give the head's own
        attention maps, e.g. as the teacher's layers of a :class:`athooks.Distiller`.
        """
        out = []
        for k, spec in enumerate(self.local_layers):
            inner = spec.layer
            tag = _Tag(self, k, inner.transform)
            out.append(Layer(f"model.{spec.name}", select=inner.select, transform=tag))
        return out

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        """Run the model on the inputs and classify from the attention-weighted descriptors.

        Args:
            *args: The model's inputs.
            **kwargs: The model's keyword inputs.

        Returns:
            Logits ``(B, num_classes)``.
        """
        self._run.descriptors = None
        self.model(*args, **kwargs)
        descriptors = self._run.descriptors
        if descriptors is None:
            raise CaptureError(
                f"ltpa: the model's forward did not reach {self.global_name!r}, where the global "
                "descriptor g is read, so no attention was computed. Name the module whose output "
                "is g with attach(..., global_layer=...)"
            )
        if self.classifiers is not None:
            scores = [clf(gk) for clf, gk in zip(self.classifiers, descriptors, strict=True)]
            return torch.stack(scores).mean(dim=0)
        assert self.classifier is not None
        logits: Tensor = self.classifier(torch.cat(descriptors, dim=1))
        return logits

    def remove(self) -> None:
        """Remove the head's hooks from the model (the model then works as before)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._run.reset_locals()
        self._run.pending.clear()

    def extra_repr(self) -> str:
        """The configuration, for ``repr``."""
        names = ", ".join(s.name for s in self.local_layers)
        return (
            f"layers=[{names}], global={self.global_name!r} (D={self.global_dim}), "
            f"compatibility={self.compatibility!r}, normalise={self.normalise!r}, "
            f"project={self.project!r}, independent={self.independent}"
        )

    # ------------------------------------------------------------------ the attention

    def projected(
        self, index: int, local: Tensor, g: Tensor | None
    ) -> tuple[Tensor, Tensor | None]:
        """``(l, g)`` of layer ``index`` in a common width (the projection where widths differ).

        Args:
            index: The layer's position in :attr:`local_layers`.
            local: Its feature map ``(B, C, H, W)``.
            g: The global descriptor ``(B, D)``, or ``None``.

        Returns:
            The projected local features and global descriptor (``None`` if ``g`` was).
        """
        key = str(index)
        if key not in self.projections:
            return local, g
        proj = self.projections[key]
        if self.project == "local":
            return proj(local), g
        return local, (proj(g) if g is not None else None)

    def scores(self, index: int, local: Tensor, g: Tensor) -> Tensor:
        """The compatibility scores ``c`` of layer ``index``, ``(B, H, W)``.

        Args:
            index: The layer's position.
            local: The projected local features ``(B, D_k, H, W)``.
            g: The projected global descriptor ``(B, D_k)``.

        Returns:
            ``<u, l_i + g>`` (``"pc"``) or ``<l_i, g>`` (``"dp"``) at every position.
        """
        gg = g[:, :, None, None].to(local.dtype)
        if self.compatibility == "pc":
            out: Tensor = self.u[index](local + gg).squeeze(1)
            return out
        return (local * gg).sum(dim=1)

    def normalised(self, scores: Tensor) -> Tensor:
        """Softmax over the positions of each image, or an elementwise sigmoid.

        Args:
            scores: ``(B, H, W)``.

        Returns:
            The attention ``a``, ``(B, H, W)``.
        """
        if self.normalise == "softmax":
            b, h, w = scores.shape
            return torch.softmax(scores.reshape(b, h * w), dim=1).reshape(b, h, w)
        return torch.sigmoid(scores)

    def pooled(self, attention: Tensor, local: Tensor) -> Tensor:
        """``g_a``: ``sum_i a_i l_i`` (softmax) or ``mean_i a_i l_i`` (sigmoid), ``(B, D_k)``."""
        weighted = attention.unsqueeze(1).to(local.dtype) * local
        if self.normalise == "softmax":
            return weighted.sum(dim=(2, 3))
        return weighted.mean(dim=(2, 3))

    def map_of(self, index: int, features: Tensor) -> Tensor:
        """The attention map of layer ``index`` for ``features``, as the ``ltpa`` mapping gives it.

        With ``"pc"`` and ``"softmax"`` it is computed from ``features`` alone, exactly:
        ``<u, l_i + g> = <u, l_i> + <u, g>``, and the second term is the same at every position,
        so it cancels in the softmax over positions. Otherwise the map needs ``g``, which the
        model computes later in the same forward: a placeholder (NaN) is returned and filled in
        place when the head computes its attention (when ``g`` is reached).

        Args:
            index: The layer's position in :attr:`local_layers`.
            features: Its feature map ``(B, C, H, W)``, as the layer produced it.

        Returns:
            ``(B, H, W)``.
        """
        if features.dim() != 4:
            raise CaptureError(
                f"ltpa: the head's local layer {self.local_layers[index].name!r} gave a tensor of "
                f"shape {tuple(features.shape)}; LTPA heads work on image feature maps "
                "(B, C, H, W) only (1-D signals and videos are not supported). Give the layer a "
                "transform that returns (B, C, H, W), or use another mapping (fallback='sum_p')"
            )
        if self.compatibility == "pc" and self.normalise == "softmax":
            local, _ = self.projected(index, features, None)
            b, _, h, w = local.shape
            c = self.u[index](local).reshape(b, h * w)
            return torch.softmax(c, dim=1).reshape(b, h, w)
        b, _, h, w = features.shape
        dtype = torch.promote_types(features.dtype, torch.float32)
        placeholder = torch.full((b, h, w), float("nan"), dtype=dtype, device=features.device)
        self._run.pending.append((index, placeholder))
        return placeholder

    # ------------------------------------------------------------------ hook callbacks

    def _on_local(self, index: int, output: Any) -> None:
        spec = self.local_layers[index]
        where = f"ltpa local layer {spec.name!r}"
        features = select_tensor(output, spec.layer.select, where)
        if spec.layer.transform is not None:
            features = spec.layer.transform(features)
        if features.dim() != 4:
            raise CaptureError(
                f"{where} produced a tensor of shape {tuple(features.shape)}; local features "
                "must be a feature map (B, C, H, W). Name a convolutional layer, or give "
                "athooks.Layer(name, transform=...) that returns (B, C, H, W)"
            )
        # a placeholder of this layer still waiting is from a forward that never reached g
        self._run.pending = [(k, p) for k, p in self._run.pending if k != index]
        if self._copy[index]:  # the model overwrites this output in place later
            features = features.clone()
        self._run.local[index] = features
        self._run.versions[index] = features._version

    def _on_global(self, g: Tensor) -> None:
        g = _as_descriptor(g)
        if g.dim() != 2 or g.shape[1] != self.global_dim:
            raise CaptureError(
                f"ltpa: the global descriptor from {self.global_name!r} has shape "
                f"{tuple(g.shape)}, expected (B, {self.global_dim}) as when the head was "
                "attached; name the module whose output is g with attach(..., global_layer=...)"
            )
        missing = [
            s.name for s, v in zip(self.local_layers, self._run.local, strict=True) if v is None
        ]
        if missing:
            raise CaptureError(
                f"ltpa: local layers {missing} did not run before the global descriptor was "
                f"reached at {self.global_name!r}; local layers must come before g in the forward"
            )
        for k, (spec, kept, version) in enumerate(
            zip(self.local_layers, self._run.local, self._run.versions, strict=True)
        ):
            assert kept is not None
            if kept._version != version:
                self._copy[k] = True
                self._run.reset_locals()
                raise CaptureError(
                    f"ltpa: the output of local layer {spec.name!r} was overwritten in place "
                    "before g was reached (e.g. by ReLU(inplace=True) or dropout in training "
                    "mode), which it was not when the head was attached (in eval mode). The head "
                    "copies it from the next forward on: run this step again"
                )
        maps: dict[str, Tensor] = {}
        descriptors: list[Tensor] = []
        for k, spec in enumerate(self.local_layers):
            raw = self._run.local[k]
            assert raw is not None
            local, gk = self.projected(k, raw, g)
            assert gk is not None
            attention = self.normalised(self.scores(k, local, gk))
            maps[spec.name] = attention
            descriptors.append(self.pooled(attention, local))
        self._run.reset_locals()
        self._run.maps = maps
        self._run.descriptors = descriptors
        pending, self._run.pending = self._run.pending, []
        for k, placeholder in pending:
            a = maps[self.local_layers[k].name]
            if a.shape == placeholder.shape:
                placeholder.copy_(a)


def _as_layer(spec: Any, where: str) -> Layer:
    if isinstance(spec, Layer):
        return spec
    if isinstance(spec, str):
        return Layer(spec)
    raise ConfigurationError(
        f"{where}: expected a layer name, a pattern or athooks.Layer, got "
        f"{type(spec).__name__}: {spec!r}"
    )


def _auto_layers(model: nn.Module, infos: Sequence[Any], before: int, count: int) -> list[Any]:
    """The last ``count`` stage outputs that run before order ``before`` (see :func:`attach`)."""
    from athooks.discovery import stage_layers

    usable = [
        i for i in infos if i.map_shape is not None and i.stride is not None and i.order < before
    ]
    # a map of smaller stride than one that ran before it is an upsampling (VGG's adaptive pool
    # turning 1x1 into 7x7 at 32 px), not a stage: drop those before choosing per stride
    deepest, encoder = 0, []
    for info in sorted(usable, key=lambda i: i.order):
        if info.stride >= deepest:
            encoder.append(info)
            deepest = info.stride
    usable = sorted(encoder, key=lambda i: i.order)
    if getattr(model, "feature_info", None):
        stages = [i for i in stage_layers(model, infos=usable) if i.order < before]
    else:  # per stride, the last module of the shallowest level (no container preference)
        chosen: dict[int, Any] = {}
        for info in usable:
            best = chosen.get(info.stride)
            if best is None or (info.depth, -info.order) < (best.depth, -best.order):
                chosen[info.stride] = info
        stages = list(chosen.values())
    stages.sort(key=lambda i: i.order)
    kept: list[Any] = []
    for info in stages:  # drop layers that upsample (adaptive pooling after small maps)
        if kept and info.stride < kept[-1].stride:
            continue
        kept.append(info)
    return kept[-count:]


def attach(
    model: nn.Module,
    layers: Any = "auto",
    *,
    compatibility: Compatibility = "pc",
    normalise: Normalise = "softmax",
    num_classes: int | None = None,
    independent: bool = False,
    global_layer: str | Layer | None = None,
    project: Project = "local",
    input_size: Sequence[int] | None = None,
) -> LTPAHead:
    """Attach Learn To Pay Attention to ``model``; returns the head (an ``nn.Module``).

    ``head(x)`` returns the logits of the attention-weighted descriptors; ``head.attention_maps``
    the attention of each local layer, ``{name: (B, H, W)}``. Train ``head.parameters()`` (the
    model's and the attention module's). The model's own classifier still runs but its output is
    not used: under DistributedDataParallel use ``find_unused_parameters=True``.

    Args:
        model: Any CNN (timm, torchvision, your own), not wrapped (attach before DDP or
            ``torch.compile``).
        layers: The local-feature layers: ``"auto"`` (the last three stage outputs, one per
            stride, that run before ``g``: the paper's three-layer "att3" layout; timm models
            use their ``feature_info``), or a name, pattern, :class:`athooks.Layer`, or a list
            of them (athooks pattern syntax: ``"layer[234]"``, ``"features.**"``, ``"re:..."``).
        compatibility: ``"pc"`` (``<u, l_i + g>``, u learned) or ``"dp"`` (``<l_i, g>``).
        normalise: ``"softmax"`` over positions, or ``"sigmoid"``.
        num_classes: Outputs of the head's classifier; default: the ``out_features`` of the
            model's last ``nn.Linear``.
        independent: One classifier per layer, scores averaged, instead of one classifier of
            the concatenated descriptors.
        global_layer: The module whose output is ``g`` (a name or :class:`athooks.Layer`; a
            feature map is average-pooled, anything else flattened). Default: the input of the
            last ``nn.Linear`` the model runs (its classifier), which is what timm's
            ``forward_head(pre_logits=True)`` returns and torchvision's penultimate features.
        project: When a layer's width differs from ``g``'s: ``"local"`` projects ``l`` to ``g``'s
            width (1x1 convolution), ``"global"`` projects ``g`` to ``l``'s (linear).
        input_size: ``(C, H, W)`` of the dummy input used to find layers and widths; default:
            the model's own (224x224 for most). Give your data's size when the layer layout
            depends on it (small inputs through a VGG, for instance).

    Returns:
        The :class:`LTPAHead`.

    Raises:
        ConfigurationError: For invalid options, layers that do not give feature maps, local
            layers that run after ``g``, or no way to find ``g``.

    Example:
        ```python
        import timm
        import torch
        import athooks_ltpa

        model = timm.create_model("resnet18", pretrained=False, num_classes=10)
        head = athooks_ltpa.attach(model, input_size=(3, 64, 64))
        logits = head(torch.randn(2, 3, 64, 64))
        print(logits.shape, {k: tuple(v.shape) for k, v in head.attention_maps.items()})
        ```
    """
    if compatibility not in ("pc", "dp"):
        raise ConfigurationError(
            f"ltpa: compatibility must be 'pc' (<u, l + g>, u learned) or 'dp' (<l, g>), "
            f"got {compatibility!r}"
        )
    if normalise not in ("softmax", "sigmoid"):
        raise ConfigurationError(
            f"ltpa: normalise must be 'softmax' or 'sigmoid', got {normalise!r}"
        )
    if project not in ("local", "global"):
        raise ConfigurationError(
            f"ltpa: project must be 'local' (l to g's width) or 'global' (g to l's width), "
            f"got {project!r}"
        )
    if num_classes is not None and (
        isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1
    ):
        raise ConfigurationError(f"ltpa: num_classes must be a positive int, got {num_classes!r}")
    if isinstance(model, LTPAHead):
        raise ConfigurationError(
            "ltpa: this model is already an LTPA head; attach to the backbone (head.model)"
        )
    size = tuple(int(s) for s in (input_size or default_input_size(model)))
    infos = probe(model, size)

    # where g comes from
    glayer: Layer | None = None
    if global_layer is None:
        linears = [i for i in infos if isinstance(model.get_submodule(i.name), nn.Linear)]
        if not linears:
            raise ConfigurationError(
                "ltpa: the model runs no nn.Linear (a classifier) whose input could serve as the "
                "global descriptor g; name the module whose output is g with "
                "attach(..., global_layer='name')"
            )
        last = max(linears, key=lambda i: i.order)
        global_name, global_order = last.name, last.order
        global_module = model.get_submodule(global_name)
        if num_classes is None:
            num_classes = int(global_module.out_features)
    else:
        glayer = _as_layer(global_layer, "global_layer")
        hits = match_modules(model, glayer.pattern)
        if len(hits) != 1:
            raise LayerResolutionError(
                f"ltpa: global_layer {glayer.pattern!r} matched {len(hits)} modules "
                f"({', '.join(n for n, _ in hits[:5])}); it must name exactly one"
            )
        global_name, global_module = hits[0]
        global_order = next((i.order for i in infos if i.name == global_name), 0)
        if num_classes is None:
            raise ConfigurationError(
                "ltpa: give num_classes=... with global_layer (without a classifier to read it "
                "from, the head cannot know it)"
            )

    # the local layers
    chosen: list[tuple[str, Layer]] = []
    if isinstance(layers, str) and layers == "auto":
        found = _auto_layers(model, infos, global_order, 3)
        if not found:
            raise LayerResolutionError(
                "ltpa: layers='auto' found no feature map (B, C, H, W) larger than 1x1 before "
                f"the global descriptor at {global_name!r}; name the layers explicitly"
            )
        chosen = [(info.name, info.layer()) for info in found]
    else:
        items = [layers] if isinstance(layers, (str, Layer)) else list(layers)
        if not items:
            raise ConfigurationError("ltpa: layers is empty; name at least one local layer")
        transforms = {i.name: i.transform for i in infos}
        for item in items:
            layer = _as_layer(item, "layers")
            for name, _ in match_modules(model, layer.pattern):
                if any(name == n for n, _ in chosen):
                    continue
                transform = layer.transform or transforms.get(name)
                chosen.append((name, Layer(name, select=layer.select, transform=transform)))

    channels, global_dim, order, overwritten = _measure(model, chosen, global_module, glayer, size)
    for name, _ in chosen:
        if name not in order:
            raise ConfigurationError(
                f"ltpa: layer {name!r} did not run on a dummy input of shape {(1, *size)}; "
                "pass input_size=(C, H, W) of your data or name layers on the forward path"
            )
        if order[name] > order[""]:
            raise ConfigurationError(
                f"ltpa: layer {name!r} runs after the global descriptor is read at "
                f"{global_name!r}; local layers must come before g in the forward"
            )
    chosen.sort(key=lambda item: order[item[0]])
    specs = [LTPALayer(name, channels[name], layer) for name, layer in chosen]
    assert num_classes is not None
    return LTPAHead(
        model,
        specs,
        global_name=global_name,
        global_module=global_module,
        global_dim=global_dim,
        global_layer=glayer,
        num_classes=int(num_classes),
        compatibility=compatibility,
        normalise=normalise,
        project=project,
        independent=independent,
        copy=overwritten,
    )


def _as_descriptor(g: Tensor) -> Tensor:
    """``g`` as ``(B, D)``: a feature map is average-pooled, anything else flattened."""
    if g.dim() == 4:
        return g.mean(dim=(2, 3))
    return g.flatten(1) if g.dim() > 2 else g


def _measure(
    model: nn.Module,
    chosen: Sequence[tuple[str, Layer]],
    global_module: nn.Module,
    glayer: Layer | None,
    size: tuple[int, ...],
) -> tuple[dict[str, int], int, dict[str, int], list[str]]:
    """Run the model once on a dummy input; the width of each local layer and of ``g``.

    Returns:
        Channels per local layer, the width of ``g``, the call order of each local layer
        (key ``""``: when ``g`` was read), and the local layers whose output the model
        overwrites in place before ``g`` (the head copies those).
    """
    channels: dict[str, int] = {}
    kept: dict[str, tuple[Tensor, int]] = {}
    overwritten: list[str] = []
    order: dict[str, int] = {}
    dims: list[int] = []
    counter = [0]

    def local_hook(name: str, layer: Layer) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            where = f"ltpa local layer {name!r}"
            features = select_tensor(output, layer.select, where)
            if layer.transform is not None:
                features = layer.transform(features)
            if not isinstance(features, Tensor) or features.dim() != 4:
                shape = tuple(features.shape) if isinstance(features, Tensor) else type(features)
                raise ConfigurationError(
                    f"{where} gives {shape}, not a feature map (B, C, H, W); name a "
                    "convolutional layer, or give athooks.Layer(name, transform=...) that "
                    "returns (B, C, H, W)"
                )
            counter[0] += 1
            channels[name] = int(features.shape[1])
            order[name] = counter[0]
            kept[name] = (features, features._version)

        return hook

    def record_g(g: Tensor) -> None:
        overwritten.extend(n for n, (t, v) in kept.items() if t._version != v)
        counter[0] += 1
        order[""] = counter[0]
        dims.append(int(_as_descriptor(g).shape[1]))

    def pre_hook(module: nn.Module, args: Any) -> None:
        record_g(args[0])

    def out_hook(module: nn.Module, args: Any, output: Any) -> None:
        assert glayer is not None
        g = select_tensor(output, glayer.select, "the global layer")
        record_g(glayer.transform(g) if glayer.transform is not None else g)

    handles = [model.get_submodule(n).register_forward_hook(local_hook(n, ly)) for n, ly in chosen]
    if glayer is None:
        handles.append(global_module.register_forward_pre_hook(pre_hook))
    else:
        handles.append(global_module.register_forward_hook(out_hook))
    flags = [(m, m.training) for m in model.modules()]
    ref = next((p for p in model.parameters() if p.is_floating_point()), None)
    x = torch.randn((1, *size), generator=torch.Generator().manual_seed(0))
    if ref is not None:
        x = x.to(ref.device, ref.dtype)
    try:
        model.eval()
        with torch.no_grad():
            model(x)
    finally:
        for handle in handles:
            handle.remove()
        for module, flag in flags:
            module.training = flag
    if not dims:
        raise ConfigurationError(
            "ltpa: the global descriptor's module did not run on a dummy input of shape "
            f"{(1, *size)}; pass input_size=(C, H, W) or global_layer=..."
        )
    return channels, dims[-1], order, sorted(set(overwritten))
