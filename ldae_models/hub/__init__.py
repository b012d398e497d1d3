"""Weights: where bytes come from (``sources``), reading them safely and loading strictly (``loading``), publishing
and export (``publish``)."""
from .loading import (CheckpointMismatchError, load_pretrained, load_state_dict_strict, read_checkpoint, read_pretrained,
                      unwrap_state_dict)
from .publish import export_timm, push_to_hub, save_pretrained, save_sharded
from .sources import (
    SOURCE_KEYS, CheckpointError, ChecksumError, SourceError, WeightSource, cfg_sha256, packaged_file, sha256_note,
    sha256_of, strip_weights_info, weight_source,
)
