"""`gs://` run folders through a local fake GCS (the `fake_gcs` fixture of conftest.py): the metrics log. A
whole pod run that checkpoints, is killed, resumes and writes its adapter into the bucket is
tests/experiments/test_train_pod.py."""

import json

import pytest

from oracles.fake_gcs import BUCKET


def gs(path):
  from etils import epath
  return epath.Path(f"gs://{BUCKET}/{path}")


def rows(path):
  return [json.loads(line) for line in path.read_text().splitlines()]


def test_jsonl_log_in_a_bucket_keeps_appending_and_truncates_on_resume(fake_gcs):
  from experiments.lib.workdir import JsonlLog

  target = gs("log/metrics.jsonl")
  log = JsonlLog(target, sync_seconds=0)
  for step in (1, 2, 3):
    log.write({"step": step, "loss": 1.0 / step})
    assert [r["step"] for r in rows(target)] == list(range(1, step + 1))  # uploaded as it goes
  log.close()
  # A run resumed from step 2 drops the rows it will compute again, then appends.
  log = JsonlLog(target, keep_until=2, sync_seconds=3600)
  assert [r["step"] for r in rows(target)] == [1, 2]
  log.write({"step": 3, "loss": 0.5})
  assert [r["step"] for r in rows(target)] == [1, 2]  # not uploaded until sync or close
  log.close()
  assert rows(target)[-1] == {"step": 3, "loss": 0.5}


def test_a_bucket_without_gcsfs_fails_early_with_the_fix(monkeypatch):
  import importlib.util

  from experiments.lib import workdir

  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gcsfs" else real(name, *a))
  with pytest.raises(RuntimeError, match=r"pip install -e '\.\[gcs\]'"):
    workdir.require_filesystem("gs://b/run")
  workdir.require_filesystem("/tmp/run")  # local paths need nothing


def test_data_and_model_folders_in_a_bucket_are_fetched_safetensors_only_and_never_stale(fake_gcs, tmp_path,
                                                                                        tiny_gemma3):
  from experiments.lib import chat_data, nnx_models

  rows = gs("data/rows.jsonl")
  rows.write_text('{"prompt": "a", "response": "b"}\n')
  assert chat_data.Records(str(rows), tmp_path)[0]["prompt"] == "a"
  rows.write_text('{"prompt": "c", "response": "d"}\n{"prompt": "e", "response": "f"}\n')  # replaced in the bucket
  again = chat_data.Records(str(rows), tmp_path)
  assert len(again) == 2 and again[0]["prompt"] == "c"
  with pytest.raises(FileNotFoundError, match="does not exist"):
    chat_data.Records(f"gs://{BUCKET}/data/missing.jsonl", tmp_path)

  for f in tiny_gemma3.iterdir():
    gs(f"models/tiny/{f.name}").write_bytes(f.read_bytes())
  gs("models/tiny/pytorch_model.bin").write_bytes(b"a pickle: never fetched")
  folder = nnx_models.local_model_dir(f"gs://{BUCKET}/models/tiny", tmp_path)
  assert sorted(p.name for p in folder.iterdir()) == sorted([".complete", *(f.name for f in tiny_gemma3.iterdir())])
  assert nnx_models.read_config(folder)["model_type"] == "gemma3_text"


def test_a_torn_last_line_is_skipped_and_damage_in_the_middle_refused(tmp_path):
  from experiments.lib.workdir import JsonlLog, read_rows

  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')  # killed mid-write
  with pytest.warns(UserWarning, match="torn last line"):
    log = JsonlLog(path, keep_until=2)
  assert log.rows() == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}]
  log.close()
  path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo\n{"step": 3, "loss": 1.0}\n')
  with pytest.raises(ValueError, match="line 2 of 3 is not JSON"):
    read_rows(path)
