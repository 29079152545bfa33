"""`python -m experiments.train`'s checks before loading, its configs, and the instruction data pipeline."""

import json

import numpy as np
import pytest

from experiments import train
from experiments.lib import chat_data, chip_memory
from experiments.lib.run_config import load_config, parse_mesh
from mos_jax.parallel import MeshConfig
from oracles.helpers import REPO_ROOT

CONFIGS = sorted((REPO_ROOT / "experiments" / "configs").glob("*.py"))


def test_mesh_flag():
  assert parse_mesh("fsdp=4,tensor=2") == MeshConfig(data=-1, fsdp=4, tensor=2)
  assert parse_mesh("data=2,fsdp=-1") == MeshConfig(data=2, fsdp=-1, tensor=1)
  with pytest.raises(ValueError, match="data=N, fsdp=N, tensor=N"):
    parse_mesh("model=4")


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_config_loads_and_is_consistent(path):
  cfg = load_config(str(path))
  if cfg.accelerator:
    chips = chip_memory.chips_of(cfg.accelerator)
    assert chips == 16 and cfg.mesh.shape(chips)  # the mesh fits the slice
    data, fsdp, _ = cfg.mesh.shape(chips)
    assert cfg.global_batch % (data * fsdp) == 0 and cfg.model.startswith("hf://")
    assert cfg.hbm_gib == chip_memory.hbm_of(cfg.accelerator)


def run_main(tmp_path, tiny_gemma3, instruction_rows, *extra):
  return train.main(["--config", str(REPO_ROOT / "experiments" / "configs" / "tiny_gemma3_cpu.py"), "--model",
                     str(tiny_gemma3), "--data", str(instruction_rows), "--workdir", str(tmp_path / "run"),
                     "--no-progress", *extra])


def test_a_run_that_does_not_fit_is_refused_before_loading_with_the_fixes(tmp_path, tiny_gemma3, instruction_rows,
                                                                          monkeypatch):
  loads = []
  monkeypatch.setattr("experiments.lib.nnx_models.load_model", lambda *a, **k: loads.append(a))
  small = tmp_path / "small.py"
  small.write_text((REPO_ROOT / "experiments" / "configs" / "tiny_gemma3_cpu.py").read_text()
                   + "\nimport dataclasses\nCONFIG = dataclasses.replace(CONFIG, hbm_gib=0.0002)\n")
  with pytest.raises(SystemExit) as refused:
    train.main(["--config", str(small), "--model", str(tiny_gemma3), "--data", str(instruction_rows),
                "--workdir", str(tmp_path / "run"), "--mesh", "data=4,tensor=2"])
  message = str(refused.value)
  assert "per chip" in message and "--mesh fsdp=8" in message and "remat='decoder'" in message
  assert "global_batch=" in message and "seq_len=16" in message and loads == []


def test_global_batch_must_divide_over_the_data_parallel_devices(tmp_path, tiny_gemma3, instruction_rows):
  with pytest.raises(SystemExit, match=r"global_batch=6 is not divisible by the data-parallel size 4.*multiple of 4"):
    run_main(tmp_path, tiny_gemma3, instruction_rows, "--mesh", "fsdp=4,tensor=2", "--global-batch", "6")


def test_memory_of_the_base_is_its_shard_under_each_mesh(tiny_gemma3):
  from mos_jax import parallel
  from experiments.lib import nnx_models

  hf = nnx_models.read_config(tiny_gemma3)
  cfg = load_config(str(REPO_ROOT / "experiments" / "configs" / "tiny_gemma3_cpu.py"))
  whole = chip_memory.plan(cfg, hf, parallel.make_mesh(MeshConfig(data=1), devices=[parallel.make_mesh(
      MeshConfig(data=-1)).devices.flat[0]]))[0].base
  split = chip_memory.plan(cfg, hf, parallel.make_mesh(MeshConfig(data=1, fsdp=4, tensor=2)))[0].base
  loaded = nnx_models.load_model(tiny_gemma3, parallel.make_mesh(MeshConfig(data=1, fsdp=4, tensor=2)))
  params = dict(nnx_models.iter_params(loaded.model))
  assert whole == sum(x.nbytes for x in params.values())  # bf16 base, one device: the whole model
  assert split == sum(x.addressable_shards[0].data.nbytes for x in params.values()) < whole / 4


