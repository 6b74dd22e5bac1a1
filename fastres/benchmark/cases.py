"""What is benchmarked: layer cases derived from the architectures, and model-level steps.

Layer cases are not typed in by hand: the plain-PyTorch model is built on the meta device (no
memory, no arithmetic), traced with ``torch.fx``, and its shapes propagated; each conv is read
off the graph with the epilogue that follows it (BN, residual add, ReLU). Layers with the same
geometry are one case; the case remembers every layer that uses it.

Each case then offers callables for every system compared: eager PyTorch (conv2d → batch_norm
→ add → relu, cuDNN, channels_last), ``torch.compile`` of that same function (default and
max-autotune), and ``fastres.ops.conv_bn_relu`` on each available backend.
"""

from __future__ import annotations

import collections
import importlib
import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .. import backends as fastres_backends
from .roofline import DTYPE_BYTES, ConvShape, Epilogue, conv_flops, conv_min_bytes
from .timing import copies_to_defeat_l2

CL = torch.channels_last
MODEL_NAMES = ("resnet18", "resnet50", "resnext50_32x4d", "wide_resnet50_2", "preact_resnet50")
LAYER_MODEL_NAMES = ("resnet50", "resnext50_32x4d")
BACKEND_NAMES = tuple(n for n in fastres_backends.NAMES if n != "auto")

# ---------------------------------------------------------------------------------------------
# Building models
# ---------------------------------------------------------------------------------------------


def reference_model(name: str, **kwargs) -> nn.Module:
    """The plain-PyTorch model: torchvision's where it has one, else ``fastres.unfuse`` of ours."""
    try:
        import torchvision.models as tvm
    except ImportError:
        tvm = None
    if tvm is not None and hasattr(tvm, name):
        return getattr(tvm, name)(**kwargs)
    fused = fastres_model(name, **kwargs)
    unfuse = _fastres_attr("unfuse")
    return unfuse(fused)


def fastres_model(name: str, **kwargs) -> nn.Module:
    """fastres's own model if ``fastres.models`` has it, else ``fastres.fuse`` of torchvision's."""
    try:
        models = importlib.import_module("fastres.models")
    except ImportError:
        models = None
    if models is not None and hasattr(models, name):
        return getattr(models, name)(**kwargs)
    import torchvision.models as tvm  # needed only for the fuse path

    if not hasattr(tvm, name):
        raise RuntimeError(f"fastres.models has no {name!r} and torchvision has none to fuse")
    fuse = _fastres_attr("fuse")
    return fuse(getattr(tvm, name)(**kwargs))


def _fastres_attr(name: str):
    import fastres

    fn = getattr(fastres, name, None)
    if fn is None:
        try:
            fn = getattr(importlib.import_module("fastres.swap"), name)
        except (ImportError, AttributeError) as e:
            raise RuntimeError(f"fastres.{name} is not available in this build: {e}") from e
    return fn


# ---------------------------------------------------------------------------------------------
# Conv layers of a model
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConvLayer:
    """One conv of a model, as the traced graph shows it."""

    name: str
    shape: ConvShape
    epilogue: Epilogue
    has_bn: bool
    input_grad: bool  # False for the stem: nothing needs the gradient of the image


_ADDS = {operator.add, operator.iadd, torch.add}
_RELUS = {F.relu, torch.relu, torch.relu_}


def _is_relu(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), nn.ReLU)
    if node.op == "call_function":
        return node.target in _RELUS
    return node.op == "call_method" and node.target in ("relu", "relu_")


