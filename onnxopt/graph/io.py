"""Load and save models, and write any output file.

Everything that touches files lives here: rewrites get a ModelProto and return one. Saving is atomic (temp file in
the target folder, then rename), keeps the input's IR version and opsets, and only ever adds the custom domain's
opset import; every output (model, npz, HTML) goes through the same target rules.
"""
from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from ..errors import OnnxoptError, UsageError
from .shapes import TYPED_FIELDS, check_tensors

# protobuf refuses to serialize a message over 2 GiB: such models need external data
PROTOBUF_LIMIT = 2**31 - 1


EXTERNAL_MIN_BYTES = 1024  # smaller tensors stay in the .onnx file


def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Read an ONNX file (external data included) or raise OnnxoptError saying why not."""
    return load_model_and_files(path)[0]


def load_model_and_files(path: str | os.PathLike) -> tuple[onnx.ModelProto, list[Path]]:
    """The model and the files it was read from (the .onnx and its external-data files): what a save
    must never overwrite."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"{path}: no such file")
    if path.is_dir():
        raise UsageError(f"{path}: is a directory, expected an .onnx file")
    try:
        model = onnx.load(str(path), load_external_data=False)
        files = [path] + [path.parent / loc for loc in _external_locations(model)]
        onnx.load_external_data_for_model(model, str(path.parent))
    except PermissionError:
        raise OnnxoptError(f"{path}: permission denied") from None
    except Exception as exc:  # protobuf's DecodeError, missing external data, ...
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise OnnxoptError(f"{path}: not a readable ONNX model ({reason})") from None
    if not model.graph.node and not model.graph.output:
        raise OnnxoptError(f"{path}: not an ONNX model (no graph found)")
    check_model(model, what=str(path))
    check_tensors(model, what=str(path))
    return model, files


def _external_locations(model: onnx.ModelProto) -> set[str]:
    from onnx.external_data_helper import ExternalDataInfo, _get_all_tensors, uses_external_data

    return {ExternalDataInfo(t).location for t in _get_all_tensors(model) if uses_external_data(t)}


def over_protobuf_limit(model: onnx.ModelProto) -> bool:
    """True for a model protobuf cannot serialize in one piece (it must be saved with external data)."""
    try:
        return model.ByteSize() > PROTOBUF_LIMIT
    except Exception:  # some protobuf builds refuse even to measure a message over 2 GiB
        return True


def check_model(model: onnx.ModelProto, what: str = "model") -> None:
    """onnx.checker, with its message turned into one line."""
    try:
        if over_protobuf_limit(model):
            return  # the checker cannot take >2 GiB in memory; save_model checks the file instead
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        raise OnnxoptError(f"{what}: fails onnx.checker: {one_line(str(exc))}") from None


