"""The one module that talks to torch.ao.quantization (FX graph mode).

PyTorch has announced that torch.ao.quantization will give way to torchao's pt2e flow; keeping every
call here means a backend swap touches one file.

Two artefacts come out of a float model:

* the **deployed int8 model**: post-training quantization (prepare_fx → calibrate → convert_fx);
* the **QAT copy**: prepare_qat_fx with fake-quant modules, calibrated on the same batches so that,
  before any unlearning, ``convert(qat)`` is the same int8 model. Unlearning trains this copy.

Both use the same observer family (min/max for activations, per-channel or per-tensor min/max for
weights), which is what makes the two int8 models agree. Presets:

* ``x86``: uint8 activations with range reduced to 7 bits (fbgemm/onednn accumulate in 16 bits on
  CPUs without VNNI), int8 per-channel symmetric weights — the combination onnxruntime fuses into
  QLinearConv / integer kernels.
* ``qnnpack`` (ARM boards): uint8 activations, full 8-bit range, int8 per-tensor symmetric weights.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn
from torch.ao.nn import quantized as nnq
from torch.ao.quantization import (
    FakeQuantize,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    MovingAveragePerChannelMinMaxObserver,
    PerChannelMinMaxObserver,
    QConfig,
    QConfigMapping,
)
from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx, prepare_qat_fx

from edge_qmul.errors import CheckpointError, ConfigError


@dataclass(frozen=True)
class Backend:
    name: str
    engine: str  # torch.backends.quantized.engine
    act_quant_max: int  # uint8 activations: 127 = reduced range, 255 = full range
    per_channel: bool


BACKENDS: dict[str, Backend] = {
    "x86": Backend("x86", "x86", act_quant_max=127, per_channel=True),
    "qnnpack": Backend("qnnpack", "qnnpack", act_quant_max=255, per_channel=False),
}


def get_backend(name: str) -> Backend:
    if name not in BACKENDS:
        raise ConfigError(
            f"unknown quantization backend {name!r}", f"choose one of: {', '.join(BACKENDS)}"
        )
    return BACKENDS[name]


def _qconfig(backend: Backend, qat: bool) -> QConfig:
    act_args: dict[str, Any] = dict(
        dtype=torch.quint8, qscheme=torch.per_tensor_affine, quant_min=0, quant_max=backend.act_quant_max
    )
    if backend.per_channel:
        w_args: dict[str, Any] = dict(
            dtype=torch.qint8, qscheme=torch.per_channel_symmetric, quant_min=-128, quant_max=127, ch_axis=0
        )
        w_ptq: type[MinMaxObserver] = PerChannelMinMaxObserver
        w_qat: type[MinMaxObserver] = MovingAveragePerChannelMinMaxObserver
    else:
        w_args = dict(dtype=torch.qint8, qscheme=torch.per_tensor_symmetric, quant_min=-128, quant_max=127)
        w_ptq, w_qat = MinMaxObserver, MovingAverageMinMaxObserver
    if not qat:
        return QConfig(activation=MinMaxObserver.with_args(**act_args), weight=w_ptq.with_args(**w_args))
    # Activation ranges come from calibration and are then frozen (see set_trainable); weights keep
    # a moving-average range so the grid follows them while they are trained.
    return QConfig(
        activation=FakeQuantize.with_args(observer=MinMaxObserver, **act_args),
        weight=FakeQuantize.with_args(observer=w_qat, **w_args),
    )


def _mapping(backend: Backend, qat: bool) -> QConfigMapping:
    # The normalisation layer stays in float: the graph quantizes right after it.
    return QConfigMapping().set_global(_qconfig(backend, qat)).set_module_name("normalize", None)


def _set_engine(backend: Backend) -> None:
    if backend.engine not in torch.backends.quantized.supported_engines:
        raise ConfigError(
            f"quantization engine {backend.engine!r} is not available in this torch build",
            f"use one of: {', '.join(torch.backends.quantized.supported_engines)}",
        )
    torch.backends.quantized.engine = backend.engine


@torch.no_grad()
def _calibrate(model: nn.Module, batches: Iterable[torch.Tensor]) -> None:
    for x in batches:
        model(x)


def quantize_ptq(float_model: nn.Module, calib: Iterable[torch.Tensor], backend_name: str) -> nn.Module:
    """Post-training quantization: returns a converted int8 GraphModule; ``float_model`` is untouched."""
    backend = get_backend(backend_name)
    _set_engine(backend)
    calib = list(calib)
    model = copy.deepcopy(float_model).eval()
    observed = prepare_fx(model, _mapping(backend, qat=False), example_inputs=(calib[0][:1],))
    _calibrate(observed, calib)
    return convert_fx(observed)


def prepare_qat(float_model: nn.Module, backend_name: str, example: torch.Tensor) -> nn.Module:
    """The QAT (fake-quant) copy, BatchNorm folded into its convs; observers not yet calibrated."""
    backend = get_backend(backend_name)
    _set_engine(backend)
    model = copy.deepcopy(float_model).train()
    return prepare_qat_fx(model, _mapping(backend, qat=True), example_inputs=(example[:1],))


def calibrate_qat(qat: nn.Module, calib: Iterable[torch.Tensor]) -> None:
    """Populate the QAT copy's observers on the PTQ calibration batches (eval mode: no BN update)."""
    qat.eval()
    _calibrate(qat, calib)


