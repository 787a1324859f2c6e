"""DropConnect: dropout of weights instead of activations, for linear and 2-D convolution layers.

Wan, Zeiler, Zhang, LeCun, Fergus. *Regularization of Neural Networks using DropConnect*.
ICML 2013.

Each weight is multiplied by ``m ~ Bernoulli(1 − p) / (1 − p)`` (inverted scaling, so the
expected weight is the trained one and evaluation uses the weights as they are). The bias is
never masked: it adds a constant, and masking it would only add noise unrelated to the input.

**One mask per forward or one per example.** Wan et al. draw an independent mask per example.
By default one mask is drawn per forward call and shared by the whole batch: one elementwise
product on the weight, the same cost as the plain layer. ``per_sample=True`` draws a mask per
example (a ``N``-times larger weight tensor, computed with a batched matmul for linear layers and
a grouped convolution for conv layers).

**Noise seen by a downstream BatchNorm.** For one output unit ``y = Σ_j w_j m_j x_j + b`` the
masks ``m_j`` are independent with ``Var[m] = p / (1 − p)``: exactly the noise of inverted
Bernoulli dropout with the same ``p`` applied to that unit's inputs, so the per-unit variance
shift of :mod:`varshift.theory` (kind ``"bernoulli"``) applies. The registry records it that
way. It is exact with ``per_sample=True``. With the shared mask, each batch sees one fixed
perturbed weight, so the part of the noise due to the input mean ``c`` shows up as a
batch-to-batch shift of the mean rather than as within-batch variance; a BN's batch variance
then grows by ``σ² v`` instead of ``σ² (c² + v)`` and the theory overstates the shift when
inputs have a large mean.

Both functionals are wrapped with :func:`torch.fx.wrap`, so :func:`torch.fx.symbolic_trace`
keeps them as single calls (with ``training`` frozen at trace time, as for any traced flag).
:func:`torch.compile` captures them whole (``fullgraph=True``). :func:`torch.jit.script` is
not supported (TorchScript refuses keyword-only arguments with defaults).
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.utils import _pair

from varshift.layers.registry import (
    CallSpecFn,
    NoiseSpec,
    bernoulli_spec,
    register_stochastic,
    register_stochastic_function,
    spec_from_call,
)
from varshift.theory.checks import DROP_PROBABILITY, check_bool, check_floating, check_real

__all__ = [
    "DropConnectConv2d",
    "DropConnectLinear",
    "convert_to_dropconnect",
    "drop_connect_conv2d",
    "drop_connect_linear",
]

_IntOr2 = int | tuple[int, int]
_PaddingMode = Literal["zeros", "reflect", "replicate", "circular"]
_DropConnectT = TypeVar("_DropConnectT", "DropConnectLinear", "DropConnectConv2d")


def _masked_weight(
    weight: Tensor, p: float, copies: int | None, generator: torch.Generator | None
) -> Tensor:
    """``weight · Bernoulli(1 − p) / (1 − p)``; with ``copies`` an independent mask per copy,
    shape ``Tensor[copies, *weight.shape]``."""
    if copies is None:
        noise = torch.empty_like(weight)
        source = weight
    else:
        source = weight.unsqueeze(0).expand(copies, *weight.shape)
        noise = torch.empty_like(source)
    noise.bernoulli_(1.0 - p, generator=generator).div_(1.0 - p)
    return source * noise


def _check_batched(x: Tensor, min_dim: int, what: str) -> None:
    if x.dim() < min_dim:
        raise ValueError(
            f"per_sample=True needs x with a batch dimension ({what}), got shape {tuple(x.shape)}"
        )


def drop_connect_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    p: float,
    training: bool = True,
    *,
    per_sample: bool = False,
    generator: torch.Generator | None = None,
) -> Tensor:
    """DropConnect linear map (Wan et al., ICML 2013): ``F.linear(x, weight ∘ m, bias)`` with
    ``m ~ Bernoulli(1 − p) / (1 − p)`` elementwise on the weight.

    Args:
        x: ``Tensor[*, in]``; with ``per_sample=True``, ``Tensor[N, *, in]``, one mask per index
            of the first dimension.
        weight: ``Tensor[out, in]``.
        bias: ``Tensor[out]`` or ``None``; never masked.
        p: probability that a weight is dropped, in ``[0, 1)``.
        training: apply the mask if ``True``; plain ``F.linear`` otherwise.
        per_sample: one mask per example (Wan et al.) instead of one per call.
        generator: optional random generator for the mask.

    Returns:
        ``Tensor[*, out]``. For fixed ``x``: ``E[y] = F.linear(x, weight, bias)`` and
        ``Var[y] = p / (1 − p) · F.linear(x², weight²)``.
    """
    p = check_real("p", p, DROP_PROBABILITY)
    check_bool("per_sample", per_sample)
    check_floating("x", x)
    if not training or p == 0.0:
        return F.linear(x, weight, bias)
    if not per_sample:
        return F.linear(x, _masked_weight(weight, p, None, generator), bias)
    _check_batched(x, 2, "Tensor[N, *, in]")
    n = x.shape[0]
    weights = _masked_weight(weight, p, n, generator)  # [N, out, in]
    rows = x.reshape(n, -1, x.shape[-1])  # [N, L, in]
    out = torch.bmm(rows, weights.transpose(1, 2)).reshape(*x.shape[:-1], weight.shape[0])
    return out if bias is None else out + bias


def drop_connect_conv2d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    p: float,
    training: bool = True,
    stride: _IntOr2 = 1,
    padding: _IntOr2 | str = 0,
    dilation: _IntOr2 = 1,
    groups: int = 1,
    *,
    per_sample: bool = False,
    generator: torch.Generator | None = None,
) -> Tensor:
    """DropConnect 2-D convolution (Wan et al., ICML 2013): ``F.conv2d`` with the kernel
    multiplied elementwise by ``m ~ Bernoulli(1 − p) / (1 − p)``; ``stride``, ``padding``
    (ints or ``"same"``/``"valid"``), ``dilation`` and ``groups`` mean what they mean for
    :func:`torch.nn.functional.conv2d`.

    A masked kernel weight is dropped at every spatial position of the example it applies to.

    Args:
        x: ``Tensor[N, C_in, H, W]`` (or unbatched ``Tensor[C_in, H, W]`` when
            ``per_sample=False``).
        weight: ``Tensor[C_out, C_in / groups, kH, kW]``.
        bias: ``Tensor[C_out]`` or ``None``; never masked.
        p: probability that a weight is dropped, in ``[0, 1)``.
        training: apply the mask if ``True``; plain ``F.conv2d`` otherwise.
        per_sample: one mask per example (Wan et al.) instead of one per call, computed as one
            grouped convolution with the batch folded into the channels.
        generator: optional random generator for the mask.

    Returns:
        ``Tensor[N, C_out, H_out, W_out]``. For fixed ``x``: ``E[y]`` is the plain convolution and
        ``Var[y] = p / (1 − p) · conv2d(x², weight²)`` (no bias, same geometry).
    """
    p = check_real("p", p, DROP_PROBABILITY)
    check_bool("per_sample", per_sample)
    check_floating("x", x)
    if not training or p == 0.0:
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    if not per_sample:
        masked = _masked_weight(weight, p, None, generator)
        return F.conv2d(x, masked, bias, stride, padding, dilation, groups)
    _check_batched(x, 4, "Tensor[N, C, H, W]")
    n, c, h, w = x.shape
    # Fold the batch into the channels: example i only meets the i-th masked copy of the kernel
    # because the convolution is grouped n · groups ways.
    weights = _masked_weight(weight, p, n, generator).flatten(0, 1)  # [N·C_out, C_in/g, kH, kW]
    folded_bias = None if bias is None else bias.repeat(n)
    out = F.conv2d(
        x.reshape(1, n * c, h, w), weights, folded_bias, stride, padding, dilation, groups * n
    )
    return out.reshape(n, weight.shape[0], out.shape[-2], out.shape[-1])


torch.fx.wrap("drop_connect_linear")
torch.fx.wrap("drop_connect_conv2d")


class DropConnectLinear(nn.Linear):
    """:class:`torch.nn.Linear` whose weight is masked by DropConnect in training
    (:func:`drop_connect_linear`); ``Tensor[*, in] → Tensor[*, out]``. In ``eval()`` it computes
    exactly what :class:`torch.nn.Linear` computes with the same parameters.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        p: float = 0.5,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        per_sample: bool = False,
    ) -> None:
        p = check_real("p", p, DROP_PROBABILITY)
        check_bool("per_sample", per_sample)
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.p = float(p)
        self.per_sample = per_sample

    def forward(self, input: Tensor) -> Tensor:
        return drop_connect_linear(
            input, self.weight, self.bias, self.p, self.training, per_sample=self.per_sample
        )

    @classmethod
    def from_module(
        cls, layer: nn.Linear, p: float = 0.5, *, per_sample: bool = False
    ) -> DropConnectLinear:
        """A :class:`DropConnectLinear` with a copy of ``layer``'s parameters (same device, dtype,
        ``requires_grad`` and train/eval mode); ``layer`` is left untouched."""
        _check_source(layer, nn.Linear, p)
        new = cls(
            layer.in_features,
            layer.out_features,
            bias=layer.bias is not None,
            p=p,
            device="meta",
            dtype=layer.weight.dtype,
            per_sample=per_sample,
        )
        return _copy_parameters(layer, new)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, p={self.p}, per_sample={self.per_sample}"


