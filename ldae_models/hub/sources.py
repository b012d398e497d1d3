"""Where weights come from: one table of source kinds, each source with the sha256 its bytes must have.

Weights are data. Every model file lists its tags as timm pretrained cfgs (``arch.tag``); a cfg names at most one
source of bytes through the keys in ``SOURCE_KEYS``, read in timm's order:

1. an ``hf-hub:ORG/NAME`` (or ``local-dir:PATH``) model name, which timm turns into ``source='hf-hub'`` +
   ``hf_hub_id`` (or ``file``);
2. ``file``: a local path (a file shipped inside the package is a ``file`` made by ``packaged_file``);
3. ``hf_hub_id`` (+ ``hf_hub_filename``): a Hugging Face repository, through ``huggingface_hub`` and its cache, which
   works offline with ``HF_HUB_OFFLINE=1``;
4. ``url``: downloaded once into the torch hub cache.

A tag's sha256 is a note ``'sha256:<hex>'`` in its cfg (timm's cfg has no field for it; a note travels with the cfg
into ``config.json`` and back). It belongs to the tag's own source: when ``pretrained_cfg_overlay`` points the tag at
another file and brings no note of its own, the tag's note does not apply (``WeightSource.sha256`` is then None).
``weight_source(cfg)`` is the one function that decides whether a cfg has bytes.
"""
import hashlib
import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Union
from urllib.parse import urlparse

import torch

__all__ = [
    'SOURCE_KEYS', 'SOURCE_KINDS', 'WeightSource', 'FileSource', 'HubSource', 'UrlSource', 'CheckpointError', 'ChecksumError', 'SourceError', 'weight_source', 'packaged_file', 'sha256_note',
    'cfg_sha256', 'sha256_of', 'strip_weights_info', 'PACKAGE_WEIGHTS_DIR', 'SAFETENSORS_NAME', 'PICKLE_NAME',
]

PathLike = Union[str, os.PathLike]
PACKAGE_WEIGHTS_DIR = Path(__file__).resolve().parents[1] / 'weights'
SAFETENSORS_NAME = 'model.safetensors'
SHARDED_NAME = 'model.safetensors.index.json'
PICKLE_NAME = 'pytorch_model.bin'
# The keys of a pretrained cfg that say where bytes are, in the order timm tries them.
SOURCE_KEYS = ('file', 'hf_hub_id', 'hf_hub_filename', 'url')
# What a cfg says about particular bytes (and must not be kept when a model has none of them).
WEIGHTS_INFO_KEYS = SOURCE_KEYS + ('source', 'tag', 'description', 'notes', 'license', 'origin_url', 'state_dict')


class CheckpointError(ValueError):
    """A checkpoint that cannot be found, fetched, read, or that does not fit the model (base of the errors here)."""


class SourceError(CheckpointError):
    """Bytes that cannot be found or fetched."""


class ChecksumError(SourceError):
    """The bytes of a checkpoint do not have the sha256 their source names."""


PACKAGED_PREFIX = 'ldae_models/weights/'  # a tag's ``file`` inside the package: the same string on every machine


def packaged_file(name: str) -> str:
    """The ``file`` of a pretrained cfg for a weight file shipped inside the package: ``ldae_models/weights/NAME``,
    resolved under the installed package (``resolve_file``), wherever that is."""
    return PACKAGED_PREFIX + name


def resolve_file(location: str) -> Path:
    """A cfg's ``file`` as a path: a packaged file (``ldae_models/weights/NAME``) under the installed package's weights
    folder, wherever the package is; anything else as given."""
    if location.startswith(PACKAGED_PREFIX):
        return PACKAGE_WEIGHTS_DIR / location[len(PACKAGED_PREFIX):]
    return Path(location)


def sha256_note(digest: str) -> str:
    return f'sha256:{digest.lower()}'


def cfg_sha256(cfg: Dict[str, Any]) -> Optional[str]:
    """The sha256 recorded in a pretrained cfg's notes, if any."""
    for note in cfg.get('notes') or ():
        if isinstance(note, str) and note.startswith('sha256:'):
            return note.split(':', 1)[1].strip().lower()
    return None


def sha256_of(path: PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(chunk), b''):
            h.update(block)
    return h.hexdigest()