def _only_user(node: torch.fx.Node) -> torch.fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def conv_layers(model: nn.Module, batch: int, resolution: int) -> list[ConvLayer]:
    """Every ``nn.Conv2d`` of ``model`` in execution order, with its shape and epilogue.

    ``model`` should live on the meta device (build it under ``with torch.device("meta")``):
    shapes are propagated through the traced graph without allocating or computing anything.
    """
    from torch.fx.passes.shape_prop import ShapeProp

    # eval: training-mode BN refuses a batch of one at 1×1 spatial size; shapes are the same
    gm = torch.fx.symbolic_trace(model.eval())
    device = next(iter(model.parameters())).device
    ShapeProp(gm).propagate(torch.empty(batch, 3, resolution, resolution, device=device))
    layers = []
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        conv = gm.get_submodule(node.target)
        if not isinstance(conv, nn.Conv2d):
            continue
        inp = node.args[0]
        n, c, h, w = inp.meta["tensor_meta"].shape
        shape = ConvShape(
            n=n, c=c, h=h, w=w, k=conv.out_channels, r=conv.kernel_size[0],
            s=conv.kernel_size[1], stride=tuple(conv.stride), padding=tuple(conv.padding),
            dilation=tuple(conv.dilation), groups=conv.groups,
        )
        # follow conv → BN → (add) → (relu): the fused op's epilogue
        has_bn = residual = relu = False
        cur = _only_user(node)
        if cur is not None and cur.op == "call_module" and isinstance(
            gm.get_submodule(cur.target), nn.BatchNorm2d
        ):
            has_bn = True
            nxt = _only_user(cur)
            if nxt is not None and nxt.op == "call_function" and nxt.target in _ADDS:
                # ``out += identity``: the main path is the add's first operand; a conv on the
                # second (the downsample shortcut) ends at its BN, with no add or ReLU of its own
                if nxt.args[0] is cur:
                    residual = True
                    nxt = _only_user(nxt)
                else:
                    nxt = None
            relu = nxt is not None and _is_relu(gm, nxt)
        layers.append(
            ConvLayer(
                name=str(node.target), shape=shape, epilogue=Epilogue(residual, relu),
                has_bn=has_bn, input_grad=inp.op != "placeholder",
            )
        )
    return layers


def model_conv_layers(name: str, batch: int = 1, resolution: int = 224) -> list[ConvLayer]:
    """The conv layers of the named model, from its plain-PyTorch definition on the meta device."""
    with torch.device("meta"):
        model = reference_model(name)
    return conv_layers(model, batch, resolution)


@dataclass
class LayerCase:
    """One distinct conv geometry of a model, and the layers that share it."""

    model: str
    shape: ConvShape
    layers: list[ConvLayer] = field(default_factory=list)

    @property
    def epilogue(self) -> Epilogue:
        """The most common epilogue among the layers (ties: the one with the residual add)."""
        counts = collections.Counter(layer.epilogue for layer in self.layers)
        return max(counts, key=lambda e: (counts[e], e.residual, e.relu))

    @property
    def input_grad(self) -> bool:
        return any(layer.input_grad for layer in self.layers)

    @property
    def id(self) -> str:
        s = self.shape
        g = f"g{s.groups}" if s.groups > 1 else ""
        return (f"{self.model}-c{s.c}k{s.k}-{s.r}x{s.s}s{s.stride[0]}{g}-{s.h}x{s.w}-"
                f"{self.epilogue.label().replace('+', '')}")

    def to_dict(self) -> dict:
        return {
            "id": self.id,
            "model": self.model,
            "shape": self.shape.__dict__ | {"out_hw": self.shape.out_hw},
            "label": self.shape.label(),
            "epilogue": self.epilogue.label(),
            "uses": [f"{layer.name} ({layer.epilogue.label()})" for layer in self.layers],
        }


def distinct_layer_cases(layers: Sequence[ConvLayer], model: str) -> list[LayerCase]:
    """Group layers by geometry (batch size aside), in order of first appearance."""
    cases: dict[tuple, LayerCase] = {}
    for layer in layers:
        key = layer.shape.key()
        if key not in cases:
            cases[key] = LayerCase(model=model, shape=layer.shape)
        cases[key].layers.append(layer)
    return list(cases.values())


def layer_cases(name: str, batch: int, resolution: int) -> list[LayerCase]:
    return distinct_layer_cases(model_conv_layers(name, batch, resolution), name)