class DropConnectConv2d(nn.Conv2d):
    """:class:`torch.nn.Conv2d` whose kernel is masked by DropConnect in training
    (:func:`drop_connect_conv2d`); ``Tensor[N, C_in, H, W] → Tensor[N, C_out, H_out, W_out]``.

    Keeps stride, padding (ints or ``"same"``/``"valid"``), dilation, groups, bias and every
    ``padding_mode``; in ``eval()`` it computes exactly what :class:`torch.nn.Conv2d` computes
    with the same parameters.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: _IntOr2,
        stride: _IntOr2 = 1,
        padding: _IntOr2 | str = 0,
        dilation: _IntOr2 = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: _PaddingMode = "zeros",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        p: float = 0.5,
        per_sample: bool = False,
    ) -> None:
        p = check_real("p", p, DROP_PROBABILITY)
        check_bool("per_sample", per_sample)
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            stride,
            padding,
            dilation,
            groups,
            bias,
            padding_mode,
            device=device,
            dtype=dtype,
        )
        self.p = float(p)
        self.per_sample = per_sample

    def forward(self, input: Tensor) -> Tensor:
        padding: tuple[int, ...] | str = self.padding
        if self.padding_mode != "zeros":
            # Same route as nn.Conv2d: pad explicitly with the requested mode, then convolve
            # without implicit zero padding.
            input = F.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = _pair(0)
        return drop_connect_conv2d(
            input,
            self.weight,
            self.bias,
            self.p,
            self.training,
            self.stride,  # type: ignore[arg-type]
            padding,  # type: ignore[arg-type]
            self.dilation,  # type: ignore[arg-type]
            self.groups,
            per_sample=self.per_sample,
        )

    @classmethod
    def from_module(
        cls, layer: nn.Conv2d, p: float = 0.5, *, per_sample: bool = False
    ) -> DropConnectConv2d:
        """A :class:`DropConnectConv2d` with ``layer``'s geometry (kernel size, stride, padding,
        dilation, groups, padding mode) and a copy of its parameters (same device, dtype,
        ``requires_grad`` and train/eval mode); ``layer`` is left untouched."""
        _check_source(layer, nn.Conv2d, p)
        new = cls(
            layer.in_channels,
            layer.out_channels,
            layer.kernel_size,  # type: ignore[arg-type]
            stride=layer.stride,  # type: ignore[arg-type]
            padding=layer.padding,  # type: ignore[arg-type]
            dilation=layer.dilation,  # type: ignore[arg-type]
            groups=layer.groups,
            bias=layer.bias is not None,
            padding_mode=layer.padding_mode,
            device="meta",
            dtype=layer.weight.dtype,
            p=p,
            per_sample=per_sample,
        )
        return _copy_parameters(layer, new)

    def extra_repr(self) -> str:
        # torch's _ConvNd.extra_repr carries no annotations.
        conv = super().extra_repr()  # type: ignore[no-untyped-call]
        return f"{conv}, p={self.p}, per_sample={self.per_sample}"


def _check_source(layer: nn.Module, expected: type[nn.Module], p: float) -> None:
    """What ``from_module`` refuses: a bad ``p``, another layer type, lazy parameters."""
    check_real("p", p, DROP_PROBABILITY)
    if not isinstance(layer, expected):
        raise TypeError(f"layer must be an nn.{expected.__name__}, got {type(layer).__name__}")
    if any(isinstance(t, nn.parameter.UninitializedParameter) for t in layer.parameters()):
        raise ValueError(
            f"layer {type(layer).__name__} has uninitialized (lazy) parameters; run one forward "
            "pass before converting it"
        )


def _copy_parameters(layer: nn.Module, new: _DropConnectT) -> _DropConnectT:
    """Give ``new`` (built on the meta device, so nothing was initialised for nothing) storage on
    ``layer``'s device and copy the parameters, their ``requires_grad`` and the mode."""
    weight = layer.weight
    assert isinstance(weight, Tensor)
    new.to_empty(device=weight.device)
    with torch.no_grad():
        for name, param in layer.named_parameters(recurse=False):
            target = getattr(new, name)
            target.copy_(param)
            target.requires_grad_(param.requires_grad)
    return new.train(layer.training)


