"""A disk cache for a model and tokenizer that are slow to build from one source file (the default
model is dequantized from a GGUF file in about 15 s; reading the cached copy back takes 2-3 s, mostly
importing transformers).

Layout under the cache root (see cache_root):

    source-hashes.json      each source file's sha256, with the stat it had when hashed, so a later
                            load rehashes only a file whose size, mtime, ctime or inode changed
    models/<stem>-<sha256[:16]>-transformers<major>-format<CACHE_FORMAT>/
        model.safetensors   every parameter and buffer exactly as built (float32), a tied tensor once
        config.json, generation_config.json, and the tokenizer's own files (save_pretrained)
        manifest.json       the source's sha256, the tied-tensor aliases, each file's size and CRC-32

An entry is written into a temporary sibling folder, fsynced, then renamed into place: a reader sees a
complete entry or none, an interrupted build leaves only a temporary folder that nothing trusts, and
when two processes build at once the first rename wins and the other process reads the winner's entry.
Every load checks each file's size and CRC-32 against the manifest (about 0.1 s for the default model);
an entry that fails is set aside and rebuilt, with a warning saying what was wrong.
"""
import hashlib
import json
import mmap
import os
import shutil
import sys
import time
import uuid
import warnings
import zlib
from typing import Callable, Optional, Tuple

import torch

from . import config

# Bump when the entry layout or what the builders put in it changes: old entries are then ignored.
CACHE_FORMAT = 1
MANIFEST_FILE = "manifest.json"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
SOURCE_HASHES_FILE = "source-hashes.json"
# A temporary folder this old belongs to a build that died (kill -9, power loss), not to one running.
STALE_TEMPORARY_S = 3600
_TEMPORARY_MARKERS = (".tmp-", ".damaged-")


class CacheEntryDamaged(Exception):
    """A cache entry that fails verification or cannot be read back; the message says what is wrong."""


def cache_root(cache_dir=None) -> Optional[str]:
    """The cache folder: cache_dir if given, else $KANGAROO_CACHE_DIR, else $XDG_CACHE_HOME/kangaroo_ext,
    else ~/.cache/kangaroo_ext. None when cache_dir is False (no cache).

    The variables are read through config.py, like every other."""
    if cache_dir is False:
        return None
    if cache_dir is not None:
        return os.path.abspath(os.path.expanduser(os.fspath(cache_dir)))
    override = config.text("KANGAROO_CACHE_DIR")
    if override:
        return os.path.abspath(os.path.expanduser(override))
    return os.path.join(os.path.abspath(config.user_cache_home()), "kangaroo_ext")


def transformers_keyword_for_dtype() -> str:
    """from_pretrained/from_config spell the dtype argument `dtype` from transformers 5, `torch_dtype` before."""
    return "dtype" if transformers_major_version() >= 5 else "torch_dtype"


def transformers_major_version() -> int:
    import transformers
    return int(transformers.__version__.split(".")[0])


# ----------------------------------------------------------------------------------------------- hashing

def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def source_sha256(path: str, root: str) -> str:
    """The file's sha256, hashed once and remembered in the cache root with the file's stat.

    ctime and inode are remembered besides size and mtime because a rewrite that keeps the size and
    restores the mtime still changes the ctime, and a reinstall makes a new inode."""
    path = os.path.realpath(path)
    stat = os.stat(path)
    fingerprint = [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino]
    memo_path = os.path.join(root, SOURCE_HASHES_FILE)
    memo = _read_json(memo_path)
    memo = memo if isinstance(memo, dict) else {}
    known = memo.get(path)
    if isinstance(known, dict) and known.get("stat") == fingerprint and isinstance(known.get("sha256"), str):
        return known["sha256"]
    digest = file_sha256(path)
    memo[path] = {"stat": fingerprint, "sha256": digest}
    try:
        os.makedirs(root, exist_ok=True)
        _write_json_atomically(memo_path, memo)
    except OSError:
        pass  # remembering the hash only saves time; an unwritable cache is reported where the entry is written
    return digest


