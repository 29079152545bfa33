"""Loop-based NumPy restatement of MOS_SPEC.md §3-§5, independent of mos_jax's code."""

import numpy as np


def assemble_layer(p_a, p_b, index_a, index_b, rank, l):
  """A_i (r, d_in), B_i (d_out, r): rank-vector j is shards j·l .. j·l+l-1, concatenated."""
  a_rows, b_cols = [], []
  for j in range(rank):
    a_rows.append(np.concatenate([p_a[index_a[j * l + k]] for k in range(l)]))
    b_cols.append(np.concatenate([p_b[index_b[j * l + k]] for k in range(l)]))
  return np.stack(a_rows, 0), np.stack(b_cols, 1)


def lora_forward(x, w, a, b, scale):
  """Plain LoRA on a Flax kernel, x: (n, d_in): y = x W + scale · Σ_j (x·a_j) b_jᵀ."""
  y = x @ w
  for j in range(a.shape[0]):
    y = y + scale * np.outer(x @ a[j], b[:, j])
  return y


def expected_private_block(layer, r_e, r_p, num_layers, l):
  start = (r_e - r_p) * num_layers * l + layer * r_p * l
  return list(range(start, start + r_p * l))
