//! Dropout site numbers (the `site` of a Philox mask key): the same in both engines.
//! Per sample, a site's mask covers the activation row-major: embeddings `(T, D)`, attention
//! probabilities `(H, T, T)`, attention output `(T, D)`, MLP hidden `(T, M)`, MLP output `(T, D)`.

/// After adding the position embeddings.
pub const EMBEDDINGS: u32 = 0;

/// Attention probabilities of block `l`.
pub fn attention_probs(l: usize) -> u32 {
    1 + 4 * l as u32
}

/// After block `l`'s attention output projection.
pub fn attention_output(l: usize) -> u32 {
    2 + 4 * l as u32
}

/// After block `l`'s fc1 + GELU.
pub fn mlp_hidden(l: usize) -> u32 {
    3 + 4 * l as u32
}

/// After block `l`'s fc2.
pub fn mlp_output(l: usize) -> u32 {
    4 + 4 * l as u32
}