def entry_path(root: str, source_path: str, sha256: str) -> str:
    stem = os.path.splitext(os.path.basename(source_path))[0]
    name = f"{stem}-{sha256[:16]}-transformers{transformers_major_version()}-format{CACHE_FORMAT}"
    return os.path.join(root, "models", name)


def file_crc32(path: str) -> int:
    """CRC-32 of a file: it catches truncation and bit rot at ~4 GB/s (sha256 runs at ~1.7 GB/s here,
    slower without SHA instructions), which keeps verifying 540 MB on every load near 0.1 s."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return 0
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            return zlib.crc32(mapped)


# ------------------------------------------------------------------------------------------ load or build

def load_or_build(source_path: str, build: Callable[[], Tuple[torch.nn.Module, object]], *, what: str,
                  dtype: torch.dtype = torch.float32, cache_dir=None):
    """(model, tokenizer) from the cache entry for source_path, building and caching it when there is none.

    build() returns (model, tokenizer) built from source_path, on the CPU, in the precision to keep
    (float32 for the default model). The model returned has that model's parameters cast to dtype (the
    cast a transformers load in dtype makes) and its buffers as built; first and later loads both read
    the entry back, so they return the same model bit for bit. what names the build in the message that
    a first load prints on stderr. cache_dir: see cache_root; False builds every time and writes nothing.
    """
    root = cache_root(cache_dir)
    if root is None:
        _say(f"{what} (cache disabled) ...")
        model, tokenizer = build()
        return _uncached(model, dtype), tokenizer
    sha256 = source_sha256(source_path, root)
    entry = entry_path(root, source_path, sha256)
    if os.path.isdir(entry):
        try:
            return read_entry(entry, sha256, dtype)
        except CacheEntryDamaged as e:
            warnings.warn(f"kangaroo_ext: the cached model in {entry} is damaged ({e}); rebuilding it", stacklevel=2)
            discard_entry(entry)
    started = time.perf_counter()
    _say(f"first load: {what}, once ...")
    model, tokenizer = build()
    _say("writing the cache ...")
    try:
        write_entry(entry, model, tokenizer, sha256, os.path.basename(source_path))
    except OSError as e:
        warnings.warn(f"kangaroo_ext: could not write the model cache in {root} ({e}); using the model without "
                      "caching it, so the next load builds it again (cache_dir=... or KANGAROO_CACHE_DIR picks "
                      "another folder)", stacklevel=2)
        return _uncached(model, dtype), tokenizer
    del model, tokenizer  # the entry's copy replaces them: one code path for first and later loads
    try:
        loaded = read_entry(entry, sha256, dtype)
    except CacheEntryDamaged as e:
        raise RuntimeError(f"kangaroo_ext: the cache entry just written to {entry} cannot be read back ({e})") from e
    _say(f"cached in {entry} ({time.perf_counter() - started:.0f} s); later loads read it from there")
    return loaded


def _uncached(model, dtype):
    """The built model as a cache entry would give it back, without writing one."""
    tensors, aliases = unique_tensors(model)
    return model_from_tensors(dense_config(model.config), model.generation_config, tensors, aliases, dtype)


def dense_config(config):
    """The config without the GGUF quantizer's settings that a GGUF load records: the weights are dense."""
    settings = config.to_dict()
    settings.pop("quantization_config", None)
    return type(config).from_dict(settings)


def _say(message: str) -> None:
    print(f"kangaroo_ext: {message}", file=sys.stderr, flush=True)


# -------------------------------------------------------------------------------------------------- write

def unique_tensors(model: torch.nn.Module):
    """({name: tensor} holding every parameter and buffer once, {alias: name} for tied ones).

    Buffers are kept because some (rotary inv_freq) are not in the state dict yet must match bitwise."""
    named = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
    tensors, aliases, first_name = {}, {}, {}
    for name, tensor in named:
        identity = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
                    tuple(tensor.stride()), tensor.dtype)
        if identity in first_name:
            aliases[name] = first_name[identity]
        else:
            first_name[identity] = name
            tensors[name] = tensor.detach().to("cpu").contiguous()
    return tensors, aliases