def strip_weights_info(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """A cfg that describes the architecture only: for a model created without weights, so that nothing written
    from it claims to be a released checkpoint."""
    return {k: v for k, v in cfg.items() if k not in WEIGHTS_INFO_KEYS}


def _registered_cfg(cfg: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    arch = cfg.get('architecture')
    if not arch:
        return None
    try:
        from timm.models import get_pretrained_cfg
        found = get_pretrained_cfg(f"{arch}.{cfg['tag']}" if cfg.get('tag') else arch, allow_unregistered=True)
    except Exception:  # noqa: BLE001 -- an unknown name: the cfg stands alone
        return None
    return found.to_dict() if found is not None else None


def _sha256_for_source(cfg: Dict[str, Any]) -> Optional[str]:
    """The sha256 that the cfg's own source must have (see the module docstring)."""
    sha = cfg_sha256(cfg)
    registered = _registered_cfg(cfg) if sha else None
    if registered is None or cfg_sha256(registered) != sha:
        return sha  # a cfg of its own (config.json, an overlay with its own note)
    same_source = all(cfg.get(k) == registered.get(k) for k in SOURCE_KEYS)
    return sha if same_source else None


@dataclass(frozen=True)
class WeightSource:
    """One place bytes come from, and the sha256 they must have (None: not recorded).

    ``WeightSource(kind, location, filename=None, sha256=None)`` builds the class of ``kind`` in ``SOURCE_KINDS``
    (``FileSource``, ``HubSource``, ``UrlSource``); each says how its bytes are found (``_local``) and whether they
    are on this machine (``available_offline``); ``fetch`` checks the sha256 of every kind the same way.
    """

    kind: str                        # 'hf-hub' | 'file' | 'url': a key of SOURCE_KINDS
    location: str                    # repository id (optionally @revision), path, or URL
    filename: Optional[str] = None   # file inside a repository (default: model.safetensors, then pytorch_model.bin)
    sha256: Optional[str] = None

    downloads = True  # whether fetching writes the bytes (a failed check then deletes them)

    def __new__(cls, kind: Optional[str] = None, *args: Any, **kwargs: Any) -> 'WeightSource':
        if cls is WeightSource and kind is not None:
            if kind not in SOURCE_KINDS:
                raise ValueError(f'unknown weight source kind {kind!r}; known: {", ".join(SOURCE_KINDS)}')
            cls = SOURCE_KINDS[kind]
        return object.__new__(cls)

    def describe(self) -> str:
        return self.location

    def fetch(self, cache_dir: Optional[PathLike] = None) -> Path:
        """The local path of the bytes (downloading them once when needed), checked against ``sha256``.

        A downloaded file that fails the check is deleted; a local file of the user's is reported, not deleted.
        """
        path = self._local(cache_dir)
        self._verify(path, downloaded=self.downloads)
        return path

    def _local(self, cache_dir: Optional[PathLike]) -> Path:
        raise NotImplementedError

    def available_offline(self, cache_dir: Optional[PathLike] = None) -> bool:
        """Whether the bytes are on this machine (packaged, local or cached), without fetching anything."""
        raise NotImplementedError

    def _verify(self, path: Path, downloaded: bool) -> None:
        if not self.sha256:
            return
        got = sha256_of(path)
        if got == self.sha256:
            return
        if downloaded:
            for p in {path, path.resolve()}:  # a Hugging Face cache entry is a link to a blob: delete both
                p.unlink(missing_ok=True)
        raise ChecksumError(f'sha256 mismatch for {self.describe()}: expected {self.sha256}, got {got}'
                            + ('; the downloaded file was deleted' if downloaded else ''))


class FileSource(WeightSource):
    """A local file, or a folder holding model.safetensors / its shard index / pytorch_model.bin."""

    downloads = False

    def _local(self, cache_dir: Optional[PathLike]) -> Path:
        path = resolve_file(self.location)
        if path.is_dir():
            path = next((path / n for n in (SAFETENSORS_NAME, SHARDED_NAME, PICKLE_NAME) if (path / n).is_file()), path)
            if path.is_dir():
                raise SourceError(f'no {SAFETENSORS_NAME}, {SHARDED_NAME} or {PICKLE_NAME} in {self.location}')
        if not path.is_file():
            raise SourceError(f'weight file not found: {path}')
        return path

    def available_offline(self, cache_dir: Optional[PathLike] = None) -> bool:
        return resolve_file(self.location).exists()


class HubSource(WeightSource):
    """A Hugging Face repository, through huggingface_hub and its cache (``HF_HUB_OFFLINE=1`` works)."""

    def describe(self) -> str:
        return f'hf-hub:{self.location}' + (f'/{self.filename}' if self.filename else '')

    def _hub_names(self) -> List[str]:
        if self.filename and self.filename.endswith('.safetensors'):  # safetensors first, then a pickle of that name
            return [self.filename, self.filename[:-len('.safetensors')] + '.bin']
        return [self.filename] if self.filename else [SAFETENSORS_NAME, PICKLE_NAME]

    def _local(self, cache_dir: Optional[PathLike]) -> Path:
        from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache
        repo, _, revision = self.location.partition('@')
        offline = os.environ.get('HF_HUB_OFFLINE', '0') not in ('0', '', 'false', 'False')
        host = urlparse(constants.ENDPOINT).hostname or 'huggingface.co'
        if not offline and not reachable(host):  # no network: the cache or one clear line, not a minute of retries
            for name in self._hub_names():
                cached = try_to_load_from_cache(repo, name, revision=revision or None, cache_dir=cache_dir)
                if isinstance(cached, str):
                    return Path(cached)
            raise SourceError(f'cannot fetch {" or ".join(self._hub_names())} from the Hugging Face repo {repo!r} '
                              f'(no network access: {host} cannot be reached) and it is not in the cache')
        last: Optional[Exception] = None
        for name in self._hub_names():
            try:
                return Path(hf_hub_download(repo, name, revision=revision or None, cache_dir=cache_dir))
            except Exception as e:  # noqa: BLE001 -- not found, offline, no network: try the next name, then report
                last = e
        raise SourceError(f'cannot fetch {" or ".join(self._hub_names())} from the Hugging Face repo {repo!r}'
                          + (' (HF_HUB_OFFLINE is set: is it in the cache?)' if offline else ' (no network access?)')
                          + f': {type(last).__name__}: {str(last).splitlines()[0] if str(last) else ""}')

    def available_offline(self, cache_dir: Optional[PathLike] = None) -> bool:
        from huggingface_hub import try_to_load_from_cache
        repo = self.location.split('@', 1)[0]
        return any(isinstance(try_to_load_from_cache(repo, n, cache_dir=cache_dir), str) for n in self._hub_names())


class UrlSource(WeightSource):
    """A URL, downloaded once into the torch hub cache (or ``cache_dir``)."""

    def _url_path(self, cache_dir: Optional[PathLike]) -> Path:
        root = Path(cache_dir) if cache_dir else Path(torch.hub.get_dir()) / 'checkpoints'
        return root / (os.path.basename(urlparse(self.location).path) or 'checkpoint')

    def _local(self, cache_dir: Optional[PathLike]) -> Path:
        dst = self._url_path(cache_dir)
        if not dst.exists():
            host = urlparse(self.location).hostname
            if host and not reachable(host, 443 if self.location.startswith('https') else 80):
                raise SourceError(f'cannot download {self.location} (no network access: {host} cannot be reached)')
            dst.parent.mkdir(parents=True, exist_ok=True)
            try:
                torch.hub.download_url_to_file(self.location, str(dst), hash_prefix=None, progress=False)
            except Exception as e:  # noqa: BLE001 -- URLError, HTTPError, timeouts: one clear message
                raise SourceError(f'cannot download {self.location} (no network access, or the file moved?): '
                                  f'{type(e).__name__}: {e}') from None
        return dst

    def available_offline(self, cache_dir: Optional[PathLike] = None) -> bool:
        return self._url_path(cache_dir).is_file()


# The source kinds: the one table (a new kind is a class here and a row below).
SOURCE_KINDS: Dict[str, type] = {'file': FileSource, 'hf-hub': HubSource, 'url': UrlSource}


@functools.lru_cache(maxsize=None)
def reachable(host: str, port: int = 443, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to ``host`` opens within ``timeout`` seconds (asked once per host and process): a
    machine without network fails here in at most that long, where a download would retry for about a minute."""
    import socket
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def weight_source(cfg: Dict[str, Any]) -> Optional[WeightSource]:
    """The source a pretrained cfg names, in timm's order, or None when it names no bytes."""
    sha = _sha256_for_source(cfg)
    if cfg.get('source') == 'hf-hub' and cfg.get('hf_hub_id'):
        return WeightSource('hf-hub', cfg['hf_hub_id'], cfg.get('hf_hub_filename'), sha)
    if cfg.get('file'):
        return WeightSource('file', str(cfg['file']), None, sha)
    if cfg.get('hf_hub_id'):
        return WeightSource('hf-hub', cfg['hf_hub_id'], cfg.get('hf_hub_filename'), sha)
    url = cfg.get('url')
    if url:
        return WeightSource('url', url if isinstance(url, str) else url[0], None, sha)
    return None