def test_chat_rows_are_masked_to_the_assistant_turns(tiny_gemma3, instruction_rows):
  from transformers import AutoTokenizer

  tok = AutoTokenizer.from_pretrained(tiny_gemma3)
  records = chat_data.Records(str(instruction_rows))
  ids, mask = chat_data.encode_chat(tok, chat_data.messages_of(records[2]))  # a two-turn chat row
  scored = tok.decode([i for i, m in zip(ids, mask) if m])
  row = json.loads(instruction_rows.read_text().splitlines()[2])
  answers = [m["content"] for m in row["messages"] if m["role"] == "assistant"]
  assert scored == f"{answers[0]}<end_of_turn>\n{answers[1]}<end_of_turn>\n"
  assert tok.decode(ids).startswith("<bos><start_of_turn>user\n")


def test_batches_are_a_function_of_the_step_and_rows_are_made_where_they_are_held(tiny_gemma3, instruction_rows):
  from transformers import AutoTokenizer

  tok = AutoTokenizer.from_pretrained(tiny_gemma3)
  records = chat_data.Records(str(instruction_rows))
  def make(**kw):
    return chat_data.InstructionBatches(records, range(40), tok, seq_len=32, global_batch=8, seed=3, **kw)

  a, b = make(), make()
  for step in (1, 5, 9):  # step 6 starts the second epoch (40 rows / 8 per step)
    np.testing.assert_array_equal(a(step)[0]["tokens"], b(step)[0]["tokens"])
    whole = a.rows(step, 0, 8)
    np.testing.assert_array_equal(b.rows(step, 4, 6)["targets"], whole["targets"][4:6])
  seen = [a.example(p) for p in range(40)]
  assert sorted(seen) == list(range(40))  # an epoch visits every training row once
  packed = chat_data.InstructionBatches(records, range(40), tok, seq_len=160, global_batch=8, seed=3,
                                        pack=2).rows(1, 0, 1)
  first, second = (a.encoded(a.example(p)) for p in (0, 1))  # the same order: pack 2 takes examples 0 and 1
  n1, n2 = len(first[0]), len(second[0])
  assert list(packed["segments"][0][:n1 + n2]) == [1] * n1 + [2] * n2 and packed["segments"][0][n1 + n2:].sum() == 0
  assert list(packed["positions"][0][n1:n1 + n2]) == list(range(n2))  # positions restart in each example
  assert packed["weights"][0][n1 - 1] == 0  # the first example's last token does not predict the second's first
  with pytest.raises(ValueError, match="rows: checkpoint 41, now 40"):
    a.set_state({**a.get_state(), "rows": 41})


def test_parquet_rows_or_the_install_that_reads_them(tmp_path):
  import importlib.util

  path = tmp_path / "rows.parquet"
  if importlib.util.find_spec("pyarrow") is None:
    path.write_bytes(b"PAR1")
    with pytest.raises(ImportError, match="needs pyarrow: pip install pyarrow"):
      chat_data.Records(str(path))
    return
  import pandas as pd
  pd.DataFrame({"prompt": ["a", "b"], "response": ["c", "d"]}).to_parquet(path)
  records = chat_data.Records(str(path))
  assert len(records) == 2 and chat_data.messages_of(records[1])[1] == {"role": "assistant", "content": "d"}


def test_bad_rows_are_named(tmp_path):
  path = tmp_path / "rows.jsonl"
  path.write_text('{"prompt": "a", "response": "b"}\n\n{"question": "x"}\n')
  records = chat_data.Records(str(path))
  assert len(records) == 2  # the blank line is not a row
  with pytest.raises(ValueError, match=r"row 1: expected 'messages' or 'prompt' and 'response', found keys "
                                       r"\['question'\]"):
    chat_data.messages_of(records[1], "row 1")


def test_a_run_folder_that_cannot_be_written_is_refused_before_loading(tmp_path, tiny_gemma3, instruction_rows,
                                                                      monkeypatch):
  from etils import epath

  def denied(self, *args, **kwargs):
    raise PermissionError("403: does not have storage.objects.create access")

  loads = []
  monkeypatch.setattr("experiments.lib.nnx_models.load_model", lambda *a, **k: loads.append(a))
  monkeypatch.setattr(type(epath.Path(tmp_path)), "write_text", denied)
  with pytest.raises(SystemExit, match=r"Cannot write to the run folder .*roles/storage.objectAdmin"):
    run_main(tmp_path, tiny_gemma3, instruction_rows)
  assert loads == []