def write_entry(entry: str, model, tokenizer, sha256: str, source_name: str) -> None:
    """Writes the entry atomically (see the module docstring); if another process's entry appeared in
    the meantime, keeps that one."""
    from safetensors.torch import save_file

    parent = os.path.dirname(entry)
    os.makedirs(parent, exist_ok=True)
    remove_stale_temporaries(parent)
    temporary = os.path.join(parent, f".{os.path.basename(entry)}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    os.mkdir(temporary)
    try:
        tensors, aliases = unique_tensors(model)
        save_file(tensors, os.path.join(temporary, WEIGHTS_FILE))
        dense_config(model.config).to_json_file(os.path.join(temporary, CONFIG_FILE))
        if model.generation_config is not None:
            model.generation_config.to_json_file(os.path.join(temporary, GENERATION_CONFIG_FILE))
        tokenizer.save_pretrained(temporary)
        files = {}
        for name in sorted(os.listdir(temporary)):
            path = os.path.join(temporary, name)
            if not os.path.isfile(path):
                raise OSError(f"unexpected folder {name} in the cache entry")
            fsync_file(path)
            files[name] = {"size": os.path.getsize(path), "crc32": file_crc32(path)}
        manifest = {"format": CACHE_FORMAT, "source": source_name, "source_sha256": sha256,
                    "transformers_major": transformers_major_version(), "torch": torch.__version__,
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "aliases": aliases, "files": files}
        _write_json(os.path.join(temporary, MANIFEST_FILE), manifest)
        fsync_file(os.path.join(temporary, MANIFEST_FILE))
        fsync_folder(temporary)
        try:
            os.rename(temporary, entry)
        except OSError:
            if not os.path.isdir(entry):
                raise
            # Another process renamed its entry into place first (a non-empty folder is never replaced).
            shutil.rmtree(temporary, ignore_errors=True)
            return
        fsync_folder(parent)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise


def discard_entry(entry: str) -> None:
    """Moves a damaged entry aside before deleting it, so that no reader sees it half-deleted."""
    aside = os.path.join(os.path.dirname(entry), f".{os.path.basename(entry)}.damaged-{os.getpid()}-"
                                                 f"{uuid.uuid4().hex[:8]}")
    try:
        os.rename(entry, aside)
    except FileNotFoundError:
        return  # another process discarded it already
    except OSError as e:  # e.g. a read-only cache: the rebuild then cannot replace the entry either, and says so
        warnings.warn(f"kangaroo_ext: could not remove the damaged cache entry {entry} ({e})", stacklevel=3)
        return
    shutil.rmtree(aside, ignore_errors=True)


def remove_stale_temporaries(parent: str) -> None:
    now = time.time()
    for name in os.listdir(parent):
        if name.startswith(".") and any(marker in name for marker in _TEMPORARY_MARKERS):
            path = os.path.join(parent, name)
            try:
                if now - os.stat(path).st_mtime > STALE_TEMPORARY_S:
                    shutil.rmtree(path, ignore_errors=True)
            except FileNotFoundError:
                pass


def fsync_file(path: str) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def fsync_folder(path: str) -> None:
    """Makes a rename or a new file in the folder durable; folders cannot be opened for this on Windows."""
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: str, data) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1, sort_keys=True)


