"""What the experiment scripts share, one job per module.

- ``paths``: where the repository, results and data folders are.
- ``optim``: the learning-rate schedule and the optimizer (clip + AdamW).
- ``config``: ``TrainConfig``, one run of the training loop.
- ``loop``: the one training loop ``fit`` (``mos_jax.train.make_step``; one device or a mesh, one process
  or many; preemption, Orbax resume, metrics in a local folder or a bucket).
- ``run_config``: ``RunConfig`` of ``experiments.train`` and ``pod_config``, the pod configs' settings.
- ``nnx_models``: Tunix NNX models from HF safetensors, read sharded as they load; their forward and loss.
- ``tunix_rope``: the checkpoint's RoPE for Tunix's Llama 3 / Qwen 3.
- ``chat_data``: instruction rows (JSONL/Parquet), chat templates, response-masked fixed-shape batches.
- ``chip_memory``: memory per chip of a run, before loading; the refusal with fixes.
- ``generate``: greedy generations on held-out prompts after training.
- ``workdir``: run folders that may be buckets (the metrics log).
- ``outputs``: the files a run leaves (native adapter, head, ``mos_config.json``).
- ``cli``: the scripts' ``argparse`` style (the docstring as description, every default shown).
- ``gemma3_weights``: the real Gemma 3 270M (Tunix NNX) from its GGUF package, converted once into a checked cache.
- ``gemma3_tokenizer``: Gemma 3's SentencePiece tokenizer, rebuilt from the GGUF's vocabulary.
- ``lm_eval``: masks, positions, full-sequence logits and next-token NLL of a Gemma-3-signature model.
- ``sampling``: generation (greedy or sampled) through Tunix's ``Sampler``.
- ``qwix_lora``: qwix's own LoRA / QLoRA on Gemma 3, the Gemma 3 benchmarks' baseline.
- ``instruct``: prompt/response batches and response-token scores for a Gemma-3-shaped NNX model.
- ``plots``: training curves and the accuracy-versus-parameters plot.
- ``classification``: sequence classification with a frozen encoder, an adapter and a head.
- ``lm``: instruction tuning of a causal LM (encoding, masked loss, ``train_lm``, decoding).
- ``models``: random and tiny Llamas, a BPE tokenizer, loading HF checkpoints.
- ``minilm``: the pretrained MiniLM-L6 encoder, offline.
- ``sentiment_data``: SST-2 and a generated sentiment task.
- ``gsm8k_data``: GSM8K files, generated problems and exact-match scoring.
- ``bench``: the benchmarks' flags, timing, compiled memory and result files.

Modules are imported one by one (``from experiments.lib import loop``); this
package imports none of them, so loading one does not load the others.
"""
