"""The teacher-signal cache: run the teacher once, distill from disk.

Layout of a cache directory::

    plan.json                 what this cache is (spec, teacher/tokenizer/data fingerprints)
    shard-00000.safetensors   examples [0, S), memory-mapped columns
    shard-00000.json          that shard's record (rows, bytes, sha256), written after it
    ...
    manifest.json             plan + all shard records; written once every shard exists

Shard ``j`` holds examples ``[j*S, (j+1)*S)`` of the encoded dataset, keyed by example id
*and* by a content hash of the example's tokens and labels (EasyDistill #21: a cache
indexed by step silently reads zeros in epoch 2; ours refuses any example whose tokens
changed). Each file is written atomically, so a killed run resumes at the first shard
without a valid record; a process of rank ``r`` of ``W`` writes the shards ``j % W == r``
and whichever process finishes last writes the manifest. Shard contents depend only on
the shard's examples (batches are formed inside a shard, sampling is seeded per
example), so any number of processes gives the same cache as one.

Signals (per target row, i.e. per response token; :func:`~potstill.signals.target_index`):

* ``topk``: the k largest teacher log-probs at the cache temperature, their ids and the
  exact log-mass of the tail (so a reader may choose ``tail: bucket`` or ``renormalize``);
* ``sampled``: Anshumann et al. (2025) random-sampling KD: ``draws`` ids drawn with
  replacement from the teacher at ``proposal_temperature``; unique ids, their counts
  (or importance weights when the proposal is not the teacher) and log-probs, ragged;
* ``dense``: the full log-softmax at temperature 1 (any distillation temperature can be
  applied on read); for small vocabularies.

Ids are packed to ``ceil(log2 V)`` bits, log-probs stored as fp32/fp16/bf16/8-bit
(:mod:`potstill.signals.quant`).
"""

from .encode import extract
from .format import FORMAT, MANIFEST, PLAN, VERSION, CacheKind, CacheSpec, read_manifest
from .read import CachedSignal
from .write import finalize_cache, write_cache

__all__ = [
    "FORMAT",
    "MANIFEST",
    "PLAN",
    "VERSION",
    "CacheKind",
    "CacheSpec",
    "CachedSignal",
    "extract",
    "finalize_cache",
    "read_manifest",
    "write_cache",
]
