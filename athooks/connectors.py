"""Connectors: the small adapters some losses put between the student's features and the teacher's.

FitNets' regressor, OFD's and ReviewKD's connectors, CRD's embedding heads: they map the student's
width to the teacher's (or both to a common one), and their sizes are only known from the shapes
the tapped layers produce. A :class:`Connector` is built from the first call's real shapes, yet its
parameters exist from construction, as uninitialised placeholders
(``torch.nn.parameter.UninitializedParameter``) that are materialised *in place*: an optimiser
made before the first step (``SGD([*student.parameters(), *d.parameters()])``) holds the very
objects that are trained. Optimisers that size their state on the first ``step()`` (SGD, Adam,
AdamW, RMSprop, ...) work; one that reads shapes at construction needs the optimiser made after the
first step.

Under ``torch.distributed`` (DDP, FSDP2: the connectors are not part of the wrapped student), a
connector is made identical on every rank when it is built (rank 0's values are broadcast), and
its gradients are averaged over the ranks as they are accumulated, as DDP does for the student
(:func:`replicate`).
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parameter import UninitializedBuffer, UninitializedParameter

from athooks.errors import CaptureError, ConfigurationError

__all__ = ["ConvBN", "Connector", "Connectors", "replicate"]

ConnectorKind = Literal["conv", "linear"]
Builder = Callable[[int, int], nn.Module]

#: Parameters and buffers already made identical over the ranks (and given the averaging hook).
_REPLICATED: weakref.WeakSet[Tensor] = weakref.WeakSet()


def _distributed() -> bool:
    return bool(dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1)


def _average_gradient(param: Tensor) -> None:
    if param.grad is not None:
        dist.all_reduce(param.grad)
        param.grad.div_(dist.get_world_size())


def replicate(module: nn.Module) -> None:
    """Make a module's parameters and buffers the same on every rank, and its gradients averaged.

    Does nothing outside ``torch.distributed`` (or with one process). Each parameter and buffer is
    broadcast from rank 0 once; each parameter gets a hook that averages its gradient over the
    ranks when backward has accumulated it, as DDP does for the modules it wraps. Every rank must
    call it at the same point, with the same module structure (a collective).

    Args:
        module: A loss, mapping or connector (materialised parameters only are handled).

    Example:
        ```python
        import torch
        from athooks.connectors import replicate

        replicate(torch.nn.Linear(2, 2))  # no process group: nothing to do
        ```
    """
    if not _distributed():
        return
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            if isinstance(tensor, (UninitializedParameter, UninitializedBuffer)):
                continue
            if tensor in _REPLICATED:
                continue
            dist.broadcast(tensor.data if isinstance(tensor, nn.Parameter) else tensor, src=0)
            if isinstance(tensor, nn.Parameter) and tensor.requires_grad:
                tensor.register_post_accumulate_grad_hook(_average_gradient)  # type: ignore[no-untyped-call]
            _REPLICATED.add(tensor)


class ConvBN(nn.Module):
    """A 1x1 convolution and a batch norm, over 1 to 3 spatial dimensions (FitNets' regressor).

    Args:
        in_channels: The student's width.
        out_channels: The target width.
        spatial_dims: 1, 2 or 3.
        bn: Whether to follow the convolution by a batch norm.

    Example:
        ```python
        import torch
        from athooks.connectors import ConvBN

        assert ConvBN(8, 16)(torch.randn(2, 8, 4, 4)).shape == (2, 16, 4, 4)
        ```
    """

    def __init__(
        self, in_channels: int, out_channels: int, spatial_dims: int = 2, bn: bool = True
    ) -> None:
        super().__init__()
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[spatial_dims]
        norm = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[spatial_dims]
        self.conv = conv(in_channels, out_channels, 1, bias=not bn)
        self.bn = norm(out_channels) if bn else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        """Map ``(B, in_channels, *S)`` to ``(B, out_channels, *S)``."""
        out: Tensor = self.bn(self.conv(x))
        return out


def _named_tensors(module: nn.Module) -> dict[str, Tensor]:
    found: dict[str, Tensor] = dict(module.named_parameters(remove_duplicate=False))
    found.update(dict(module.named_buffers(remove_duplicate=False)))
    return found


def _set_tensor(module: nn.Module, name: str, tensor: Tensor) -> None:
    owner_name, _, leaf = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    if isinstance(tensor, nn.Parameter):
        owner.register_parameter(leaf, tensor)
    else:
        owner.register_buffer(leaf, tensor)


class Connector(nn.Module):
    """An adapter from the student's features to a width known only from the first call.

    ``connector(x, out)`` maps ``x`` to ``out`` channels: ``(B, C_in, *S) -> (B, C_out, *S)``
    (``kind="conv"``: a 1x1 convolution and a batch norm by default, 1 to 3 spatial dimensions)
    or ``(B, D_in) -> (B, D_out)`` (``kind="linear"``: a linear layer). Its module is built on
    the first call from the real shapes, on the input's device and in the connector's dtype (the
    student's, once the Distiller has moved its losses there), into the parameter objects that
    existed from construction (see the module docs): the optimiser may be made before.

    Args:
        builder: ``builder(in_channels, out_channels) -> nn.Module`` for another structure (a
            translator, a fusion block). Its parameter and buffer names must not depend on the
            widths. ``None``: :class:`ConvBN` or ``nn.Linear``.
        kind: ``"conv"`` (feature maps) or ``"linear"`` (vectors); with a builder, it only sets
            which inputs are accepted.
        bn: For the default conv builder: follow the 1x1 convolution by a batch norm.

    Attributes:
        in_channels: The widths it was built for (``None`` until built).
        out_channels: The target width (``None`` until built).

    Example:
        ```python
        import torch
        from athooks.plugin import Connector

        conn = Connector()
        opt = torch.optim.SGD(conn.parameters(), lr=0.1)  # before it is built
        y = conn(torch.randn(2, 8, 4, 4), 16)  # built now: 8 -> 16 channels
        assert y.shape == (2, 16, 4, 4) and conn.built
        y.square().mean().backward()
        opt.step()
        ```
    """

    def __init__(
        self,
        builder: Builder | None = None,
        *,
        kind: ConnectorKind = "conv",
        bn: bool = True,
    ) -> None:
        super().__init__()
        if kind not in ("conv", "linear"):
            raise ConfigurationError(
                f"Connector: kind must be 'conv' (feature maps (B, C, *S)) or 'linear' (vectors "
                f"(B, D)), got {kind!r}"
            )
        if builder is not None and not callable(builder):
            raise ConfigurationError(
                f"Connector: builder must be a callable (in_channels, out_channels) -> nn.Module, "
                f"got {type(builder).__name__}"
            )
        self.kind: ConnectorKind = kind
        self.bn = bool(bn)
        self._builder = builder
        self.in_channels: int | None = None
        self.out_channels: int | None = None
        # (in, out, spatial dims) once built, saved with the state so that loading builds to them
        self.register_buffer("widths", torch.full((3,), -1, dtype=torch.long))
        self.body = self._make(1, 1, 2)
        for name, tensor in _named_tensors(self.body).items():
            placeholder: Tensor
            if isinstance(tensor, nn.Parameter):
                placeholder = UninitializedParameter(requires_grad=tensor.requires_grad)
            else:
                placeholder = UninitializedBuffer()
            _set_tensor(self.body, name, placeholder)

    def _make(self, c_in: int, c_out: int, spatial_dims: int) -> nn.Module:
        if self._builder is not None:
            made = self._builder(c_in, c_out)
            if not isinstance(made, nn.Module):
                raise ConfigurationError(
                    f"Connector: the builder returned a {type(made).__name__}, not an nn.Module"
                )
            return made
        if self.kind == "linear":
            return nn.Linear(c_in, c_out)
        return ConvBN(c_in, c_out, spatial_dims, bn=self.bn)

    @property
    def built(self) -> bool:
        """Whether the first call has built the module."""
        return self.in_channels is not None

    def _check_input(self, x: Tensor) -> None:
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise CaptureError(
                f"Connector: expected a floating-point tensor, got {type(x).__name__}"
            )
        if self.kind == "linear" and x.dim() != 2:
            raise CaptureError(
                f"a linear connector maps vectors (B, D); got shape {tuple(x.shape)}. Flatten "
                "or pool the features first, or use Connector(kind='conv') for feature maps"
            )
        if self.kind == "conv" and not 3 <= x.dim() <= 5:
            raise CaptureError(
                f"a conv connector maps feature maps (B, C, *S) with 1 to 3 spatial dimensions; "
                f"got shape {tuple(x.shape)}. Use Connector(kind='linear') for vectors (B, D)"
            )

    def build(self, in_channels: int, out_channels: int, spatial_dims: int = 2) -> None:
        """Build the module for these widths, into the placeholder parameters (done once).

        Args:
            in_channels: The input width.
            out_channels: The output width.
            spatial_dims: The number of spatial dimensions of the inputs (conv connectors).

        Raises:
            ConfigurationError: If the builder's parameter names depend on the widths.
        """
        old = _named_tensors(self.body)
        device = next(iter(old.values())).device if old else torch.device("cpu")
        dtype = next((t.dtype for t in old.values() if t.is_floating_point()), None)
        made = self._make(in_channels, out_channels, spatial_dims)
        new = _named_tensors(made)
        if set(new) != set(old):
            raise ConfigurationError(
                f"Connector: the builder's module has parameters/buffers {sorted(new)} for widths "
                f"{in_channels} -> {out_channels} but {sorted(old)} for 1 -> 1; their names must "
                "not depend on the widths (build a module of the same structure for every width)"
            )
        with torch.no_grad():
            for name, value in new.items():
                placeholder = old[name]
                target_dtype = value.dtype
                if value.is_floating_point() and dtype is not None:
                    target_dtype = dtype
                placeholder.materialize(value.shape, device=device, dtype=target_dtype)  # type: ignore[attr-defined]
                placeholder.copy_(value)
                _set_tensor(made, name, placeholder)
        self.body = made
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.widths = torch.tensor(
            [in_channels, out_channels, spatial_dims], dtype=torch.long, device=device
        )
        replicate(self)

    def forward(self, x: Tensor, out: int | Tensor) -> Tensor:
        """Map ``x`` to ``out`` channels (an int, or a tensor whose ``shape[1]`` is taken).

        Args:
            x: The student's features ``(B, C_in, *S)`` or vector ``(B, D_in)``.
            out: The target width, or the teacher's tensor.

        Returns:
            The mapped tensor, ``(B, C_out, *S)`` or ``(B, D_out)``.

        Raises:
            CaptureError: If the input is not of the connector's kind, or its widths differ from
                the ones it was built for.
        """
        self._check_input(x)
        width = int(out.shape[1]) if isinstance(out, Tensor) else int(out)
        if not self.built:
            device = x.device
            self.to(device)
            self.build(int(x.shape[1]), width, max(x.dim() - 2, 1))
        elif (self.in_channels, self.out_channels) != (int(x.shape[1]), width):
            raise CaptureError(
                f"this connector was built for {self.in_channels} -> {self.out_channels} "
                f"channels and is now given {int(x.shape[1])} -> {width}: the tapped layers' "
                "widths changed between steps. A connector belongs to one layer pair: keep the "
                "layers (and models) the Distiller was built with"
            )
        weight = next(iter(self.body.parameters()), None)
        if weight is not None and x.dtype != weight.dtype and not torch.is_autocast_enabled():
            x = x.to(weight.dtype)
        mapped: Tensor = self.body(x)
        return mapped

    def state_keys(self) -> list[str]:
        """The state-dict keys (below this module) it has once built, built or not."""
        return ["widths", *(f"body.{name}" for name in _named_tensors(self.body))]

    def state_dict(
        self, *args: Any, destination: Any = None, prefix: str = "", keep_vars: bool = False
    ) -> Any:
        """As for a module, but empty until built (loading a built one's state builds it)."""
        if not self.built:
            return OrderedDict() if destination is None else destination
        return super().state_dict(
            *args, destination=destination, prefix=prefix, keep_vars=keep_vars
        )

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # A checkpoint of a built connector restores into an unbuilt one: build it to the saved
        # widths first, then load as usual.
        saved = state_dict.get(prefix + "widths")
        if not self.built and isinstance(saved, Tensor) and saved.numel() == 3 and saved[0] > 0:
            self.build(int(saved[0]), int(saved[1]), int(saved[2]))
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def extra_repr(self) -> str:
        """Kind and widths, for ``repr``."""
        widths = f"{self.in_channels} -> {self.out_channels}" if self.built else "not built"
        return f"kind={self.kind!r}, {widths}"


class Connectors(nn.ModuleList):
    """One :class:`Connector` per layer pair, sized when the pairs are known.

    :meth:`athooks.plugin.Loss.setup` sizes every ``Connectors`` of a loss to its number of
    pairs, before the first step, so their (placeholder) parameters are in ``d.parameters()``.

    Args:
        builder: As for :class:`Connector`.
        kind: As for :class:`Connector`.
        bn: As for :class:`Connector`.

    Example:
        ```python
        import torch
        from athooks.plugin import Connectors

        regressors = Connectors()
        regressors.resize(2)
        print(regressors[1](torch.randn(2, 8, 4, 4), 16).shape)
        ```
    """

    def __init__(
        self, builder: Builder | None = None, *, kind: ConnectorKind = "conv", bn: bool = True
    ) -> None:
        super().__init__()
        self._options: dict[str, Any] = {"builder": builder, "kind": kind, "bn": bn}
        Connector(**self._options)  # validate the options now

    @property
    def sized(self) -> bool:
        """Whether :meth:`resize` was called."""
        return len(self) > 0

    def resize(self, count: int) -> None:
        """Hold ``count`` connectors (new ones unbuilt; done once per Distiller in practice).

        Args:
            count: The number of layer pairs.

        Raises:
            ConfigurationError: If that would drop a built connector.
        """
        if any(c.built for c in list(self)[count:]):
            raise ConfigurationError(
                f"these connectors hold {len(self)} built ones (trained weights, e.g. from a "
                f"loaded state dict), and are now asked for {count}, which would drop some. "
                "Build the Distiller with the layers it was saved with"
            )
        while len(self) < count:
            self.append(Connector(**self._options))
        while len(self) > count:
            del self[len(self) - 1]

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, int) and not self.sized:
            raise CaptureError(
                "these connectors were never sized to the layer pairs: a loss holding a "
                "Connectors must call super().setup(pairs) in its setup(), and tests that build "
                "a Step by hand call loss.setup(pairs) first"
            )
        return super().__getitem__(index)