def _write_json_atomically(path: str, data) -> None:
    temporary = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        _write_json(temporary, data)
        fsync_file(temporary)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def _read_json(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


# --------------------------------------------------------------------------------------------------- read

def verify_entry(entry: str, sha256: str) -> dict:
    """The entry's manifest, after checking that every file it lists has its size and CRC-32."""
    manifest = _read_json(os.path.join(entry, MANIFEST_FILE))
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise CacheEntryDamaged(f"{MANIFEST_FILE} is missing or not valid JSON")
    if manifest.get("format") != CACHE_FORMAT or manifest.get("source_sha256") != sha256:
        raise CacheEntryDamaged(f"{MANIFEST_FILE} names another cache format or source file")
    files = manifest["files"]
    for required in (WEIGHTS_FILE, CONFIG_FILE):
        if required not in files:
            raise CacheEntryDamaged(f"{MANIFEST_FILE} does not list {required}")
    for name, expected in files.items():
        if os.path.basename(name) != name or name in (".", "..") or not isinstance(expected, dict):
            raise CacheEntryDamaged(f"{MANIFEST_FILE} lists a bad file entry {name!r}")
        path = os.path.join(entry, name)
        try:
            size = os.path.getsize(path)
        except OSError:
            raise CacheEntryDamaged(f"{name} is missing") from None
        if size != expected.get("size"):
            raise CacheEntryDamaged(f"{name} has {size} bytes where {expected.get('size')} were written "
                                    "(truncated?)")
        try:
            crc32 = file_crc32(path)
        except OSError as e:
            raise CacheEntryDamaged(f"{name} cannot be read ({e})") from None
        if crc32 != expected.get("crc32"):
            raise CacheEntryDamaged(f"{name} fails its CRC-32 check (its contents changed since it was written)")
    return manifest


def read_entry(entry: str, sha256: str, dtype: torch.dtype):
    """(model, tokenizer) from a verified entry; CacheEntryDamaged if it fails any check or cannot be read."""
    manifest = verify_entry(entry, sha256)
    try:
        from safetensors.torch import load_file
        from transformers import AutoConfig, AutoTokenizer, GenerationConfig

        # Memory-mapped, copy-on-write: parameters kept in float32 share the page cache instead of being
        # copied (an entry is only ever renamed or deleted, never rewritten in place under a reader).
        tensors = load_file(os.path.join(entry, WEIGHTS_FILE))
        config = AutoConfig.from_pretrained(entry)
        generation_config = GenerationConfig.from_pretrained(entry) \
            if GENERATION_CONFIG_FILE in manifest["files"] else None
        model = model_from_tensors(config, generation_config, tensors, manifest.get("aliases") or {}, dtype)
        tokenizer = AutoTokenizer.from_pretrained(entry)
    except Exception as e:  # any failure to read a verified entry back means it cannot be trusted either
        raise CacheEntryDamaged(f"reading it back failed: {type(e).__name__}: {e}") from e
    return model, tokenizer


def model_from_tensors(config, generation_config, tensors: dict, aliases: dict, dtype: torch.dtype):
    """The model the config describes, holding the given tensors, in eval mode.

    It is created on the meta device (no random initialisation, ~10x faster than a normal construction)
    and each tensor then takes the dtype the construction in `dtype` gave that parameter or buffer, as
    a transformers load in that dtype would: parameters in dtype, rotary inv_freq in float32."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, **{transformers_keyword_for_dtype(): dtype})
    expected = dict(model.named_parameters(remove_duplicate=False))
    expected.update(model.named_buffers(remove_duplicate=False))
    given = set(tensors) | set(aliases)
    if given != set(expected):
        raise ValueError(f"the tensors do not match the model: missing {sorted(set(expected) - given)[:4]}, "
                         f"unexpected {sorted(given - set(expected))[:4]}")
    placed = {}
    for name, tensor in tensors.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise ValueError(f"{name} has shape {tuple(tensor.shape)}, the model expects "
                             f"{tuple(expected[name].shape)}")
        placed[name] = _place(model, name, tensor.to(expected[name].dtype))
    for name, target in aliases.items():
        _place(model, name, placed[target])
    if generation_config is not None:
        model.generation_config = generation_config
    return model.eval()


def _place(model, name: str, tensor):
    owner_name, _, attribute = name.rpartition(".")
    owner = model.get_submodule(owner_name)
    if attribute in owner._parameters:
        if not isinstance(tensor, torch.nn.Parameter):
            tensor = torch.nn.Parameter(tensor, requires_grad=tensor.is_floating_point())
        owner._parameters[attribute] = tensor
    else:
        owner._buffers[attribute] = tensor
    return tensor
