"""grokctl's native checkpoint format (safetensors shards + index); layout in `format.py`.

Writer API (used by `grokctl quantize`): `NativeWriter(dst_tmp_dir, config, scheme,
max_shard_bytes)` with `.add(name, array | (qweight, scales))` and `.finish(tokenizer=...)`;
`write_native(dst, config, scheme, tensors)`. Reader: `detect` / `read` (registered in
`checkpoint.index.FORMATS`), `parse_header` for one safetensors file.
"""

from grokctl.checkpoint.native.format import (
    EMBEDDING_KINDS,
    EMBEDDINGS,
    FORMAT,
    FORMAT_VERSION,
    GROUP_AXIS,
    INDEX_NAME,
    MAX_SHARD_BYTES,
    QUANTIZED_PATTERNS,
    QWEIGHT,
    SCALES,
    TOKENIZER_NAME,
    QuantScheme,
    group_rows,
    native_config_json,
    pack_int4,
    shard_name,
    unpack_int4,
)
from grokctl.checkpoint.native.reader import (
    NAME,
    WHAT,
    check_entry,
    detect,
    parse_header,
    read,
    read_scheme,
    shard_files,
)
from grokctl.checkpoint.native.writer import (
    NativeWriter,
    Value,
    repack_release,
    write_manifest,
    write_native,
)

__all__ = [
    "EMBEDDING_KINDS",
    "EMBEDDINGS",
    "FORMAT",
    "FORMAT_VERSION",
    "GROUP_AXIS",
    "INDEX_NAME",
    "MAX_SHARD_BYTES",
    "NAME",
    "QUANTIZED_PATTERNS",
    "QWEIGHT",
    "SCALES",
    "TOKENIZER_NAME",
    "WHAT",
    "NativeWriter",
    "QuantScheme",
    "Value",
    "check_entry",
    "detect",
    "group_rows",
    "native_config_json",
    "pack_int4",
    "parse_header",
    "read",
    "read_scheme",
    "repack_release",
    "shard_name",
    "shard_files",
    "unpack_int4",
    "write_manifest",
    "write_native",
]
