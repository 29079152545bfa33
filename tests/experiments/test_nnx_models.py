"""The sliced, sharded loader of Tunix NNX models from HF safetensors (experiments.lib.nnx_models).

Checked against Tunix's own loader and against Hugging Face's PyTorch model on the same folder (the logits),
and against an unsharded load (every parameter, bit for bit); each device's read is exactly its shard, and
two processes each read only their devices' slices.
"""

import json
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.lib import nnx_models
from oracles.helpers import REPO_ROOT, assert_close
from mos_jax import parallel

TOKENS = np.array([[2, 10, 20, 30, 40, 50, 60, 70, 80, 90, 100, 110, 120, 5, 6, 7],
                   [2, 7, 6, 5, 4, 3, 200, 300, 100, 11, 12, 13, 14, 15, 16, 17]], np.int32)


def logits(model):
  t = TOKENS.shape[1]
  positions = jnp.broadcast_to(jnp.arange(t), TOKENS.shape)
  mask = nnx_models.attention_mask(jnp.ones(TOKENS.shape, jnp.int32))
  return np.asarray(nnx_models.logits_of(model, nnx_models.hidden_states(model, TOKENS, positions, mask)))


def mesh_of(**sizes):
  return parallel.make_mesh(parallel.MeshConfig(**sizes))


@pytest.fixture(scope="module")
def sharded(tiny_gemma3):
  return nnx_models.load_model(tiny_gemma3, mesh_of(data=1, fsdp=4, tensor=2), dtype=jnp.float32)


def test_logits_equal_tunix_loader(tiny_gemma3, sharded):
  from tunix.models.gemma3 import params_safetensors

  tunix = params_safetensors.create_model_from_safe_tensors(str(tiny_gemma3), sharded.config, dtype=jnp.float32)
  assert_close(logits(sharded.model), logits(tunix), rtol=1e-5)


@pytest.mark.slow
def test_logits_equal_hugging_face_pytorch(tiny_gemma3, sharded):
  """Also checks the torch-free fixture against transformers: every tensor it expects is there, none extra."""
  import torch
  from transformers import Gemma3ForCausalLM

  ours = logits(sharded.model)
  hf, info = Gemma3ForCausalLM.from_pretrained(tiny_gemma3, dtype=torch.float32, output_loading_info=True)
  assert not any(info.values()), info
  with torch.no_grad():
    reference = hf.eval()(torch.tensor(TOKENS, dtype=torch.long)).logits.numpy()
  assert_close(ours, reference, rtol=1e-5)
  # The sliding-window layers matter at this length (window 8 < 16 tokens): a config read wrongly would show.
  assert np.abs(reference[:, -1] - reference[:, 7]).max() > 0.1 * np.abs(reference).max()


def test_sharded_load_equals_unsharded_and_follows_tunix_shardings(tiny_gemma3, sharded):
  single = nnx_models.load_model(tiny_gemma3, parallel.make_mesh(parallel.MeshConfig(data=1),
                                                                 devices=jax.devices()[:1]), dtype=jnp.float32)
  ours, whole = dict(nnx_models.iter_params(sharded.model)), dict(nnx_models.iter_params(single.model))
  assert ours.keys() == whole.keys() and len(ours) > 50
  for k in ours:
    np.testing.assert_array_equal(np.asarray(ours[k]), np.asarray(whole[k]), err_msg=k)
  specs = {k: tuple(x.sharding.spec) for k, x in ours.items()}
  # Tunix's annotations on this mesh: embedding (vocab over tensor, dim over fsdp), FFW (fsdp, tensor).
  assert specs["embedder.input_embedding"] == ("tensor", "fsdp")
  assert specs["layers.0.mlp.gate_proj.kernel"] == ("fsdp", "tensor")
  assert specs["layers.0.attn.kv_einsum.w"] == (None, "tensor", "fsdp", None)


def test_each_device_reads_exactly_its_shard(tiny_gemma3):
  reads = []

  class Counting(nnx_models.SafetensorsReader):
    def read(self, key, index):
      out = super().read(key, index)
      reads.append(out.nbytes)
      return out

  loaded = nnx_models.load_model(tiny_gemma3, mesh_of(data=1, fsdp=4, tensor=2), dtype=jnp.bfloat16, reader=Counting)
  params = dict(nnx_models.iter_params(loaded.model))
  # Each distinct shard is read once (replicas are not read again), and nothing else: the bytes read are the
  # model's bytes (the file is bf16, as the parameters).
  distinct = sum(x.dtype.itemsize * int(np.prod(x.sharding.shard_shape(x.shape))) * len(
      {tuple((s.start, s.stop) for s in idx) for idx in x.sharding.devices_indices_map(x.shape).values()})
      for x in params.values())
  assert sum(reads) == distinct == sum(x.nbytes for x in params.values())
  largest_shard = max(x.dtype.itemsize * int(np.prod(x.sharding.shard_shape(x.shape))) for x in params.values())
  assert max(reads) == largest_shard < max(x.nbytes for x in params.values()) // 2
  assert all(x.dtype == jnp.bfloat16 for x in params.values())


