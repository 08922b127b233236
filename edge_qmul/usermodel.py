"""Models the user brings: ``FILE.py:FACTORY`` or ``package.module:FACTORY``, and their trained weights.

A factory is a callable returning an ``nn.Module``; it may take ``num_classes``, ``in_channels`` and
``image_size`` keyword arguments, which are passed when it declares them. The module is wrapped as
``UserModel(normalize, net)`` so that, like the built-in models, it takes pixels in [0, 1] and carries the
dataset normalisation inside its graph (``normalize`` stays in float; the int8 region starts after it).

Every way such a model can fail is checked before anything is written, with the module and the fix named:
a factory that cannot be found or does not return a module, an input shape the model rejects, an output
that is not ``[batch, classes]``, a model torch.fx cannot trace, a head that is not a Linear layer, and
weights whose keys or shapes do not match.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import sys
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from edge_qmul.errors import CheckpointError, ConfigError
from edge_qmul.models import ModelConfig, Normalize
from edge_qmul.train import load_tensors


class UserModel(nn.Module):
    """The user's network behind the dataset normalisation: ``net(normalize(pixels))``."""

    def __init__(self, normalize: Normalize, net: nn.Module) -> None:
        super().__init__()
        self.normalize = normalize
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(x))


def split_spec(spec: str) -> tuple[str, str]:
    where, _, factory = spec.rpartition(":")
    if not where or not factory.isidentifier():
        raise ConfigError(f"model {spec!r} is not FILE.py:FACTORY or package.module:FACTORY",
                          "name a callable that returns an nn.Module, e.g. --model my_net.py:build")
    return where, factory


def source_sha256(spec: str) -> str:
    """sha256 of FILE.py for a file spec ("" for a module spec: its package version pins it)."""
    where, _ = split_spec(spec)
    path = Path(where)
    if where.endswith(".py"):
        if not path.is_file():
            raise ConfigError(f"model file {path} does not exist", "pass --model FILE.py:FACTORY with an existing file")
        return hashlib.sha256(path.read_bytes()).hexdigest()
    return ""


def load_factory(spec: str) -> Any:
    where, name = split_spec(spec)
    if where.endswith(".py"):
        path = Path(where).resolve()
        if not path.is_file():
            raise ConfigError(f"model file {path} does not exist", "pass --model FILE.py:FACTORY with an existing file")
        module_name = f"edge_qmul_user_{hashlib.sha256(str(path).encode()).hexdigest()[:12]}"
        module_spec = importlib.util.spec_from_file_location(module_name, path)
        if module_spec is None or module_spec.loader is None:
            raise ConfigError(f"cannot import {path} as a Python module", "pass a .py file")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[module_name] = module  # dataclasses and pickling look modules up by name
        try:
            module_spec.loader.exec_module(module)
        except Exception as err:  # the user's module may raise anything while it is imported
            sys.modules.pop(module_name, None)
            raise ConfigError(f"importing {path} failed: {err.__class__.__name__}: {err}",
                              "fix the model file so that `python FILE.py` imports cleanly") from err
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as err:
            raise ConfigError(f"cannot import module {where!r} ({err})",
                              "install the package that defines the model, or pass FILE.py:FACTORY") from err
    factory = getattr(module, name, None)
    if not callable(factory):
        found = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_"))[:12]
        raise ConfigError(f"{where} has no callable {name!r}", f"callables found there: {', '.join(found) or 'none'}")
    return factory


def _call_factory(factory: Any, cfg: ModelConfig) -> nn.Module:
    offered = {"num_classes": cfg.num_classes, "in_channels": cfg.in_channels, "image_size": cfg.image_size}
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        params = {}  # type: ignore[assignment]
    takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    kwargs = {k: v for k, v in offered.items() if takes_all or k in params}
    try:
        net = factory(**kwargs)
    except Exception as err:  # the user's factory may raise anything
        raise ConfigError(f"model factory {cfg.name} failed: {err.__class__.__name__}: {err}",
                          "the factory may take num_classes, in_channels and image_size keyword arguments") from err
    if not isinstance(net, nn.Module):
        raise ConfigError(f"model factory {cfg.name} returned {type(net).__name__}, not an nn.Module",
                          "return the network (an nn.Module) from the factory")
    return net


def build_user_model(cfg: ModelConfig) -> nn.Module:
    """The user's network, wrapped with the normalisation; refuses a model file that changed since it was
    recorded (``cfg.source_sha256``)."""
    if cfg.source_sha256 and source_sha256(cfg.name) != cfg.source_sha256:
        raise CheckpointError(f"model file of {cfg.name} changed since this run recorded it",
                              "restore the file the run was made with, or start a new run with the new model")
    net = _call_factory(load_factory(cfg.name), cfg)
    return UserModel(Normalize(cfg.mean, cfg.std), net)


