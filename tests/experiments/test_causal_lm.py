"""Decoder path: response-only loss masking, LM fine-tuning, generation, GSM8K scoring."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mos_jax
import mos_jax.hf
from experiments.lib.config import TrainConfig
from experiments.lib.gsm8k_data import exact_match, final_number, generate_problems, load_jsonl
from experiments.lib.lm import decode_new, encode, encode_example, left_pad_prompts, masked_lm_loss, train_lm
from experiments.lib.models import load_causal_lm, tiny_llama, train_tokenizer
from oracles.helpers import REPO_ROOT, assert_close, random_pools

FACTS = [("capital of France?", "Paris"), ("capital of Japan?", "Tokyo"), ("color of the sky?", "blue"),
         ("two plus two?", "four"), ("opposite of hot?", "cold"), ("largest planet?", "Jupiter"),
         ("author of Hamlet?", "Shakespeare"), ("freezing point of water?", "zero degrees")]


@pytest.fixture(scope="module")
def tokenizer():
  texts = [f"Question: {q}\nAnswer: {a}" for q, a in FACTS] + [q + " " + a for q, a in generate_problems(0, 200)]
  return train_tokenizer(texts, vocab_size=400)


def test_masked_loss_by_hand():
  # Sequence [p0 p1 | r0 r1 pad], vocab 3: targets are positions 1..4, only r0, r1 count.
  ids = jnp.array([[0, 1, 2, 1, 0]])
  loss_mask = jnp.array([[0, 0, 1, 1, 0]])
  logits = jnp.log(jnp.array([[[.2, .3, .5], [.1, .1, .8], [.6, .3, .1], [.3, .3, .4], [.2, .2, .6]]]))
  expected = -(np.log(0.8) + np.log(0.3)) / 2  # p(r0=2 | ..p1) and p(r1=1 | ..r0)
  assert_close(float(masked_lm_loss(logits, ids, loss_mask)), expected, rtol=1e-5)
  # Whatever the model predicts for prompt tokens (and padding) changes nothing.
  scrambled = logits.at[0, 0].set(jnp.log(jnp.array([.9, .05, .05]))).at[0, 4].set(0.0)
  assert_close(float(masked_lm_loss(scrambled, ids, loss_mask)), expected, rtol=1e-5)
  # Changing the prompt's own tokens' targets changes nothing either.
  assert_close(float(masked_lm_loss(logits, ids.at[0, 1].set(0), loss_mask)), expected, rtol=1e-5)


def test_encode_masks_exactly_the_response(tokenizer):
  ids, mask = encode_example(tokenizer, "capital of France?", "Paris", 64)
  assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
  response = [t for t, m in zip(ids, mask) if m]
  assert tokenizer.decode(response, skip_special_tokens=True).strip() == "Paris"
  assert response[-1] == tokenizer.eos_token_id
  assert tokenizer.decode([t for t, m in zip(ids, mask) if not m], skip_special_tokens=True) == \
      "Question: capital of France?\nAnswer:"
  data = encode(tokenizer, FACTS[:3], 40)
  assert data.input_ids.shape == (3, 40) and (data.loss_mask <= data.attention_mask).all()
  with pytest.raises(ValueError, match="does not fit max_len"):
    encode_example(tokenizer, "a very long question " * 20, "x", 8)


def finetune(model, data, *, full, steps, lr, tmp_path, mos=None):
  cfg = TrainConfig(mos=mos, lr=lr, warmup_frac=0.0, schedule="cosine", steps=steps, batch_size=8,
                    eval_every=steps, progress=False, out_dir=str(tmp_path / ("full" if full else "mos")))
  return train_lm(model, model.params, data, data, cfg, full_finetune=full)


def test_tiny_llama_learns_facts_and_generation_reproduces_them(tokenizer, tmp_path):
  """MoS (150 steps, 1/5 of LoRA-16's parameters) gets below what full fine-tuning reaches in 30 steps."""
  model = tiny_llama(tokenizer, layers=4, hidden=64)
  data = encode(tokenizer, FACTS, 40)
  full = finetune(model, data, full=True, steps=30, lr=3e-3, tmp_path=tmp_path)
  mos = finetune(model, data, full=False, steps=150, lr=1e-2, tmp_path=tmp_path,
                 mos=mos_jax.MoSConfig(rank=16, equivalent_rank=4, shards_per_vector=2))
  full_loss, mos_loss = full["metrics"][-1]["eval_loss"], mos["metrics"][-1]["eval_loss"]
  assert mos_loss < full_loss, (mos_loss, full_loss)
  assert mos_loss < 1e-3 * mos["metrics"][0]["loss"]
  ids, mask = left_pad_prompts(tokenizer, [q for q, _ in FACTS])
  out = mos_jax.hf.generate(model, model.params, jnp.asarray(ids), attention_mask=jnp.asarray(mask),
                            adapter=mos["adapter"], max_new_tokens=16,
                            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
  assert decode_new(tokenizer, out, ids.shape[1]) == [a for _, a in FACTS]


@pytest.mark.slow  # over a minute on 2 loaded cores; the slow suite runs it
def test_injected_and_merged_generation_agree(tokenizer):
  model = tiny_llama(tokenizer, layers=4, hidden=64)
  adapter = mos_jax.adapt(model.params, mos_jax.MoSConfig(rank=4, equivalent_rank=1, shards_per_vector=2))
  adapter = adapter.replace(pools=jax.tree_util.tree_map(lambda x: 0.3 * x, random_pools(adapter.pools)))
  ids, mask = left_pad_prompts(tokenizer, [q for q, _ in FACTS[:4]])
  kw = dict(attention_mask=jnp.asarray(mask), max_new_tokens=12, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id)
  injected = mos_jax.hf.generate(model, model.params, jnp.asarray(ids), adapter=adapter, **kw)
  merged = mos_jax.hf.generate(model, mos_jax.merge(model.params, adapter), jnp.asarray(ids), **kw)
  base = mos_jax.hf.generate(model, model.params, jnp.asarray(ids), **kw)
  np.testing.assert_array_equal(np.asarray(injected), np.asarray(merged))
  assert not np.array_equal(np.asarray(injected), np.asarray(base))  # the adapter matters
  sample = lambda key: mos_jax.hf.generate(model, model.params, jnp.asarray(ids), adapter=adapter,
                                           do_sample=True, prng_key=key, top_k=20, **kw)
  first = np.asarray(sample(jax.random.key(0)))
  np.testing.assert_array_equal(first, np.asarray(sample(jax.random.key(0))))  # one key, one draw
  assert not np.array_equal(first, np.asarray(sample(jax.random.key(1))))
  with pytest.raises(ValueError, match="prng_key"):
    mos_jax.hf.generate(model, model.params, jnp.asarray(ids), do_sample=True)


@pytest.mark.parametrize("text, number", [
    ("so 3 + 4 = 7.\n#### 7", "7"), ("#### 1,000", "1000"), ("#### -5", "-5"), ("#### 12.0", "12"),
    ("no marker, but 3 then 42", "42"), ("nothing numeric", None), ("#### 7 apples then 9", "7"),
])
def test_final_number(text, number):
  assert final_number(text) == number


def test_exact_match():
  assert exact_match(["The answer is #### 12", "#### 5", "I think 7"], ["x #### 12", "#### 6", "#### 7"]) == 2 / 3


def test_gsm8k_loader_errors_and_real_data(tmp_path):
  bad = tmp_path / "bad.jsonl"
  for content, message in [("", "empty file"), ('{"question": "q"}\n', "expected keys"),
                           ("not json\n", "not JSON"), ('{"question": "q", "answer": "no marker"}\n', "####")]:
    bad.write_text(content)
    with pytest.raises(ValueError, match=message):
      load_jsonl(bad)
  with pytest.raises(FileNotFoundError, match="--data-dir"):
    load_jsonl(tmp_path / "missing.jsonl")
  real = REPO_ROOT.parent / "shared" / "data" / "gsm8k" / "test.jsonl"
  if real.exists():
    pairs = load_jsonl(real)
    assert len(pairs) == 1319 and all(final_number(a) is not None for _, a in pairs)


def test_generated_problems_are_consistent():
  for q, a in generate_problems(3, 50):
    numbers = [int(n) for n in re.findall(r"\d+", q)]
    expected = numbers[0] + numbers[1] if "buys" in q else numbers[0] - numbers[1]
    assert final_number(a) == str(expected)


def test_load_causal_lm_from_a_local_folder(tokenizer, tmp_path):
  model = tiny_llama(tokenizer, layers=2, hidden=32)
  model.save_pretrained(tmp_path)
  loaded = load_causal_lm(str(tmp_path), allow_network=False, dtype=jnp.float32)
  jax.tree_util.tree_map(np.testing.assert_array_equal, loaded.params, model.params)
  with pytest.raises(FileNotFoundError, match="not a local folder"):
    load_causal_lm(str(tmp_path / "missing"), allow_network=False, dtype=jnp.float32)