WORKER = textwrap.dedent("""
    import json, sys
    sys.modules["torch"] = None  # the loader must never need PyTorch
    import jax
    jax.config.update("jax_num_cpu_devices", 4)
    from mos_jax import parallel
    parallel.initialize(sys.argv[1], 2, int(sys.argv[2]))
    import numpy as np, jax.numpy as jnp
    from experiments.lib import nnx_models

    reads = []
    class Counting(nnx_models.SafetensorsReader):
      def read(self, key, index):
        out = super().read(key, index)
        reads.append(out.nbytes)
        return out

    mesh = parallel.make_mesh(parallel.MeshConfig(data=1, fsdp=4, tensor=2))
    loaded = nnx_models.load_model(sys.argv[3], mesh, dtype=jnp.bfloat16, reader=Counting)
    params = dict(nnx_models.iter_params(loaded.model))
    mine = sum(s.data.nbytes for x in params.values()
               for s in {tuple((i.start, i.stop) for i in s.index): s for s in x.addressable_shards}.values())
    print("RESULT " + json.dumps({"read": sum(reads), "largest": max(reads), "mine": mine,
                                  "model": sum(x.nbytes for x in params.values()),
                                  "sums": {k: float(np.asarray(jax.experimental.multihost_utils.process_allgather(
                                      x, tiled=True), np.float32).sum()) for k, x in list(params.items())[:6]}}))
""")


def test_two_processes_each_read_only_their_devices_slices(tiny_gemma3, sharded):
  with __import__("socket").socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  env = {k: v for k, v in __import__("os").environ.items() if k != "XLA_FLAGS"} | {"PYTHONPATH": str(REPO_ROOT)}
  procs = [subprocess.Popen([sys.executable, "-c", WORKER, f"127.0.0.1:{port}", str(i), str(tiny_gemma3)],
                            cwd=REPO_ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
  outs = [p.communicate(timeout=300)[0] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
  results = [json.loads(next(l for l in o.splitlines() if l.startswith("RESULT "))[7:]) for o in outs]
  whole = dict(nnx_models.iter_params(sharded.model))
  for r in results:
    # A process reads exactly the distinct shards its 4 devices hold: half the model here (fsdp x tensor
    # splits every large tensor; the few replicated norms are read by both).
    assert r["read"] == r["mine"] < 0.6 * r["model"], r
    for k, total in r["sums"].items():
      assert_close(total, float(np.asarray(whole[k], np.float32).sum()), rtol=1e-2)


LLAMA31 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
           "original_max_position_embeddings": 16}


@pytest.mark.slow
@pytest.mark.parametrize("family,scaling", [("llama3", None), ("llama3", LLAMA31), ("qwen3", None)],
                         ids=["llama3", "llama3.1-scaling", "qwen3"])
def test_llama3_and_qwen3_logits_equal_hugging_face(tmp_path, family, scaling):
  """Tunix 0.1.7's Llama 3 / Qwen 3 ignore rope_theta (500,000 for Llama 3) and rope_scaling; the loader's
  configs carry both and hidden_states rotates with them."""
  import torch
  from oracles.tiny_hf import decoder_folder
  from transformers import AutoModelForCausalLM

  folder = decoder_folder(tmp_path / family, family, rope_scaling=scaling)
  loaded = nnx_models.load_model(folder, mesh_of(data=2, fsdp=2, tensor=2), dtype=jnp.float32)
  hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
  tokens = TOKENS % 300
  with torch.no_grad():
    reference = hf(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
  t = tokens.shape[1]
  mask = nnx_models.attention_mask(jnp.ones(tokens.shape, jnp.int32))
  h = nnx_models.hidden_states(loaded.model, tokens, jnp.broadcast_to(jnp.arange(t), tokens.shape), mask)
  assert_close(np.asarray(nnx_models.logits_of(loaded.model, h)), reference, rtol=1e-5)
