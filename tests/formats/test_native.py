"""The native MoS adapter file: round trips, damage and other models refused, old formats still read."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from mos_jax import CorruptError, MismatchError, MoSConfig, adapt, export_peft, load_adapter, merge, save_adapter
from mos_jax.train import adapter_identity
from oracles.helpers import (EXPORT_CONFIG, PRE_RESTRUCTURE, injected_logits, pre_restructure_adapter,
                             random_pools, trained_adapter)
from oracles.reference import named_arrays_sha256

HEADER_KEY = "mos_jax.adapter"  # the native file's one metadata entry (format 3)


@pytest.fixture(scope="module")
def trained(tiny_llama):
  return trained_adapter(tiny_llama.params, EXPORT_CONFIG)


def test_native_file_round_trip(tiny_llama, trained, tmp_path):
  path = save_adapter(tmp_path / "adapter.safetensors", trained)
  assert [p.name for p in tmp_path.iterdir()] == ["adapter.safetensors"]  # no temp file left
  loaded = load_adapter(path, params=tiny_llama.params)
  assert loaded.spec == trained.spec and loaded.spec.digest == trained.spec.digest
  assert loaded.spec.config == EXPORT_CONFIG and loaded.spec.groups == trained.spec.groups
  assert loaded.spec.version == trained.spec.version and loaded.base_params == trained.base_params
  for g in trained.spec.groups:
    np.testing.assert_array_equal(loaded.spec.index_a[g.name], trained.spec.index_a[g.name])
    np.testing.assert_array_equal(loaded.spec.index_b[g.name], trained.spec.index_b[g.name])
  jax.tree_util.tree_map(np.testing.assert_array_equal, loaded.pools, trained.pools)
  # Identical inputs to identical computations: bit-identical outputs.
  np.testing.assert_array_equal(injected_logits(tiny_llama, tiny_llama.params, loaded),
                                injected_logits(tiny_llama, tiny_llama.params, trained))


def test_native_file_keeps_bfloat16_pools_exactly(tiny_llama, tmp_path):
  adapter = adapt(tiny_llama.params, dataclasses.replace(EXPORT_CONFIG, pool_dtype="bfloat16"))
  pools = random_pools(adapter.pools, seed=1)
  loaded = load_adapter(save_adapter(tmp_path / "a.safetensors", adapter.replace(pools=pools)))
  # The base model's size is stored in the file, so it is known without params.
  assert adapter.base_params > 0 and loaded.base_params == adapter.base_params
  for got, want in zip(jax.tree_util.tree_leaves(loaded.pools), jax.tree_util.tree_leaves(pools)):
    assert got.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


def test_native_file_is_small_next_to_lora(tiny_llama, tmp_path):
  # MoS stores r_e·Σ L(d_in + d_out) pool values plus int32 routing; LoRA at the same active
  # rank (the PEFT export) stores r·Σ L(d_in + d_out): here r / r_e = 4.
  adapter = adapt(tiny_llama.params, MoSConfig(rank=4, equivalent_rank=1, shards_per_vector=2))
  native = save_adapter(tmp_path / "mos.safetensors", adapter).stat().st_size
  peft = (export_peft(tmp_path / "peft", adapter) / "adapter_model.safetensors").stat().st_size
  assert native < 0.5 * peft, (native, peft)


def two_layer_q_proj_model():
  return {"model": {"layers": {str(i): {"self_attn": {"q_proj": {"kernel": jnp.zeros((32, 32))}}}
                               for i in range(2)}}}


def test_native_file_refuses_another_model_and_damage(trained, tmp_path):
  path = save_adapter(tmp_path / "adapter.safetensors", trained)
  with pytest.raises(MismatchError, match="another model") as err:
    load_adapter(path, params=two_layer_q_proj_model())
  # The kernels of a group this model lacks are named with their shapes.
  assert ("model/layers/0/mlp/up_proj: the adapter expects a kernel (32, 48), the params have none"
          in str(err.value))
  assert "model/layers/1/self_attn/q_proj]" not in str(err.value)  # shared kernels are no difference
  # A model with more layers than the adapter's: the extra kernels are named.
  with pytest.raises(MismatchError, match=r"model/layers/5/self_attn/q_proj: the params have a targeted kernel "
                                          r"\(32, 32\) the adapter has no factors for"):
    load_adapter(path, params={"model": {"layers": {str(i): {"self_attn": {"q_proj": {
        "kernel": jnp.zeros((32, 32))}}} for i in range(6)}}})

  data = bytearray(path.read_bytes())
  data[-5] ^= 0xFF  # one flipped byte in the last tensor: still valid safetensors
  garbled = tmp_path / "garbled.safetensors"
  garbled.write_bytes(bytes(data))
  with pytest.raises(CorruptError, match="checksum"):
    load_adapter(garbled)
  truncated = tmp_path / "truncated.safetensors"
  truncated.write_bytes(path.read_bytes()[:-100])
  with pytest.raises(CorruptError, match="not a readable safetensors"):
    load_adapter(truncated)
  # A file of an unknown format (or of another tool) is refused by its format entry.
  header, tensors = read_native(path)
  old = tmp_path / "old.safetensors"
  save_file(tensors, str(old), metadata={"format": "mos_jax.adapter/1"})
  with pytest.raises(CorruptError, match="format 'mos_jax.adapter/1', expected 'mos_jax.adapter/3'"):
    load_adapter(old)


def test_truncated_adapter_files_are_reported_as_damage(trained, tmp_path):
  data = save_adapter(tmp_path / "a.safetensors", trained).read_bytes()
  for cut in np.linspace(0, len(data) - 1, 12).astype(int):
    (tmp_path / "cut.safetensors").write_bytes(data[:cut])
    with pytest.raises(CorruptError):
      load_adapter(tmp_path / "cut.safetensors")


def read_native(path):
  with safe_open(str(path), framework="numpy") as f:
    meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
  assert list(meta) == [HEADER_KEY]
  return json.loads(meta[HEADER_KEY]), tensors


def write_native(path, header, tensors):
  save_file(tensors, str(path), metadata={HEADER_KEY: json.dumps(header)})
  return path


def test_native_file_header_is_inside_the_checksum(trained, tmp_path):
  """Issue 13.3: one flipped bit turned alpha 16 into 96 and the file loaded (scale 48, not 8)."""
  path = save_adapter(tmp_path / "adapter.safetensors", trained)
  data = path.read_bytes()
  # The header is a JSON string inside safetensors' own JSON header: its quotes are escaped.
  at = data.index(b'alpha\\":8.0')
  flipped = bytearray(data)
  flipped[at + len(b'alpha\\":')] ^= 0x01  # "8.0" -> "9.0": still valid JSON, still a valid config
  (tmp_path / "alpha.safetensors").write_bytes(bytes(flipped))
  with pytest.raises(CorruptError, match="checksum mismatch"):
    load_adapter(tmp_path / "alpha.safetensors")
  # A rank edited 4 -> 2 is reported as damage, not as a reshape error deep in assemble.
  at = data.index(b'"rank\\":4')
  edited = data[:at] + b'"rank\\":2' + data[at + len(b'"rank\\":4'):]
  (tmp_path / "rank.safetensors").write_bytes(edited)
  with pytest.raises(CorruptError, match="checksum mismatch"):
    load_adapter(tmp_path / "rank.safetensors")
  # Every single-bit flip inside the header is damage (or unreadable), never a quiet load.
  start, end = 8, 8 + int.from_bytes(data[:8], "little")
  rng = np.random.default_rng(0)
  for pos in rng.choice(np.arange(start, end), size=40, replace=False):
    bad = bytearray(data)
    bad[pos] ^= 1 << int(rng.integers(8))
    (tmp_path / "bit.safetensors").write_bytes(bytes(bad))
    with pytest.raises(CorruptError):
      load_adapter(tmp_path / "bit.safetensors")


def test_native_file_with_valid_checksum_but_impossible_contents_is_refused(trained, tmp_path):
  """A hand-edited file whose checksum was recomputed: out-of-range shard ids are caught on load."""
  import hashlib

  def _digest(header, tensors):  # the documented checksum, recomputed independently to forge a file
    body = json.dumps({k: v for k, v in header.items() if k != "sha256"}, sort_keys=True, separators=(",", ":"))
    h = hashlib.sha256(body.encode())
    h.update(named_arrays_sha256((k, tensors[k]) for k in sorted(tensors)).encode())
    return h.hexdigest()

  header, tensors = read_native(save_adapter(tmp_path / "a.safetensors", trained))
  name = next(k for k in tensors if k.endswith("index_a"))
  tensors[name] = tensors[name] + 1000
  header["sha256"] = _digest(header, tensors)
  with pytest.raises(CorruptError, match="do not fit together.*outside the pool"):
    load_adapter(write_native(tmp_path / "forged.safetensors", header, tensors))


def test_native_format_2_files_still_load_with_a_warning(trained, tmp_path):
  header, tensors = read_native(save_adapter(tmp_path / "a.safetensors", trained))
  legacy = {"format": "mos_jax.adapter/2", "mos_config": json.dumps(header["mos_config"]),
            "routing_version": header["routing_version"], "groups": json.dumps(header["groups"]),
            "base_params": str(header["base_params"]),
            "sha256": named_arrays_sha256((k, tensors[k]) for k in sorted(tensors))}
  save_file(tensors, str(tmp_path / "v2.safetensors"), metadata=legacy)
  with pytest.warns(UserWarning, match="format-2 adapter file"):
    loaded = load_adapter(tmp_path / "v2.safetensors")
  assert loaded.spec == trained.spec
  jax.tree_util.tree_map(np.testing.assert_array_equal, loaded.pools, trained.pools)


def test_native_files_are_byte_reproducible_across_processes(tmp_path):
  """Issue 13.9: safetensors wrote several metadata keys in a per-process random order."""
  import hashlib
  import subprocess
  import sys
  script = (
      "import sys, jax.numpy as jnp, mos_jax\n"
      "params = {'layers': {str(i): {'q_proj': {'kernel': jnp.ones((8, 8))}, 'v_proj': {'kernel': jnp.ones((8, 4))}}"
      " for i in range(3)}}\n"
      "mos_jax.save_adapter(sys.argv[1], mos_jax.adapt(params, mos_jax.MoSConfig(rank=2, equivalent_rank=1, seed=5,"
      " target_modules=['q_proj', 'v_proj'])))\n")
  digests = set()
  for k in range(3):
    out = tmp_path / f"a{k}.safetensors"
    subprocess.run([sys.executable, "-c", script, str(out)], check=True, env={**os.environ, "PYTHONHASHSEED": str(k)})
    digests.add(hashlib.sha256(out.read_bytes()).hexdigest())
  assert len(digests) == 1


def test_native_file_mismatch_names_the_shared_groups_missing_layers(trained, tmp_path):
  """The adapter's q_proj has 4 layers, this model's 2: that difference must lead the message,
  ahead of the 24 kernels of the groups this model lacks entirely."""
  path = save_adapter(tmp_path / "adapter.safetensors", trained)
  with pytest.raises(MismatchError, match="another model") as err:
    load_adapter(path, params=two_layer_q_proj_model())
  message = str(err.value)
  assert ("model/layers/*/self_attn/q_proj: the adapter has 4 kernels of this type, the params match 2"
          in message)
  assert "model/layers/3/self_attn/q_proj: the adapter expects a kernel (32, 32), the params have none" in message
  assert "... and 7 more" in message


def test_native_file_stores_the_groups_layouts(trained, tmp_path):
  path = save_adapter(tmp_path / "adapter.safetensors", trained)
  header, _ = read_native(path)
  assert header["format"] == "mos_jax.adapter/3"
  groups = header["groups"]
  assert groups["model/layers/*/self_attn/k_proj"] == {
      "paths": [f"model/layers/{i}/self_attn/k_proj" for i in range(4)], "kernel_shape": [32, 16],
      "in_axes": [0], "out_axes": [1], "num_layers": 4, "layer_axis": None}
  assert groups == adapter_identity(trained)["groups"]


def test_native_file_round_trips_a_declared_stack(tmp_path):
  """A stacked group's layer axis travels in the file: the loaded adapter merges the same."""
  params = {"layers": {"q": {"kernel": jnp.asarray(np.random.default_rng(0).normal(size=(8, 3, 16)), jnp.float32)}}}
  adapter = adapt(params, MoSConfig(rank=2, equivalent_rank=1, shards_per_vector=2, target_modules=["q"],
                                    stacked_modules=["q"], layer_axis=1))
  adapter = adapter.replace(pools=random_pools(adapter.pools))
  loaded = load_adapter(save_adapter(tmp_path / "stack.safetensors", adapter), params=params)
  assert loaded.groups == adapter.groups and loaded.groups[0].layer_axis == 1 and loaded.spec == adapter.spec
  np.testing.assert_array_equal(merge(params, loaded)["layers"]["q"]["kernel"],
                                merge(params, adapter)["layers"]["q"]["kernel"])
  with pytest.raises(MismatchError, match=r"layers/q: the adapter expects a kernel \(8, 3, 16\), the params have "
                                          r"\(3, 8, 16\)"):
    load_adapter(tmp_path / "stack.safetensors", params={"layers": {"q": {"kernel": jnp.zeros((3, 8, 16))}}})
  # A stack needs naming rules (with {layer}) to become per-layer PyTorch modules.
  with pytest.raises(NotImplementedError, match=r"is a stacked kernel \(8, 3, 16\): name its PyTorch modules"):
    export_peft(tmp_path / "peft", adapter)