def quick_layer_cases(cases: Sequence[LayerCase]) -> list[LayerCase]:
    """Two representative cases: the first 3×3 conv, and the first conv with a residual add."""
    picked: list[LayerCase] = []
    for want in (lambda c: c.shape.r == 3, lambda c: c.epilogue.residual):
        for case in cases:
            if want(case) and case not in picked:
                picked.append(case)
                break
    return picked or list(cases[:1])


# ---------------------------------------------------------------------------------------------
# Roofline of a whole model
# ---------------------------------------------------------------------------------------------


def model_roofline(layers: Sequence[ConvLayer], *, training: bool, dtype: torch.dtype,
                   batch: int) -> dict:
    """Per-image FLOPs and bytes of the conv layers at batch ``batch``, layer by layer.

    Weights are read once per batch, so their bytes per image shrink as the batch grows: the
    figures are computed for the whole batch and divided by it. :func:`roofline_img_s` turns
    them into the per-layer roofline bound once the ceilings are known.
    """
    nbytes = DTYPE_BYTES[dtype]
    per_layer = []
    for layer in layers:
        full = layer.shape.with_batch(batch)
        per_layer.append((
            conv_flops(full, training=training, input_grad=layer.input_grad) / batch,
            conv_min_bytes(full, layer.epilogue, nbytes, training=training,
                           input_grad=layer.input_grad) / batch,
        ))
    return {
        "flops_per_image": sum(f for f, _ in per_layer),
        "bytes_per_image": sum(b for _, b in per_layer),
        "per_layer": per_layer,
    }


def roofline_img_s(roofline: dict, ceilings) -> float:
    """Images per second if every conv layer ran at its roofline bound, one after another."""
    seconds = sum(ceilings.bound_seconds(f, b) for f, b in roofline["per_layer"])
    return 1.0 / seconds


# ---------------------------------------------------------------------------------------------
# Layer-level systems
# ---------------------------------------------------------------------------------------------


def _eager_conv_bn_relu(x, w, gamma, beta, mean, var, residual, *, training, stride, padding,
                        dilation, groups, relu):
    y = F.conv2d(x, w, None, stride, padding, dilation, groups)
    y = F.batch_norm(y, mean, var, gamma, beta, training, 0.1, 1e-5)
    if residual is not None:
        y = y + residual
    return F.relu(y) if relu else y


