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

ReLU6 (and ``hardtanh(x, 0, 6)`` / ``clamp(x, 0, 6)``) runs in int8 for any model, not just the zoo. torch.ao
would leave it as a float ``Clip`` between a DequantizeLinear and a QuantizeLinear in the ONNX graph
(it shares its input's observer and is not fused with the conv). Before prepare, ``_fold_relu6`` rewrites
the traced graph: a ReLU6 directly after a conv (+BN) or linear becomes a ReLU fused with that layer
(ConvReLU / ConvBnReLU / LinearReLU), and the layer's output observer is fixed to scale 6/255, zero point
0: the uint8 grid covers exactly [0, 6], so saturating at 255 *is* the clamp at 6 (exact ReLU6 on the
int8 grid, and in QAT the fake-quant's straight-through mask is ReLU6's gradient). A ReLU6 anywhere else
gets the same fixed [0, 6] output observer and, at conversion, becomes a plain requantization to that
grid (dequantize → quantize_per_tensor, saturating), so no float op remains. The full 8-bit range on
these activations is deliberate even in the x86 preset (which otherwise uses 7 bits): with 7 bits the
grid would reach 12 and the clamp would be lost; on x86 CPUs without VNNI, u8×s8 pair sums of the next
conv can then saturate int16 in fbgemm / MLAS, a rare, small error (the parity checks measure it).
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.ao.nn import quantized as nnq
from torch.ao.quantization import (
    FakeQuantize,
    FakeQuantizeBase,
    FixedQParamsFakeQuantize,
    FixedQParamsObserver,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    MovingAveragePerChannelMinMaxObserver,
    ObserverBase,
    PerChannelMinMaxObserver,
    QConfig,
    QConfigMapping,
)
from torch.ao.quantization.backend_config import (
    BackendConfig,
    BackendPatternConfig,
    DTypeConfig,
    ObservationType,
    get_native_backend_config,
)
from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx, prepare_qat_fx

from edge_qmul.config import scope_blocks
from edge_qmul.errors import CheckpointError, ConfigError, ExportError


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


FLOAT_MODULES = ("normalize",)  # stay in float: the graph quantizes right after the normalisation

# ReLU6's range on the full uint8 grid: 255 * RELU6_SCALE == 6.0 in float32 (what onnxruntime computes in)
RELU6_SCALE = float(torch.tensor(6.0 / 255.0, dtype=torch.float32))
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BNS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _mapping(backend: Backend, qat: bool) -> QConfigMapping:
    mapping = QConfigMapping().set_global(_qconfig(backend, qat))
    for name in FLOAT_MODULES:
        mapping.set_module_name(name, None)
    return mapping


def _relu6_activation(qat: bool) -> Any:
    """The fixed [0, 6] output observer (PTQ) or fake-quant (QAT) of a folded ReLU6."""
    observer = FixedQParamsObserver.with_args(
        scale=RELU6_SCALE, zero_point=0, dtype=torch.quint8, qscheme=torch.per_tensor_affine, quant_min=0,
        quant_max=255,
    )
    return FixedQParamsFakeQuantize.with_args(observer=observer) if qat else observer


@functools.lru_cache(maxsize=1)
def _backend_config() -> BackendConfig:
    """torch.ao's native patterns, except that a (standalone) F.relu6 gets its own output observer instead
    of sharing its input's: the fixed [0, 6] one that ``_fix_relu6_ranges`` puts there."""
    relu6 = (
        BackendPatternConfig(F.relu6)
        .set_observation_type(ObservationType.OUTPUT_USE_DIFFERENT_OBSERVER_AS_INPUT)
        .set_dtype_configs([DTypeConfig(input_dtype=torch.quint8, output_dtype=torch.quint8)])
    )
    return get_native_backend_config().set_backend_pattern_config(relu6)


def _is_relu6(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """nn.ReLU6, F.relu6, nn.Hardtanh(0, 6), F.hardtanh(x, 0, 6) or clamp(x, 0, 6) / clip(x, 0, 6)."""

    def arg(i: int, key: str, default: Any = None) -> Any:
        return node.args[i] if len(node.args) > i else node.kwargs.get(key, default)

    if node.op == "call_module":
        mod = modules.get(str(node.target))
        if isinstance(mod, nn.Hardtanh):  # nn.ReLU6 is a Hardtanh(0, 6)
            return (mod.min_val, mod.max_val) == (0.0, 6.0)
        return False
    if node.op == "call_function":
        if node.target is F.relu6:
            return True
        if node.target in (F.hardtanh, F.hardtanh_):
            return (arg(1, "min_val", -1.0), arg(2, "max_val", 1.0)) == (0.0, 6.0)
        if node.target in (torch.clamp, torch.clip, torch.clamp_, torch.clip_):
            return (arg(1, "min"), arg(2, "max")) == (0.0, 6.0)
    if node.op == "call_method" and node.target in ("clamp", "clamp_", "clip", "clip_"):
        return (arg(1, "min"), arg(2, "max")) == (0.0, 6.0)
    return False


class _Tracer(fx.Tracer):
    """The standard tracer, keeping the float modules as leaves so that, when prepare_fx re-traces the
    rewritten graph, their ops are still scoped under their name (and so still get qconfig None)."""

    def __init__(self, leaves: Iterable[str]) -> None:
        super().__init__()
        self.leaves = set(leaves)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return module_qualified_name in self.leaves or super().is_leaf_module(m, module_qualified_name)


def _fold_relu6(model: nn.Module) -> tuple[nn.Module, list[str]]:
    """Rewrite every ReLU6 of ``model``'s traced graph (see the module docstring).

    Returns the model to prepare (``model`` itself when it has no ReLU6, so other models prepare exactly
    as before) and the names of the conv / linear layers whose ReLU6 was folded: their output observer
    must be the fixed [0, 6] one. A ReLU6 that does not directly follow a single-use conv (+BN) or linear
    becomes ``F.relu6``, which ``_backend_config`` observes on its own fixed [0, 6] grid.
    """
    gm = fx.GraphModule(model, _Tracer(FLOAT_MODULES).trace(model), type(model).__name__)
    modules = dict(gm.named_modules())
    if not any(_is_relu6(n, modules) for n in gm.graph.nodes):
        return model, []
    calls: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            calls[str(n.target)] = calls.get(str(n.target), 0) + 1

    def only_use(n: Any, kinds: tuple[type[nn.Module], ...]) -> bool:
        # fusable: a module called once whose output feeds only the next op
        return (isinstance(n, fx.Node) and n.op == "call_module" and isinstance(modules[str(n.target)], kinds)
                and len(n.users) == 1 and calls[str(n.target)] == 1)

    fused: list[str] = []
    for node in list(gm.graph.nodes):
        if not _is_relu6(node, modules):
            continue
        x = node.args[0]
        layer = None
        if only_use(x, (*_CONVS, nn.Linear)):
            layer = x
        elif only_use(x, _BNS) and only_use(x.args[0], _CONVS):  # type: ignore[union-attr]
            layer = x.args[0]  # type: ignore[union-attr]
        with gm.graph.inserting_after(node):
            new = gm.graph.call_function(F.relu if layer is not None else F.relu6, (x,))
        if layer is not None:
            fused.append(str(layer.target))  # type: ignore[union-attr]
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm, fused


def _fix_relu6_ranges(observed: fx.GraphModule, fused: list[str], qat: bool) -> None:
    """Replace the output observer (fake-quant) of each folded layer and each standalone F.relu6 with the
    fixed [0, 6] one. Done on the prepared graph rather than through the qconfig, because a qconfig's
    activation would also observe the layer's *input* when nothing upstream does (the first conv after the
    float normalisation), clamping the input to [0, 6]. Observers that a shape op shares with it (same
    instance under another name) are replaced too, so the two stay one."""
    modules = dict(observed.named_modules())
    outputs = []
    for node in observed.graph.nodes:
        if (node.op == "call_module" and str(node.target) in fused) or (
            node.op == "call_function" and node.target is F.relu6
        ):
            post = [u for u in node.users if u.op == "call_module" and _is_observer(modules[str(u.target)])]
            if post:
                outputs.append(modules[str(post[0].target)])
    for old in outputs:
        new = _relu6_activation(qat)()
        for name, mod in list(observed.named_children()):
            if mod is old:
                setattr(observed, name, new)


def _is_observer(mod: nn.Module) -> bool:
    return isinstance(mod, (ObserverBase, FakeQuantizeBase))


def _prepare(model: nn.Module, mapping: QConfigMapping, example: torch.Tensor, qat: bool) -> fx.GraphModule:
    """prepare_fx / prepare_qat_fx with each ReLU6 folded into a fixed [0, 6] int8 output range."""
    traced, fused = _fold_relu6(model)
    prepare = prepare_qat_fx if qat else prepare_fx
    observed = prepare(traced, mapping, example_inputs=(example,), backend_config=_backend_config())
    _fix_relu6_ranges(observed, fused, qat)
    return observed


def _convert(observed: fx.GraphModule) -> fx.GraphModule:
    """convert_fx, after dropping each standalone F.relu6 whose output observer is the fixed [0, 6] one:
    that grid's saturation is the clamp, so the converted graph requantizes (dequantize →
    quantize_per_tensor) instead of running relu6 in float, or on its input's grid. Mutates ``observed``."""
    modules = dict(observed.named_modules())
    for node in list(observed.graph.nodes):
        if not (node.op == "call_function" and node.target is F.relu6 and len(node.users) == 1):
            continue
        (user,) = node.users
        post = modules.get(str(user.target)) if user.op == "call_module" else None
        if isinstance(post, (FixedQParamsObserver, FixedQParamsFakeQuantize)) and float(
            post.calculate_qparams()[0]
        ) == RELU6_SCALE:
            node.replace_all_uses_with(node.args[0])  # type: ignore[arg-type]
            observed.graph.erase_node(node)
    observed.graph.lint()
    observed.recompile()
    return convert_fx(observed, backend_config=_backend_config())


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
    observed = _prepare(model, _mapping(backend, qat=False), calib[0][:1], qat=False)
    _calibrate(observed, calib)
    return _convert(observed)


def prepare_qat(float_model: nn.Module, backend_name: str, example: torch.Tensor) -> nn.Module:
    """The QAT (fake-quant) copy, BatchNorm folded into its convs; observers not yet calibrated."""
    backend = get_backend(backend_name)
    _set_engine(backend)
    model = copy.deepcopy(float_model).train()
    return _prepare(model, _mapping(backend, qat=True), example[:1], qat=True)


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
    mapping = QConfigMapping().set_global(QConfig(activation=act, weight=weight))
    for name in FLOAT_MODULES:
        mapping.set_module_name(name, None)
    batches = list(calib)
    model = copy.deepcopy(float_model).eval()
    prepared = _prepare(model, mapping, batches[0], qat=False)
    _calibrate(prepared, batches)
    return _convert(prepared)


def convert(qat: nn.Module) -> nn.Module:
    """Convert a copy of the QAT model to int8; the QAT model stays trainable."""
    was_training = qat.training
    model = copy.deepcopy(qat).eval()
    for mod in model.modules():
        if isinstance(mod, FakeQuantize):
            mod.disable_observer()  # conversion must not re-observe
    if not isinstance(model, fx.GraphModule):
        raise ConfigError("only FX-prepared models can be converted", "prepare the model with prepare_qat")
    int8 = _convert(model)
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


def _split_at(gm: fx.GraphModule, kind: type[nn.Module], head: str) -> tuple[fx.GraphModule, fx.Graph]:
    """Split ``gm`` at the input of its head: the module named ``head``, or (``head=""``) the last ``kind``
    module of the graph. Returns (suffix module, prefix graph without its output node)."""
    nodes = list(gm.graph.nodes)
    linears = [n for n in nodes if n.op == "call_module" and isinstance(gm.get_submodule(str(n.target)), kind)]
    if head:
        found = [n for n in nodes if n.op == "call_module" and str(n.target) == head]
        if not found:
            names = ", ".join(str(n.target) for n in linears) or "none"
            raise ConfigError(f"the quantized graph has no module named {head!r} to split at",
                              f"name one of its Linear layers as the head: {names}")
        first = found[0]
    elif linears:
        first = linears[-1]
    else:
        raise ConfigError("the model has no Linear classifier to split at", "use layers='all'")
    cut = first.args[0]
    if not isinstance(cut, fx.Node):
        raise ConfigError(f"the head {first.target!r} does not read a graph value", "use layers='all'")
    prefix = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in nodes:
        env[node] = prefix.node_copy(node, lambda n: env[n])
        if node is cut:
            break
    suffix = fx.Graph()
    env_s = {cut: suffix.placeholder("features")}
    for node in nodes[nodes.index(cut) + 1 :]:
        if node.op == "placeholder":
            continue
        try:
            env_s[node] = suffix.node_copy(node, lambda n: env_s[n])
        except KeyError as err:
            raise ConfigError(f"the head {first.target!r} is not a cut point of the graph: {node.name!r} after it "
                              "also reads earlier activations",
                              "name a head whose input is the only value the rest of the model reads "
                              "(the final Linear after pooling / flatten), or use layers='all'") from err
    return fx.GraphModule(gm, suffix), prefix  # prefix graph gets its output node from the caller


def _module(root: nn.Module, graph: fx.Graph, out: fx.Node) -> fx.GraphModule:
    graph.output(out)
    gm = fx.GraphModule(root, graph)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm


def split_at_classifier(qat: nn.Module, head: str = "") -> tuple[fx.GraphModule, fx.GraphModule]:
    """Split a QAT model at the input of its head (the module named ``head``, by default the last Linear
    layer): ``head(features(x)) == qat(x)``.

    The cut is after that input's fake-quant, so with activation observers frozen the features are
    what the int8 classifier sees. ``head`` shares its modules (and so its parameters) with ``qat``:
    training the head trains the QAT copy's classifier in place.
    """
    if not isinstance(qat, fx.GraphModule):
        raise ConfigError("the model is not an FX graph", "prepare it with prepare_qat first")
    suffix, prefix = _split_at(qat, nn.Linear, head)
    return _module(qat, prefix, list(prefix.nodes)[-1]), suffix


def block_key(name: str) -> str:
    """The block a module belongs to: its top-level child, or one element of a top-level Sequential /
    ModuleList (``layers.2.conv1`` -> ``layers.2``, ``features.3.conv.0`` -> ``features.3``, ``fc`` -> ``fc``)."""
    parts = name.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 and parts[1].isdigit() else parts[0]


def blocks(qat: nn.Module, head: str = "") -> tuple[list[tuple[str, list[nn.Parameter]]], list[nn.Parameter]]:
    """The QAT graph's trainable blocks before its head, in the order the graph runs them, and the head's
    parameters (``split_at_classifier``'s suffix: the head module and everything after it)."""
    if not isinstance(qat, fx.GraphModule):
        raise ConfigError("the model is not an FX graph", "prepare it with prepare_qat first")
    _, suffix = split_at_classifier(qat, head)
    head_params = list(suffix.parameters())
    in_head = {id(p) for p in head_params}
    order: dict[str, list[nn.Parameter]] = {}
    for node in qat.graph.nodes:
        if node.op != "call_module":
            continue
        for p in qat.get_submodule(str(node.target)).parameters():
            if id(p) not in in_head and not any(p is q for q in order.get(block_key(str(node.target)), [])):
                order.setdefault(block_key(str(node.target)), []).append(p)
    return list(order.items()), head_params


def scope_parameters(qat: nn.Module, layers: str, head: str = "") -> list[nn.Parameter]:
    """The parameters a ``layers`` scope trains: "all", or the head plus its K preceding blocks
    ("last-K-blocks"; K larger than the number of blocks is every block)."""
    k = scope_blocks(layers)
    if k is None:
        raise ConfigError(f"unknown layers scope {layers!r}", "use 'classifier', 'last-K-blocks' or 'all'")
    if k < 0:
        return list(qat.parameters())
    before, head_params = blocks(qat, head)
    return [p for _, ps in before[max(0, len(before) - k):] for p in ps] + head_params


def int8_features(qat: nn.Module, dequantize: bool = True, head: str = "") -> fx.GraphModule:
    """The converted int8 model up to its head (``split_at_classifier``), returning the features it reads.

    These are exactly the values the deployed int8 classifier reads, and int8 kernels compute them
    ~10x faster than the fake-quant graph (measured on the small CNN, 2 cores). With
    ``dequantize=False`` the output is the quantized tensor itself (uint8 values + scale/zero point),
    which is how the pipeline caches them compactly.
    """
    return features_of_int8(convert(qat), dequantize, head)


def features_of_int8(int8: nn.Module, dequantize: bool = True, head: str = "") -> fx.GraphModule:
    """``int8_features`` of an already converted int8 model (``convert``): e.g. the model a run exports, whose
    feature extractor ships beside it (``features.onnx``) for devices that unlearn its head with the server."""
    if not isinstance(int8, fx.GraphModule):
        raise ConfigError("the int8 model is not an FX graph", "convert a model prepared with prepare_qat")
    _, prefix = _split_at(int8, nnq.Linear, head)
    out = list(prefix.nodes)[-1]
    if dequantize:
        with prefix.inserting_after(out):
            out = prefix.call_method("dequantize", (out,))
    return _module(int8, prefix, out)


def float_layers(int8: nn.Module) -> list[tuple[str, str]]:
    """(name, kind) of every op of a converted model that computes in float inside its int8 region: after a
    ``dequantize`` and before a later ``quantize_per_tensor``. Such a layer has no int8 kernel in the chosen
    backend (convert_fx leaves it in float between a dequantize and a re-quantize)."""
    if not isinstance(int8, fx.GraphModule):
        raise ConfigError("only converted FX models can be checked", "quantize the model with quantize_ptq")
    nodes = list(int8.graph.nodes)

    def is_dequantize(n: fx.Node) -> bool:
        return (n.op == "call_method" and n.target == "dequantize") or (
            n.op == "call_function" and n.target is torch.dequantize)

    def is_quantize(n: fx.Node) -> bool:
        return n.op == "call_function" and n.target in (torch.quantize_per_tensor, torch.quantize_per_channel)

    after_dq: set[fx.Node] = set()
    for n in nodes:  # topological order: a node is downstream if any input is a dequantize or downstream
        if any(is_dequantize(a) or a in after_dq for a in n.all_input_nodes):
            after_dq.add(n)
    before_q: set[fx.Node] = set()
    for n in reversed(nodes):
        if any(is_quantize(u) or u in before_q for u in n.users):
            before_q.add(n)
    found = []
    for n in nodes:
        if n not in after_dq or n not in before_q or is_dequantize(n) or is_quantize(n) or n.op == "get_attr":
            continue
        if n.op == "call_module":
            module = int8.get_submodule(str(n.target))
            if not isinstance(module, _SHAPE_MODULES):
                found.append((str(n.target), type(module).__name__))
        elif getattr(n.target, "__name__", str(n.target)) not in _SHAPE_OPS:
            found.append((n.name, getattr(n.target, "__name__", str(n.target))))
    return found


# Ops that only move values (no arithmetic): harmless between a dequantize and a quantize, and onnxruntime
# runs them on the quantized tensor after its QDQ clean-up.
_SHAPE_MODULES = (nn.Flatten, nn.Unflatten, nn.Identity, nn.Dropout)
_SHAPE_OPS = {"flatten", "reshape", "view", "permute", "transpose", "squeeze", "unsqueeze", "contiguous", "size",
              "getitem", "detach", "clone", "chunk", "split"}


def int8_and_qat(
    float_model: nn.Module, calib: list[torch.Tensor], backend_name: str, what: str = "the model"
) -> tuple[nn.Module, nn.Module]:
    """The deployed int8 model (PTQ) and its QAT copy calibrated on the same batches: what every stage that
    quantizes a float model makes. A layer left in float inside the int8 model (no int8 kernel in the backend)
    is refused, named (``ExportError``, exit 8)."""
    int8 = quantize_ptq(float_model, calib, backend_name)
    islands = float_layers(int8)
    if islands:
        named = ", ".join(f"{name} ({kind})" for name, kind in islands[:6])
        raise ExportError(f"{what}: {len(islands)} op(s) have no int8 kernel in the {backend_name} backend and "
                          f"would run in float inside the int8 model: {named}",
                          "replace them with layers that quantize (Conv, Linear, ReLU, ReLU6, add, pooling), "
                          "or move them before the model's first layer / after its head")
    qat = prepare_qat(float_model, backend_name, calib[0])
    calibrate_qat(qat, calib)
    return int8, qat
