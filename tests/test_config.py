import pytest

from mos_jax import MoSConfig


def test_lora_and_pure_sharing_constructors():
  lora = MoSConfig.lora(8, alpha=16.0)
  assert (lora.rank, lora.equivalent_rank, lora.effective_private_rank,
          lora.effective_shards_per_vector) == (8, 8, 8, 1)
  pure = MoSConfig.pure_sharing(2, num_layers=6)
  assert pure.rank == 12 and pure.effective_private_rank == 0
  assert not (pure.subset_selection or pure.pair_dissociation)


def test_switches_override_private_rank_and_shards():
  cfg = MoSConfig(rank=8, equivalent_rank=2, private_rank=1, shards_per_vector=4,
                  vector_sharding=False, shard_privatization=False)
  assert cfg.effective_shards_per_vector == 1 and cfg.effective_private_rank == 0
  assert cfg.scale == 16.0 / 8


@pytest.mark.parametrize("kwargs, message", [
    (dict(rank=8, equivalent_rank=1, private_rank=2), r"private_rank \(r_p=2\) > equivalent_rank"),
    (dict(rank=1, equivalent_rank=4, private_rank=2), r"private_rank \(r_p=2\) > rank"),
    (dict(rank=8, equivalent_rank=2, private_rank=2), "no public pool"),
    (dict(rank=0, equivalent_rank=1), "rank must be a positive integer"),
    (dict(rank=4, equivalent_rank=1, shards_per_vector=0), "shards_per_vector must be a positive"),
    (dict(rank=4, equivalent_rank=1, dropout=1.0), "dropout"),
    (dict(rank=4, equivalent_rank=1, target_modules=()), "target_modules is empty"),
    (dict(rank=4, equivalent_rank=1, target_modules="q_proj("), "not a valid regex"),
    (dict(rank=4, equivalent_rank=1, pool_dtype="int8"), "pool_dtype"),
    (dict(rank=4, equivalent_rank=1, layer_axis=2), "layer_axis must be 0 or 1"),
    (dict(rank=4, equivalent_rank=1, stacked_modules="q_proj("), "stacked_modules.*not a valid regex"),
])
def test_invalid_configs_fail_fast(kwargs, message):
  with pytest.raises(ValueError, match=message):
    MoSConfig(**kwargs)


def test_config_is_frozen_and_hashable():
  cfg = MoSConfig(rank=4, equivalent_rank=1, target_modules=["q_proj"])
  assert cfg.target_modules == ("q_proj",)
  assert cfg.stacked_modules is None and cfg.layer_axis == 0  # nothing is a stack unless declared
  assert MoSConfig(rank=4, equivalent_rank=1, stacked_modules=["q_proj"]).stacked_modules == ("q_proj",)
  assert hash(cfg) == hash(MoSConfig(rank=4, equivalent_rank=1, target_modules=("q_proj",)))
  with pytest.raises(AttributeError):
    cfg.rank = 2