def test_a_file_written_before_the_restructure_loads_and_saves_back_byte_for_byte(tmp_path):
  """The spec renamed (``Routing`` -> ``AdapterSpec``), the file format did not change by a byte."""
  params, expected = pre_restructure_adapter()
  old = PRE_RESTRUCTURE / "adapter.safetensors"
  loaded = load_adapter(old, params=params)
  assert loaded.spec == expected.spec and loaded.spec.version == "mos-routing-v1"
  assert loaded.groups[-1].stacked and loaded.base_params == expected.base_params
  jax.tree_util.tree_map(np.testing.assert_array_equal, loaded.pools, expected.pools)
  assert save_adapter(tmp_path / "again.safetensors", loaded).read_bytes() == old.read_bytes()
  assert save_adapter(tmp_path / "fresh.safetensors", expected).read_bytes() == old.read_bytes()


def test_a_missing_file_or_a_folder_is_named_for_what_it_is(trained, tmp_path):
  """Issue 20 (unclear errors): both were a CorruptError ("not a readable safetensors file")."""
  missing = tmp_path / "nope" / "adapter.safetensors"
  with pytest.raises(FileNotFoundError, match=rf"No adapter file.*{missing}"):
    load_adapter(missing)
  folder = export_peft(tmp_path / "peft", trained)
  with pytest.raises(IsADirectoryError, match=rf"{folder} is a folder, not an adapter file.*load_peft_factors"):
    load_adapter(folder)