def one_line(message: str, limit: int = 300) -> str:
    """A multi-line library message as one line (the checker splits its sentences over lines), the
    ==> Context: trailer dropped."""
    text = " ".join(message.split("==> Context:")[0].split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def default_output(input_path: str | os.PathLike, suffix: str) -> Path | None:
    """`model.onnx` → `model.<suffix>.onnx` beside the input (None for a path with no file name)."""
    p = Path(os.path.normpath(input_path))
    return p.with_name(f"{p.stem}.{suffix}.onnx") if p.name not in ("", ".", "..") else None


def check_target(path: Path, force: bool, protected: list[Path]) -> None:
    """The rules for every file a save replaces: never one we read from, never a non-regular file,
    an existing one only with --force."""
    for source in protected:
        try:
            same = path.exists() and source.exists() and os.path.samefile(path, source)
        except OSError:
            same = False
        if same:
            raise UsageError(f"{path}: is the input model (or one of its data files); write to another path")
    if path.is_dir():
        raise UsageError(f"{path}: is a directory")
    if path.exists() and not path.is_file():
        raise UsageError(f"{path}: exists and is not a regular file; refusing to replace it")
    if path.exists() and not force:
        raise UsageError(f"{path}: exists; pass --force to overwrite")


def check_output(path: str | os.PathLike, *, force: bool = False, protected: list[Path] = ()) -> None:
    """The save rules checked before any work, so a long run (a search, fine-tuning) is not spent on a result
    that could not be written; `save_model` checks again when it writes."""
    check_target(Path(path), force, list(protected))


def save_model(model: onnx.ModelProto, path: str | os.PathLike, *, force: bool = False,
               external_data: bool = False, protected: list[Path] = ()) -> Path:
    """Check and write `model` atomically; `protected` (the input's files) are never replaced.

    With external data the .onnx and its data file are one unit: the data goes to a name unique to this write
    (`<name>.<token>.data`, referenced by the .onnx), is moved in first, and the .onnx is renamed over the old
    one last. A reader sees the old pair or the new pair, whatever the timing: two writers racing each leave a
    consistent pair (the last rename wins), and a stop between the two renames leaves the old .onnx with its
    old data. The data files the replaced .onnx referenced are removed after."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise UsageError(f"{folder}: output folder does not exist")
    external_data = external_data or over_protobuf_limit(model)
    check_target(path, force, list(protected))
    check_model(model, what="output model")
    stale = _own_data_files(path, protected)  # what the .onnx being replaced referenced
    try:
        tmp_dir = tempfile.mkdtemp(prefix=f".{path.name}.", dir=folder)
    except OSError as exc:
        raise OnnxoptError(f"{folder}: cannot write here ({exc.strerror})") from None
    data_path = None
    try:
        tmp_path = Path(tmp_dir) / path.name
        if external_data:
            data_name = f"{path.name}.{secrets.token_hex(6)}.data"
            _save_external(model, tmp_path, data_name)
            data_path = folder / data_name
            os.replace(Path(tmp_dir) / data_name, data_path)
        else:
            onnx.save_model(model, str(tmp_path))
        os.replace(tmp_path, path)
        data_path = None  # in place: no longer ours to clean up
    except OSError as exc:
        raise OnnxoptError(f"{path}: write failed ({exc.strerror or exc}); nothing was written") from None
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        if data_path is not None:  # stopped or failed between the two renames: the old pair stands
            data_path.unlink(missing_ok=True)
    for old in stale:
        old.unlink(missing_ok=True)
    return path


def _own_data_files(path: Path, protected) -> list[Path]:
    """The data files the model now at `path` references that a save of `path` wrote (`<name>.data`,
    `<name>.<token>.data` beside it) and nobody else reads: what replacing it leaves stale."""
    try:
        old = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - not a model (or not there): nothing of ours to clean up
        return []
    keep = {p.resolve() for p in protected if p.exists()}
    found = []
    for location in _external_locations(old):
        candidate = path.parent / location
        name = Path(location).name
        ours = location == name and name.startswith(path.name + ".") and name.endswith(".data")
        if ours and candidate.is_file() and candidate.resolve() not in keep:
            found.append(candidate)
    return found


def _save_external(model: onnx.ModelProto, tmp_path: Path, data_name: str) -> None:
    """Write the model with its large tensors in `data_name` beside `tmp_path`.

    Written by hand around onnx's writer because onnx.save_model(save_as_external_data=True) checks
    whether the data file exists relative to the *current directory*, not the model's folder."""
    from onnx.external_data_helper import _get_initializer_tensors, set_external_data

    for tensor in _get_initializer_tensors(model):
        if tensor.data_type == onnx.TensorProto.STRING:
            continue
        if not tensor.HasField("raw_data"):
            array = numpy_helper.to_array(tensor)
            if array.nbytes < EXTERNAL_MIN_BYTES:
                continue
            tensor.raw_data = array.tobytes()
            for name in TYPED_FIELDS:
                tensor.ClearField(name)
        if len(tensor.raw_data) >= EXTERNAL_MIN_BYTES:
            set_external_data(tensor, data_name)
    onnx.save_model(model, str(tmp_path))
    # writing moved the caller's tensor data out to the file: read it back in
    onnx.load_external_data_for_model(model, str(tmp_path.parent))


def atomic_save_npz(arrays: dict[str, np.ndarray], path: str | os.PathLike, *, force: bool = False,
                    protected: list[Path] = ()) -> Path:
    return _atomic_write(path, force, ".npz", lambda f: np.savez(f, **arrays), protected)


def atomic_write_text(text: str, path: str | os.PathLike, *, force: bool = False,
                      protected: list[Path] = ()) -> Path:
    """A text file (an HTML report) written atomically, under the same rules as a model."""
    return _atomic_write(path, force, ".tmp", lambda f: f.write(text.encode()), protected)


def check_models_folder(folder: str | os.PathLike, names: str, *, force: bool = False,
                        protected: list[Path] = ()) -> None:
    """Before the work that fills it: `folder` can take files matching the glob `names` (it exists as a writable
    folder, or its parent does), existing ones only with `force`, and none of them is an input file."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"{folder}: exists and is not a folder")
    writable = folder if folder.exists() else folder.parent if str(folder.parent) else Path(".")
    if not writable.is_dir() or not os.access(writable, os.W_OK | os.X_OK):
        raise UsageError(f"{writable}: cannot write here (missing or read-only folder)")
    existing = sorted(folder.glob(names)) if folder.exists() else []
    inputs = [p for p in existing if any(q.exists() and os.path.samefile(p, q) for q in protected)]
    if inputs:
        raise UsageError(f"{inputs[0]}: is an input of this run; write the models to another folder")
    if existing and not force:
        raise UsageError(f"{existing[0]}: exists; pass --force to overwrite")


def save_models(models: dict[str, onnx.ModelProto], folder: str | os.PathLike, *, force: bool = False,
                protected: list[Path] = ()) -> list[Path]:
    """Several models into `folder`, all or nothing: every file is written in a temporary folder beside them
    first (a full disk or a stop leaves the folder as it was), then each is renamed into place."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name in models:
        check_target(folder / name, force, list(protected))
    try:
        staging = Path(tempfile.mkdtemp(prefix=".onnxopt-models.", dir=folder))
    except OSError as exc:
        raise OnnxoptError(f"{folder}: cannot write here ({exc.strerror})") from None
    try:
        for name, model in models.items():
            save_model(model, staging / name)
        for written in sorted(staging.iterdir(), key=lambda p: p.suffix == ".onnx"):  # data files first
            os.replace(written, folder / written.name)
    except (OSError, OnnxoptError) as exc:
        raise OnnxoptError(f"{folder}: writing the models failed ({getattr(exc, 'strerror', None) or exc}); "
                           "nothing was written") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return [folder / name for name in models]


def _atomic_write(path: str | os.PathLike, force: bool, suffix: str, write, protected=()) -> Path:
    path = Path(path)
    check_target(path, force, list(protected))
    folder = path.parent if str(path.parent) else Path(".")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=folder)
    except OSError as exc:
        raise OnnxoptError(f"{folder}: cannot write here ({exc.strerror})") from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; the file is the user's, as a plain open would make it
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise OnnxoptError(f"{path}: write failed ({exc.strerror or exc}); nothing was written") from None
    return path
