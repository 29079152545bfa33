"""Independent restatements, in loops and NumPy, of what mos_jax computes: the method (MOS_SPEC.md §3-§5),
the published NF4 codebook and the documented adapter-file checksum."""

import hashlib

import numpy as np

#: QLoRA's NormalFloat-4 codebook as bitsandbytes publishes it (``create_normal_map``).
NF4_CODEBOOK = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)


def named_arrays_sha256(named):
  """The documented digest of ``(name, array)`` pairs: SHA-256 of ``name|dtype|shape|`` then the bytes, each in turn."""
  parts = []
  for name, value in named:
    arr = np.ascontiguousarray(value)
    parts += [f"{name}|{arr.dtype}|{arr.shape}|".encode(), arr.tobytes()]
  return hashlib.sha256(b"".join(parts)).hexdigest()


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