def set_trainable(qat: nn.Module, *, observe_activations: bool = False, update_bn: bool = False) -> None:
    """Put the QAT copy in training mode for unlearning.

    By default activation ranges stay as calibrated (the deployed grid) and BatchNorm running
    statistics are frozen, so small updates do not shift every layer's quantization.
    """
    qat.train()
    for name, mod in qat.named_modules():
        if isinstance(mod, FakeQuantize):
            is_weight = name.endswith("weight_fake_quant")
            if is_weight or observe_activations:
                mod.enable_observer()
            else:
                mod.disable_observer()
        if hasattr(mod, "freeze_bn_stats") and hasattr(mod, "update_bn_stats"):
            (mod.update_bn_stats if update_bn else mod.freeze_bn_stats)()


def quantize_ptq_weights(
    float_model: nn.Module, calib: Iterable[torch.Tensor], weight_bits: int, per_channel: bool
) -> nn.Module:
    """PTQ with the x86 activation preset and ``weight_bits``-bit symmetric weights (per channel or per
    tensor). Fewer than 8 bits are emulated in the int8 container with a reduced range (4 bits: -8..7),
    which is how the privacy ranking compares weight precisions on the same kernels."""
    if not 2 <= weight_bits <= 8:
        raise ConfigError(f"weight_bits={weight_bits} is not supported", "use 2..8")
    backend = BACKENDS["x86"]
    _set_engine(backend)
    lo, hi = -(2 ** (weight_bits - 1)), 2 ** (weight_bits - 1) - 1
    act = MinMaxObserver.with_args(dtype=torch.quint8, qscheme=torch.per_tensor_affine, quant_min=0,
                                   quant_max=backend.act_quant_max)
    if per_channel:
        weight = PerChannelMinMaxObserver.with_args(dtype=torch.qint8, qscheme=torch.per_channel_symmetric,
                                                    quant_min=lo, quant_max=hi, ch_axis=0)
    else:
        weight = MinMaxObserver.with_args(dtype=torch.qint8, qscheme=torch.per_tensor_symmetric, quant_min=lo,
                                          quant_max=hi)
    mapping = QConfigMapping().set_global(QConfig(activation=act, weight=weight)).set_module_name("normalize", None)
    batches = list(calib)
    model = copy.deepcopy(float_model).eval()
    prepared = prepare_fx(model, mapping, example_inputs=(batches[0],))
    _calibrate(prepared, batches)
    return convert_fx(prepared)


def convert(qat: nn.Module) -> nn.Module:
    """Convert a copy of the QAT model to int8; the QAT model stays trainable."""
    was_training = qat.training
    model = copy.deepcopy(qat).eval()
    for mod in model.modules():
        if isinstance(mod, FakeQuantize):
            mod.disable_observer()  # conversion must not re-observe
    if not isinstance(model, fx.GraphModule):
        raise ConfigError("only FX-prepared models can be converted", "prepare the model with prepare_qat")
    int8 = convert_fx(model)
    qat.train(was_training)
    return int8