def head_name(model: nn.Module, head: str = "") -> str:
    """The trainable head's qualified module name in ``model``: ``head`` (as named in the user's module, or
    qualified) or, by default, the last ``nn.Linear``."""
    modules = dict(model.named_modules())
    if head:
        for candidate in (head, f"net.{head}"):
            if candidate in modules:
                if not isinstance(modules[candidate], nn.Linear):
                    raise ConfigError(f"head {head!r} is a {type(modules[candidate]).__name__}, not an nn.Linear",
                                      "name the model's final Linear layer with --head")
                return candidate
        linears = [n.removeprefix("net.") for n, m in modules.items() if isinstance(m, nn.Linear)]
        raise ConfigError(f"the model has no module named {head!r}",
                          f"its Linear layers are: {', '.join(linears) or 'none'}")
    linears = [n for n, m in modules.items() if isinstance(m, nn.Linear)]
    if not linears:
        raise ConfigError("the model has no nn.Linear layer to use as the trainable head",
                          "end the model with an nn.Linear classifier, or use layers='all' methods only")
    return linears[-1]


class _NamingTracer(fx.Tracer):
    """A tracer that remembers the innermost module it was tracing when tracing failed."""

    def __init__(self) -> None:
        super().__init__()
        self.failed_in: str | None = None

    def call_module(self, m: nn.Module, forward: Any, args: Any, kwargs: Any) -> Any:
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:  # noted, then re-raised: the caller turns it into one error naming this module
            if self.failed_in is None:
                self.failed_in = self.path_of_module(m)
            raise


def check_model(model: nn.Module, cfg: ModelConfig) -> None:
    """Refuse, naming the module and the fix, a model that rejects the data's input shape, returns the wrong
    output shape, or cannot be traced by torch.fx (the int8 flow needs a graph)."""
    shape = (2, cfg.in_channels, cfg.image_size, cfg.image_size)
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(shape))
    except Exception as err:  # any failure of the user's forward on this shape
        raise ConfigError(f"model {cfg.name} rejects input of shape {list(shape)} "
                          f"({err.__class__.__name__}: {str(err).splitlines()[0][:200]})",
                          "the data are N x C x H x W with these sizes: build the model for them "
                          "(--image-size resizes an image folder; the factory receives in_channels and image_size)"
                          ) from err
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, cfg.num_classes):
        got = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError(f"model {cfg.name} returns {got} for a batch of 2, expected [2, {cfg.num_classes}] logits",
                          "return one logit per class (the factory receives num_classes)")
    check_traceable(model, cfg.name)


def check_traceable(model: nn.Module, name: str) -> None:
    """Refuse a model torch.fx cannot trace, naming the innermost module being traced when it failed."""
    tracer = _NamingTracer()
    try:
        tracer.trace(model)
    except Exception as err:  # torch.fx raises TraceError, TypeError, RuntimeError ... on untraceable code
        where = (tracer.failed_in or "").removeprefix("net.") or "the top-level forward"
        raise ConfigError(f"torch.fx cannot trace model {name}: in module {where!r}: "
                          f"{err.__class__.__name__}: {str(err).splitlines()[0][:200]}",
                          "int8 quantization needs a traceable graph: remove data-dependent control flow "
                          "(if/for on tensor values) from that module's forward, or wrap it with "
                          "torch.fx.wrap") from err


def load_user_weights(model: nn.Module, path: Path) -> None:
    """Load a float state_dict (``weights_only=True``) into ``model`` (a built-in model or a UserModel's
    ``net``), listing every missing, unexpected and mismatched key."""
    fix = "pass the state_dict saved from this model: torch.save(model.state_dict(), FILE)"
    state = load_tensors(path, "weights file", fix)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"weights file {path} does not hold a state_dict of tensors", fix)
    target = model.net if isinstance(model, UserModel) else model
    own = target.state_dict()
    if not isinstance(model, UserModel):  # built-in models carry their normalisation buffers themselves
        own = {k: v for k, v in own.items() if not k.startswith("normalize.")}
        state = {k: v for k, v in state.items() if not k.startswith("normalize.")}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = sorted(f"{k} {list(state[k].shape)} vs {list(own[k].shape)}"
                        for k in set(own) & set(state) if state[k].shape != own[k].shape)
    if missing or unexpected or mismatched:
        parts = [f"{label}: {', '.join(items[:8])}{' ...' if len(items) > 8 else ''}"
                 for label, items in (("missing", missing), ("unexpected", unexpected),
                                      ("shape (file vs model)", mismatched)) if items]
        raise CheckpointError(f"weights file {path} does not fit the model ({'; '.join(parts)})",
                              "save the weights of the same architecture (and --num-classes / image size)")
    target.load_state_dict(state, strict=False)