def convert_to_dropconnect(
    model: nn.Module,
    p: float,
    *,
    types: Sequence[type[nn.Module]] = (nn.Linear, nn.Conv2d),
    inplace: bool = False,
    per_sample: bool = False,
) -> nn.Module:
    """Replace every submodule of ``model`` that is an instance of one of ``types`` by its
    DropConnect twin (:meth:`DropConnectLinear.from_module`,
    :meth:`DropConnectConv2d.from_module`) with drop probability ``p``.

    By default ``model`` is deep-copied first and left untouched. With ``inplace=True`` the
    replacements reuse the original ``nn.Parameter`` objects, so an optimizer already built on
    ``model`` keeps training the same tensors, and weights tied between layers stay tied. A layer
    used at several places of the model is replaced by one shared DropConnect layer. Hooks
    registered on a replaced layer are not carried over. Layers inside
    :class:`torch.nn.MultiheadAttention` are skipped: it reads ``out_proj.weight`` directly and
    would ignore the mask.

    Args:
        model: the model; if it is itself a matching layer, its replacement is returned.
        p: drop probability of every converted layer, in ``[0, 1)``.
        types: which layer classes to convert; each must be :class:`torch.nn.Linear`,
            :class:`torch.nn.Conv2d` or a subclass of them.
        inplace: modify ``model`` instead of a copy.
        per_sample: passed to every converted layer.

    Returns:
        The converted model (``model`` itself when ``inplace=True``).
    """
    check_real("p", p, DROP_PROBABILITY)
    check_bool("inplace", inplace)
    check_bool("per_sample", per_sample)
    types = tuple(types)
    for kind in types:
        if not (isinstance(kind, type) and issubclass(kind, (nn.Linear, nn.Conv2d))):
            raise ValueError(f"types must hold nn.Linear or nn.Conv2d (sub)classes, got {kind!r}")
    root = model if inplace else copy.deepcopy(model)
    replaced: dict[int, nn.Module] = {}

    def twin(layer: nn.Module) -> nn.Module:
        if id(layer) not in replaced:
            new: DropConnectLinear | DropConnectConv2d
            if isinstance(layer, nn.Linear):
                new = DropConnectLinear.from_module(layer, p, per_sample=per_sample)
            else:
                assert isinstance(layer, nn.Conv2d)
                new = DropConnectConv2d.from_module(layer, p, per_sample=per_sample)
            # Reuse the Parameter objects themselves, not copies: keeps optimizers and ties valid.
            for name, param in layer.named_parameters(recurse=False):
                setattr(new, name, param)
            replaced[id(layer)] = new
        return replaced[id(layer)]

    if isinstance(root, types):
        return twin(root)
    for parent in list(root.modules()):
        if isinstance(parent, nn.MultiheadAttention):
            continue
        # _modules, not named_children(): the latter hides a layer's second occurrence.
        for name, child in list(parent._modules.items()):
            if child is not None and isinstance(child, types):
                setattr(parent, name, twin(child))
    return root


_BERNOULLI_CALL = spec_from_call("bernoulli")


def _drop_connect_call_spec(fn: Callable[..., Tensor]) -> CallSpecFn:
    """Registry spec of one recorded call of ``fn``: Bernoulli with the call's ``p`` (see the
    module docstring), none when ``training`` is ``False``."""
    signature = inspect.signature(fn)

    def spec_fn(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> NoiseSpec | None:
        # p and training sit at positions 3 and 4, not where spec_from_call looks: bind first.
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        return _BERNOULLI_CALL(
            (), {"p": bound.arguments["p"], "training": bound.arguments["training"]}
        )

    return spec_fn


def _drop_connect_module_spec(module: nn.Module) -> NoiseSpec | None:
    assert isinstance(module, (DropConnectLinear, DropConnectConv2d))
    return bernoulli_spec(module.p)


register_stochastic(DropConnectLinear, _drop_connect_module_spec)
register_stochastic(DropConnectConv2d, _drop_connect_module_spec)
register_stochastic_function(drop_connect_linear, _drop_connect_call_spec(drop_connect_linear))
register_stochastic_function(drop_connect_conv2d, _drop_connect_call_spec(drop_connect_conv2d))
