"""Fixtures of the training entry point's tests: a tiny Gemma 3 in HF layout and an instruction file."""

import pytest

from tiny_hf import gemma3_folder, instruction_file


@pytest.fixture(scope="session")
def tiny_gemma3(tmp_path_factory):
  """A tiny Gemma 3 folder: bf16 safetensors in 4 shards with an index, config.json, tokenizer with chat template."""
  return gemma3_folder(tmp_path_factory.mktemp("tiny_gemma3"))


@pytest.fixture(scope="session")
def instruction_rows(tmp_path_factory):
  return instruction_file(tmp_path_factory.mktemp("data") / "rows.jsonl")