@torch.no_grad()
def refresh_weight_ranges(module: nn.Module) -> None:
    """Set every weight fake-quant's observed range, scale and zero point from its layer's current weights.

    For weights set from outside the training loop (e.g. an average of several devices' weights), where
    the observer's running range no longer describes the weights it quantizes.
    """
    for mod in module.modules():
        fq = getattr(mod, "weight_fake_quant", None)
        weight = getattr(mod, "weight", None)
        if not isinstance(fq, FakeQuantize) or not isinstance(weight, torch.Tensor):
            continue
        w = weight.detach()
        obs: Any = fq.activation_post_process
        if getattr(obs, "ch_axis", None) is not None and obs.qscheme in (torch.per_channel_symmetric,
                                                                           torch.per_channel_affine):
            dims = tuple(d for d in range(w.dim()) if d != obs.ch_axis)
            lo, hi = w.amin(dim=dims), w.amax(dim=dims)
        else:
            lo, hi = w.min(), w.max()
        obs.min_val.resize_(lo.shape).copy_(lo)
        obs.max_val.resize_(hi.shape).copy_(hi)
        scale, zero_point = obs.calculate_qparams()
        fq.scale.resize_(scale.shape).copy_(scale)
        fq.zero_point.resize_(zero_point.shape).copy_(zero_point)


def save_qat_state(qat: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in qat.state_dict().items()}


def restore_qat(
    float_model: nn.Module, backend_name: str, example: torch.Tensor, state: dict[str, torch.Tensor]
) -> nn.Module:
    """Rebuild the QAT copy by re-preparing ``float_model`` and loading a saved state_dict exactly."""
    qat = prepare_qat(float_model, backend_name, example)
    # Observers register min/max buffers lazily with shape [0]; size them before loading.
    own = qat.state_dict()
    for key, value in state.items():
        if key in own and own[key].shape != value.shape:
            mod_name, _, buf = key.rpartition(".")
            getattr(qat.get_submodule(mod_name), buf).resize_(value.shape)
    try:
        qat.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise CheckpointError(
            f"QAT state does not match the model it is restored into: {str(err).splitlines()[0]}",
            "the checkpoint was made with another model or backend; re-run `edge-qmul quantize`",
        ) from err
    return qat


def _split_at_first(gm: fx.GraphModule, kind: type[nn.Module]) -> tuple[fx.GraphModule, fx.GraphModule, fx.Graph]:
    """Split ``gm`` at the input of its first ``kind`` module: (prefix, suffix, prefix graph)."""
    nodes = list(gm.graph.nodes)
    first = next(
        (n for n in nodes if n.op == "call_module" and isinstance(gm.get_submodule(str(n.target)), kind)), None
    )
    cut = first.args[0] if first is not None else None
    if first is None or not isinstance(cut, fx.Node):
        raise ConfigError("the model has no Linear classifier to split at", "use layers='all'")
    prefix = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in nodes:
        env[node] = prefix.node_copy(node, lambda n: env[n])
        if node is cut:
            break
    suffix = fx.Graph()
    env_s = {cut: suffix.placeholder("features")}
    for node in nodes[nodes.index(cut) + 1 :]:
        if node.op != "placeholder":
            env_s[node] = suffix.node_copy(node, lambda n: env_s[n])
    return gm, fx.GraphModule(gm, suffix), prefix  # prefix graph gets its output node from the caller


def _module(root: nn.Module, graph: fx.Graph, out: fx.Node) -> fx.GraphModule:
    graph.output(out)
    gm = fx.GraphModule(root, graph)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm


def split_at_classifier(qat: nn.Module) -> tuple[fx.GraphModule, fx.GraphModule]:
    """Split a QAT model at the input of its first Linear layer: ``head(features(x)) == qat(x)``.

    The cut is after that input's fake-quant, so with activation observers frozen the features are
    what the int8 classifier sees. ``head`` shares its modules (and so its parameters) with ``qat``:
    training the head trains the QAT copy's classifier in place.
    """
    if not isinstance(qat, fx.GraphModule):
        raise ConfigError("the model is not an FX graph", "prepare it with prepare_qat first")
    _, head, prefix = _split_at_first(qat, nn.Linear)
    return _module(qat, prefix, list(prefix.nodes)[-1]), head


def int8_features(qat: nn.Module, dequantize: bool = True) -> fx.GraphModule:
    """The converted int8 model up to its classifier, returning the features it reads.

    These are exactly the values the deployed int8 classifier reads, and int8 kernels compute them
    ~10x faster than the fake-quant graph (measured on the small CNN, 2 cores). With
    ``dequantize=False`` the output is the quantized tensor itself (uint8 values + scale/zero point),
    which is how the pipeline caches them compactly.
    """
    int8 = convert(qat)
    if not isinstance(int8, fx.GraphModule):
        raise ConfigError("conversion did not return an FX graph", "prepare the model with prepare_qat")
    _, _, prefix = _split_at_first(int8, nnq.Linear)
    out = list(prefix.nodes)[-1]
    if dequantize:
        with prefix.inserting_after(out):
            out = prefix.call_method("dequantize", (out,))
    return _module(int8, prefix, out)
