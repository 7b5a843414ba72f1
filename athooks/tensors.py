"""Finding tensors in what modules take and return: one rule for every part of athooks.

A module's output (or a model's input) may be a tensor, or tensors nested in tuples, lists, dicts
(including ``OrderedDict`` subclasses such as Hugging Face's ``ModelOutput``) and dataclasses.
:func:`first_tensor` is the rule athooks uses wherever it needs "the" tensor: the first one found
depth first, in order, at most five levels deep.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Mapping as MappingABC
from dataclasses import fields, is_dataclass
from typing import Any

from torch import Tensor

from athooks.errors import CaptureError

__all__ = [
    "adapted_input",
    "all_tensors",
    "device_type",
    "first_tensor",
    "image_list_length",
    "lone_tensor",
    "non_tensor_input",
    "select_tensor",
    "slice_batch",
]

_MAX_DEPTH = 4


def _children(value: Any) -> Any:
    """The items of a container athooks looks into, or ``None`` for anything else."""
    kind = type(value)
    if kind is tuple or kind is list:  # the common case, before the slower ABC check
        return value
    if kind is dict:
        return value.values()
    if isinstance(value, MappingABC):
        return value.values()
    if isinstance(value, (tuple, list)):
        return value
    if is_dataclass(value) and not isinstance(value, type):
        return [getattr(value, f.name) for f in fields(value)]
    return None


def first_tensor(value: Any, depth: int = 0) -> Tensor | None:
    """The first tensor in ``value``: depth first, in order, through containers.

    Args:
        value: A tensor, or tuples, lists, dicts and dataclasses holding tensors.
        depth: The current nesting level (callers leave it at 0).

    Returns:
        The tensor, or ``None`` when there is none within five levels.

    Example:
        ```python
        import torch
        from athooks.tensors import first_tensor

        x = torch.zeros(2)
        assert first_tensor(({"a": None, "b": x}, torch.ones(1))) is x
        assert first_tensor(["no", 3]) is None
        ```
    """
    if isinstance(value, Tensor):
        return value
    if depth > _MAX_DEPTH:
        return None
    items = _children(value)
    if items is None:
        return None
    for item in items:
        found = first_tensor(item, depth + 1)
        if found is not None:
            return found
    return None


def lone_tensor(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor | None:
    """The tensor of a call made with one tensor and nothing else (``model(x)``), else ``None``.

    The common case, told apart in a few checks: for it :func:`first_tensor` and
    :func:`all_tensors` of ``(args, kwargs)`` are that tensor.

    Args:
        args: The positional arguments of a call.
        kwargs: Its keyword arguments.

    Returns:
        The tensor, or ``None`` for any other call.

    Example:
        ```python
        import torch
        from athooks.tensors import lone_tensor

        x = torch.zeros(2, 3)
        assert lone_tensor((x,), {}) is x
        assert lone_tensor((x,), {"mask": None}) is None and lone_tensor((x, x), {}) is None
        ```
    """
    if len(args) == 1 and not kwargs and isinstance(args[0], Tensor):
        return args[0]
    return None


def device_type(value: Any) -> str:
    """The device type of the first tensor in ``value`` (``"cpu"`` if there is none).

    Args:
        value: A tensor, or containers holding tensors (a module's inputs or output).

    Returns:
        ``"cpu"``, ``"cuda"``, ...: what :func:`torch.autocast` takes.

    Example:
        ```python
        import torch
        from athooks.tensors import device_type

        assert device_type((3, {"x": torch.zeros(1)})) == "cpu"
        assert device_type("no tensor") == "cpu"
        ```
    """
    first = first_tensor(value)
    return first.device.type if first is not None else "cpu"


def all_tensors(value: Any, depth: int = 0) -> list[Tensor]:
    """Every tensor in ``value``, depth first, in order, through the containers athooks reads.

    Args:
        value: A tensor, or containers holding tensors.
        depth: The current nesting level (callers leave it at 0).

    Returns:
        The tensors.

    Example:
        ```python
        import torch
        from athooks.tensors import all_tensors

        a, b = torch.zeros(1), torch.ones(1)
        assert all_tensors(((a, 3), {"b": b})) == [a, b]
        ```
    """
    if isinstance(value, Tensor):
        return [value]
    items = _children(value) if depth <= _MAX_DEPTH else None
    return [t for item in items or () for t in all_tensors(item, depth + 1)]


def select_tensor(
    output: Any, select: int | str | Callable[[Any], Tensor] | None, where: str
) -> Tensor:
    """Pick the tensor to use from a module's output.

    Args:
        output: What the module returned.
        select: ``None`` for :func:`first_tensor`, an index into a tuple or list, a key of a
            dict (or an attribute name), or a callable.
        where: The layer, for error messages.

    Returns:
        The selected tensor.

    Raises:
        CaptureError: If nothing usable is found.

    Example:
        ```python
        import torch
        from athooks.tensors import select_tensor

        out = (torch.zeros(1), {"b": torch.ones(2)})
        assert select_tensor(out, None, "x").shape == (1,)
        assert select_tensor(out, 1, "x").shape == (2,)
        ```
    """
    if select is None:
        found = first_tensor(output)
        if found is None:
            raise CaptureError(
                f"{where} returned a {type(output).__name__} with no tensor in it; tap another "
                "layer, or say which part to use with athooks.Layer(name, select=...)"
            )
        return found
    try:
        if callable(select):
            picked = select(output)
        elif isinstance(select, str) and not isinstance(output, MappingABC):
            picked = getattr(output, select)
        else:
            picked = output[select]
    except (KeyError, IndexError, TypeError, AttributeError) as err:
        raise CaptureError(
            f"select={select!r} failed on the output of {where} (a {type(output).__name__}): "
            f"{type(err).__name__}: {err}"
        ) from None
    if not isinstance(picked, Tensor):
        inner = first_tensor(picked)
        if inner is not None:
            return inner
        raise CaptureError(
            f"select={select!r} on the output of {where} gave a {type(picked).__name__}, not a "
            "tensor"
        )
    return picked


def slice_batch(value: Any, batch: int, keep: int = 1, depth: int = 0) -> Any:
    """``value`` with every tensor whose first dimension is ``batch`` cut to its first ``keep``.

    Containers are rebuilt (tuples, lists, dicts); other objects and tensors of another leading
    size (a mask shared by the batch, say) are kept as they are.

    Args:
        value: Model inputs: a tensor, or containers of tensors.
        batch: The batch size, the leading dimension to cut.
        keep: How many samples to keep.
        depth: The current nesting level (callers leave it at 0).

    Returns:
        The sliced inputs.

    Example:
        ```python
        import torch
        from athooks.tensors import slice_batch

        x, mask = torch.zeros(8, 3, 4, 4), torch.ones(4, 4)
        args = slice_batch((x, mask), batch=8)
        assert args[0].shape == (1, 3, 4, 4) and args[1] is mask
        ```
    """
    if isinstance(value, Tensor):
        return value[:keep] if value.dim() and value.shape[0] == batch else value
    if depth > _MAX_DEPTH:
        return value
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return tuple(slice_batch(v, batch, keep, depth + 1) for v in value)
    if isinstance(value, list):
        return [slice_batch(v, batch, keep, depth + 1) for v in value]
    if type(value) is dict:
        return {k: slice_batch(v, batch, keep, depth + 1) for k, v in value.items()}
    return value


_PLAIN = (str, bytes, int, float, complex, bool, type(None))


def non_tensor_input(args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
    """Describe an input that surely holds no tensor (plain data, NumPy arrays), else ``None``.

    Objects of the user's own classes count as possibly holding tensors (``None`` is returned).

    Args:
        args: The positional arguments of a call.
        kwargs: Its keyword arguments.

    Returns:
        A description such as ``"(ndarray)"``, or ``None``.

    Example:
        ```python
        import torch
        from athooks.tensors import non_tensor_input

        assert non_tensor_input((torch.zeros(1),), {}) is None
        assert non_tensor_input(([1.0, 2.0],), {}) == "(list)"
        ```
    """
    if first_tensor((args, kwargs)) is not None:
        return None

    def plain(value: Any, depth: int = 0) -> bool:
        if isinstance(value, _PLAIN) or type(value).__module__ == "numpy":
            return True
        if isinstance(value, MappingABC):
            return depth < _MAX_DEPTH and all(plain(v, depth + 1) for v in value.values())
        if isinstance(value, (tuple, list)):
            return depth < _MAX_DEPTH and all(plain(v, depth + 1) for v in value)
        return False  # an object of its own: it may hold tensors we cannot see

    if not plain((args, kwargs)):
        return None
    given = [type(a).__name__ for a in args]
    given += [f"{k}={type(v).__name__}" for k, v in kwargs.items()]
    return f"({', '.join(given)})" if given else "no arguments"


def adapted_input(
    adapter: Callable[..., Any] | None, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The teacher's call arguments for the student's, through a ``teacher_input`` adapter.

    Args:
        adapter: The user's ``teacher_input`` (``None``: the same arguments).
        args: The student's positional arguments.
        kwargs: Its keyword arguments.

    Returns:
        ``(args, kwargs)`` for the teacher: what the adapter returned, a tuple spread as
        positional arguments, anything else as the one argument.

    Example:
        ```python
        import torch
        from athooks.tensors import adapted_input

        x = torch.zeros(2, 1, 4, 4)
        args, kwargs = adapted_input(lambda x: x.expand(-1, 3, -1, -1), (x,), {})
        assert args[0].shape == (2, 3, 4, 4) and kwargs == {}
        ```
    """
    if adapter is None:
        return args, kwargs
    adapted = adapter(*args, **kwargs)
    return (adapted if isinstance(adapted, tuple) else (adapted,)), {}


def image_list_length(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int | None:
    """The number of images when a call's first argument is a list of ``(C, H, W)`` tensors.

    That is how torchvision's detection models are called (``model(images, targets)``); their
    batch is the number of images, which the per-image maps of a step must have.

    Args:
        args: The positional arguments of a call.
        kwargs: Its keyword arguments (an ``images=`` list counts too).

    Returns:
        The list's length, or ``None`` for any other input.

    Example:
        ```python
        import torch
        from athooks.tensors import image_list_length

        images = [torch.zeros(3, 8, 8), torch.zeros(3, 6, 8)]
        assert image_list_length((images, [{}, {}]), {}) == 2
        assert image_list_length((torch.zeros(2, 3, 8, 8),), {}) is None
        ```
    """
    first = args[0] if args else kwargs.get("images")
    if not isinstance(first, (list, tuple)) or not first:
        return None
    if all(isinstance(image, Tensor) and image.dim() == 3 for image in first):
        return len(first)
    return None