class LayerBench:
    """Tensors for one layer case and a callable per system; each callable takes one input set.

    Inference runs under ``torch.no_grad``; training runs forward and backward (the gradient of
    every input that needs one, via ``torch.autograd.grad`` so nothing accumulates). BN
    parameters and statistics are fp32, as in an autocast model; activations and weights are in
    ``dtype``. Input sets (x, residual, upstream gradient) rotate among enough copies to defeat L2.
    """

    def __init__(self, case: LayerCase, *, training: bool, dtype: torch.dtype,
                 device: torch.device, seed: int = 0):
        self.case, self.training, self.dtype, self.device = case, training, dtype, device
        s = case.shape
        self.epilogue = case.epilogue
        self.input_grad = case.input_grad
        gen = torch.Generator(device=device).manual_seed(seed)

        def rand(*shape, dtype=dtype, scale=1.0, offset=0.0):
            return torch.randn(*shape, generator=gen, device=device, dtype=torch.float32).mul_(
                scale).add_(offset).to(dtype)

        fan_in = (s.c // s.groups) * s.r * s.s
        self.weight = rand(s.k, s.c // s.groups, s.r, s.s, scale=fan_in**-0.5).to(
            memory_format=CL).requires_grad_(training)
        self.gamma = rand(s.k, dtype=torch.float32, scale=0.1, offset=1.0).requires_grad_(training)
        self.beta = rand(s.k, dtype=torch.float32, scale=0.1).requires_grad_(training)
        self.mean = rand(s.k, dtype=torch.float32, scale=0.1)
        self.var = rand(s.k, dtype=torch.float32).abs_().add_(0.5)
        oh, ow = s.out_hw
        nbytes = DTYPE_BYTES[dtype]
        per_set = s.x_elems + (s.z_elems if self.epilogue.residual else 0)
        per_set += s.z_elems if training else 0
        self.copies = copies_to_defeat_l2(per_set * nbytes, device)
        self.inputs = []
        for _ in range(self.copies):
            x = rand(s.n, s.c, s.h, s.w).to(memory_format=CL)
            inp = {"x": x.requires_grad_(training and self.input_grad)}
            if self.epilogue.residual:
                inp["residual"] = rand(s.n, s.k, oh, ow).to(memory_format=CL).requires_grad_(
                    training)
            if training:
                inp["dz"] = rand(s.n, s.k, oh, ow).to(memory_format=CL)
            self.inputs.append(inp)
        self.flops = conv_flops(s, training=training, input_grad=self.input_grad)
        self.bytes = conv_min_bytes(s, self.epilogue, nbytes, training=training,
                                    input_grad=self.input_grad)
        self.call_info = fastres_backends.CallInfo(
            device=device, dtype=dtype, x_shape=(s.n, s.c, s.h, s.w),
            weight_shape=tuple(self.weight.shape),
            conv=fastres_backends.ConvParams(s.stride, s.padding, s.dilation, s.groups),
            batch_stats=training, has_residual=self.epilogue.residual,
            act="relu" if self.epilogue.relu else None,
        )

    def _step(self, core: Callable) -> Callable[[dict], object]:
        if not self.training:
            def infer(inp):
                with torch.no_grad():
                    return core(inp["x"], inp.get("residual"))
            return infer

        def train(inp):
            z = core(inp["x"], inp.get("residual"))
            wanted = [self.weight, self.gamma, self.beta]
            if self.input_grad:
                wanted.append(inp["x"])
            if "residual" in inp:
                wanted.append(inp["residual"])
            return torch.autograd.grad(z, wanted, inp["dz"])
        return train

    def _eager_core(self) -> Callable:
        s, e = self.case.shape, self.epilogue

        def core(x, residual):
            return _eager_conv_bn_relu(
                x, self.weight, self.gamma, self.beta, self.mean, self.var, residual,
                training=self.training, stride=s.stride, padding=s.padding,
                dilation=s.dilation, groups=s.groups, relu=e.relu,
            )
        return core

    def eager(self) -> Callable[[dict], object]:
        return self._step(self._eager_core())

    def conv_only(self) -> Callable[[dict], object]:
        """cuDNN's convolution alone (no BN, add or ReLU; in training its input and weight
        gradients): the time a fused kernel is compared with to see its mainloop's quality."""
        s = self.case.shape

        def conv(x):
            return F.conv2d(x, self.weight, None, s.stride, s.padding, s.dilation, s.groups)

        if not self.training:
            def infer(inp):
                with torch.no_grad():
                    return conv(inp["x"])
            return infer

        def train(inp):
            wanted = [self.weight, inp["x"]] if self.input_grad else [self.weight]
            return torch.autograd.grad(conv(inp["x"]), wanted, inp["dz"])
        return train

    def compiled(self, mode: str = "default") -> Callable[[dict], object]:
        # a fresh cache: the same Python code compiled for many shapes would otherwise hit the
        # recompile limit or go dynamic-shape, and time something other than what is asked
        torch._dynamo.reset()
        core = torch.compile(self._eager_core(), mode=None if mode == "default" else mode,
                             dynamic=False)
        return self._step(core)

    def fused_unavailable(self, backend: str) -> str | None:
        """Why ``backend`` cannot serve this case here, or None."""
        if backend == "triton" and self.device.type != "cuda":
            return "Triton on CPU runs only under the interpreter: a timing would mean nothing"
        return fastres_backends.availability(backend, self.call_info)

    def system(self, name: str) -> tuple[Callable[[dict], object] | None, str | None]:
        """``(step, None)`` for system ``name`` ("eager", "cudnn-conv", "compile-<mode>",
        "fastres-<backend>"), or ``(None, reason)`` when it cannot run here."""
        if name == "eager":
            return self.eager(), None
        if name == "cudnn-conv":
            return self.conv_only(), None
        if name.startswith("compile-"):
            return self.compiled(name.removeprefix("compile-")), None
        backend = name.removeprefix("fastres-")
        reason = self.fused_unavailable(backend)
        return (None, reason) if reason is not None else (self.fused(backend), None)

    def fused(self, backend: str) -> Callable[[dict], object]:
        from ..ops import conv_bn_relu

        s, e = self.case.shape, self.epilogue

        def core(x, residual):
            return conv_bn_relu(
                x, self.weight, self.gamma, self.beta, self.mean, self.var,
                training=self.training, stride=s.stride, padding=s.padding,
                dilation=s.dilation, groups=s.groups, residual=residual, relu=e.relu,
                backend=backend,
            )
        return self._step(core)


# ---------------------------------------------------------------------------------------------
# Model-level systems
# ---------------------------------------------------------------------------------------------


class ModelBench:
    """A training step (forward, backward, SGD) or an inference pass of one model and system.

    ``system``: ``"eager"`` (plain PyTorch, channels_last, autocast), ``"compile"``
    (``torch.compile`` of that model) or ``"fastres"`` (fastres's model, or ``fastres.fuse``).
    Half-precision dtypes run under autocast with fp32 parameters, as mixed-precision training
    does; float32 runs without autocast.
    """

    def __init__(self, name: str, system: str, *, training: bool, batch: int, resolution: int,
                 dtype: torch.dtype, device: torch.device, compile_mode: str = "default",
                 seed: int = 0, num_classes: int = 1000):
        self.name, self.system, self.training = name, system, training
        self.batch, self.dtype, self.device = batch, dtype, device
        torch.manual_seed(seed)
        if system == "fastres":
            model = fastres_model(name, num_classes=num_classes)
            self.source = "fastres.models" if _has_native(name) else "fastres.fuse(torchvision)"
        else:
            model = reference_model(name, num_classes=num_classes)
            self.source = "torchvision" if _in_torchvision(name) else "fastres.unfuse"
        model = model.to(device=device, memory_format=CL).train(training)
        self.model = model
        if system == "compile":
            torch._dynamo.reset()
            self.runner = torch.compile(model, mode=None if compile_mode == "default" else
                                        compile_mode)
        else:
            self.runner = model
        self.optimizer = (torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
                          if training else None)
        gen = torch.Generator(device=device).manual_seed(seed)
        image_bytes = batch * 3 * resolution * resolution * 4
        copies = copies_to_defeat_l2(image_bytes, device, max_copies=4)
        self.inputs = [
            (
                torch.randn(batch, 3, resolution, resolution, generator=gen,
                            device=device).contiguous(memory_format=CL),
                torch.randint(0, num_classes, (batch,), generator=gen, device=device),
            )
            for _ in range(copies)
        ]

    def _autocast(self):
        if self.dtype in (torch.float16, torch.bfloat16):
            return torch.autocast(self.device.type, dtype=self.dtype)
        return torch.autocast(self.device.type, enabled=False)

    def saved_bytes(self) -> int | None:
        """Bytes the training step's forward keeps for backward (unique non-parameter storages,
        :func:`.memory.saved_bytes`) on the first input set; None for inference and for
        torch.compile (whose saved tensors are the compiled graph's, not the model's)."""
        if not self.training or self.system == "compile":
            return None
        from .memory import saved_bytes

        images, labels = self.inputs[0]
        with self._autocast():
            return saved_bytes(self.model, images,
                               loss=lambda out: F.cross_entropy(out.float(), labels))

    def step(self) -> Callable[[tuple], object]:
        if not self.training:
            def infer(inp):
                with torch.no_grad(), self._autocast():
                    return self.runner(inp[0])
            return infer

        def train(inp):
            images, labels = inp
            with self._autocast():
                loss = F.cross_entropy(self.runner(images).float(), labels)
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            return loss
        return train


def _in_torchvision(name: str) -> bool:
    try:
        import torchvision.models as tvm
    except ImportError:
        return False
    return hasattr(tvm, name)


def _has_native(name: str) -> bool:
    try:
        return hasattr(importlib.import_module("fastres.models"), name)
    except ImportError:
        return False


# ---------------------------------------------------------------------------------------------
# Block-level systems
# ---------------------------------------------------------------------------------------------

BLOCK_MODEL_NAMES = LAYER_MODEL_NAMES
BLOCK_SYSTEMS = ("fastres", "fastres-layer", "eager", "compile")


@dataclass(frozen=True)
class BlockCase:
    """One residual block of a model (``path``: ``layer2.0``), at batch ``batch``.

    ``layers``: its convs as the traced graph shows them, at batch 1 (the main branch in order,
    then the projection ``downsample.0`` if any), for the paper traffic model.
    """

    model: str
    path: str
    batch: int
    resolution: int
    layers: tuple[ConvLayer, ...]

    @property
    def projection(self) -> bool:
        return any("downsample" in layer.name for layer in self.layers)

    @property
    def x_shape(self) -> tuple[int, int, int, int]:
        s = self.layers[0].shape
        return (self.batch, s.c, s.h, s.w)

    @property
    def id(self) -> str:
        _, c, h, w = self.x_shape
        kind = "proj" if self.projection else "id"
        return f"{self.model}-{self.path}-c{c}-{h}x{w}-{kind}"

    def label(self) -> str:
        """``layer2.0 256→512 56² s2 proj``: where it is, channels in → out, input size."""
        _, c, h, w = self.x_shape
        main = [layer for layer in self.layers if "downsample" not in layer.name]
        stride = max(layer.shape.stride[0] for layer in main)
        groups = max(layer.shape.groups for layer in main)
        parts = [self.path, f"{c}→{main[-1].shape.k}", f"{h}x{w}"]
        parts += [f"s{stride}"] if stride > 1 else []
        parts += [f"g{groups}"] if groups > 1 else []
        return " ".join([*parts, "proj" if self.projection else "id"])

    def to_dict(self) -> dict:
        return {"id": self.id, "model": self.model, "block": self.path, "label": self.label(),
                "x_shape": list(self.x_shape), "projection": self.projection,
                "convs": [f"{layer.name}: {layer.shape.label()}" for layer in self.layers]}


def block_cases(name: str, batch: int, resolution: int) -> list[BlockCase]:
    """Per stage (``layer1`` .. ``layer4``), the first block (with its projection shortcut) and
    the second (identity shortcut) of the named model, in that order."""
    layers = model_conv_layers(name, 1, resolution)
    by_block: dict[str, list[ConvLayer]] = {}
    for layer in layers:
        path = layer.name.split(".downsample")[0].rsplit(".conv", 1)[0]
        if path.startswith("layer") and path.count(".") == 1:
            by_block.setdefault(path, []).append(layer)
    cases = []
    for stage in range(1, 5):
        for index in (0, 1):
            found = by_block.get(f"layer{stage}.{index}")
            if found:
                cases.append(BlockCase(name, f"layer{stage}.{index}", batch, resolution,
                                       tuple(found)))
    return cases


def quick_block_cases(cases: Sequence[BlockCase]) -> list[BlockCase]:
    """The first stage's two blocks (projection, identity): the largest activations, where
    memory traffic matters most."""
    return [c for c in cases if c.path.startswith("layer1.")] or list(cases[:1])


def _init_block(block: nn.Module, seed: int) -> nn.Module:
    """Random weights (fan-in scaled) and non-trivial BN parameters and statistics, in place."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in block.modules():
            if isinstance(m, nn.Conv2d):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * fan_in**-0.5)
            elif isinstance(m, nn.BatchNorm2d):
                k = m.num_features
                m.weight.copy_(1 + 0.1 * torch.randn(k, generator=gen))
                m.bias.copy_(0.1 * torch.randn(k, generator=gen))
                m.running_mean.copy_(0.1 * torch.randn(k, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(k, generator=gen))
                m.num_batches_tracked.zero_()
    return block


class BlockBench:
    """A training step of one residual block (forward + backward, no optimizer): the gradient
    of its input and of every parameter, via ``torch.autograd.grad`` (nothing accumulates).

    Systems (:meth:`system`): ``"eager"`` (the torchvision block, channels_last), ``"compile"``
    (``torch.compile`` of it), ``"fastres"`` (``fastres.fuse`` of it: the block op, one
    ``residual_block`` per step where the backend has block kernels) and ``"fastres-layer"``
    (the same fastres block inside :func:`fastres.nn.layer_by_layer`: one ``conv_bn_relu`` per
    conv). Parameters are fp32; half-precision dtypes run under autocast as
    :class:`ModelBench` does, with the block's input and upstream gradient in ``dtype``
    (what the block before it hands over). Input sets rotate among enough copies to defeat L2.
    """

    def __init__(self, case: BlockCase, *, dtype: torch.dtype, device: torch.device,
                 backend: str = "auto", compile_mode: str = "default", seed: int = 0):
        import copy

        self.case, self.dtype, self.device = case, dtype, device
        self.backend, self.compile_mode = backend, compile_mode
        with torch.device("meta"):
            meta = reference_model(case.model)
        block = copy.deepcopy(meta.get_submodule(case.path)).to_empty(device="cpu")
        self.eager_block = _init_block(block, seed).to(device=device, memory_format=CL).train()
        self._fastres_block = None
        n, c, h, w = case.x_shape
        gen = torch.Generator(device=device).manual_seed(seed)
        last = [layer for layer in case.layers if "downsample" not in layer.name][-1].shape
        out_shape = (n, last.k, *last.out_hw)
        per_set = (n * c * h * w + math.prod(out_shape)) * DTYPE_BYTES[dtype]
        self.copies = copies_to_defeat_l2(per_set, device)
        self.inputs = [
            {"x": torch.randn(n, c, h, w, generator=gen, device=device).to(
                dtype=dtype, memory_format=CL).requires_grad_(),
             "dz": torch.randn(out_shape, generator=gen, device=device).to(
                 dtype=dtype, memory_format=CL)}
            for _ in range(self.copies)
        ]

    def fastres_block(self) -> nn.Module:
        """``fastres.fuse`` of a copy of the eager block (same initial weights and statistics)."""
        if self._fastres_block is None:
            fuse = _fastres_attr("fuse")
            self._fastres_block = fuse(self.eager_block)  # a deep copy, fused
        return self._fastres_block

    def _autocast(self):
        if self.dtype in (torch.float16, torch.bfloat16):
            return torch.autocast(self.device.type, dtype=self.dtype)
        return torch.autocast(self.device.type, enabled=False)

    def _context(self, system: str):
        """What a system's forward runs under: its backend choice, the per-layer switch."""
        import contextlib

        from ..backends import use_backend
        from ..nn.blocks import layer_by_layer

        stack = contextlib.ExitStack()
        stack.enter_context(self._autocast())
        if system.startswith("fastres") and self.backend != "auto":
            stack.enter_context(use_backend(self.backend))
        if system == "fastres-layer":
            stack.enter_context(layer_by_layer())
        return stack

    def module(self, system: str) -> nn.Module:
        if system in ("eager", "compile"):
            return self.eager_block
        if system in ("fastres", "fastres-layer"):
            return self.fastres_block()
        raise ValueError(f"unknown block system {system!r}; choose from {BLOCK_SYSTEMS}")

    def system(self, name: str) -> Callable[[dict], object]:
        """The training step of system ``name`` (one of :data:`BLOCK_SYSTEMS`)."""
        block = self.module(name)
        runner = block
        if name == "compile":
            torch._dynamo.reset()
            runner = torch.compile(block, mode=None if self.compile_mode == "default"
                                   else self.compile_mode, dynamic=False)
        params = [p for p in block.parameters() if p.requires_grad]

        def train(inp):
            with self._context(name):
                out = runner(inp["x"])
            return torch.autograd.grad(out, [inp["x"], *params], inp["dz"])
        return train

    def saved_bytes(self, name: str) -> int | None:
        """Bytes the system's forward keeps for backward on the first input set
        (:func:`.memory.saved_bytes`); None for torch.compile (the compiled graph's own)."""
        if name == "compile":
            return None
        from .memory import saved_bytes

        with self._context(name):
            return saved_bytes(self.module(name), self.inputs[0]["x"])
