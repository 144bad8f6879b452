//! The decoder's key/value cache.

use burn::tensor::Tensor;

/// Keys and values of every layer for the tokens seen so far.
///
/// Decoding step N appends one position and attends over N cached ones: O(N) work per
/// step instead of re-running the prefix.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor<4>, Tensor<4>)>>,
    len: usize,
}

impl KvCache {
    /// An empty cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of cached positions.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Forgets everything.
    pub fn clear(&mut self) {
        self.layers.clear();
        self.len = 0;
    }

    /// Keeps only the first `len` positions (e.g. to reuse a conversation prefix).
    pub fn truncate(&mut self, len: usize) {
        if len == 0 {
            self.clear();
            return;
        }
        if len >= self.len {
            return;
        }
        for (k, v) in self.layers.iter_mut().flatten() {
            let [b, h, _, d] = k.dims();
            *k = k.clone().slice([0..b, 0..h, 0..len, 0..d]);
            *v = v.clone().slice([0..b, 0..h, 0..len, 0..d]);
        }
        self.len = len;
    }

    /// Appends `[batch, kv_heads, new, head_dim]` keys and values to layer `layer` and
    /// returns everything cached for it (the cached length moves on in [`Self::advance`]).
    pub(crate) fn append(&mut self, layer: usize, k: Tensor<4>, v: Tensor<4>) -> (Tensor<4>, Tensor<4>) {
        if self.layers.len() <= layer {
            self.layers.resize(layer + 1, None);
        }
        let (k, v) = match self.layers[layer].take() {
            Some((pk, pv)) => (Tensor::cat(vec![pk, k], 2), Tensor::cat(vec![pv, v], 2)),
            None => (k, v),
        };
        self.layers[layer] = Some((k.clone(), v.clone()));
        (k, v)
    }

    /// Counts `new` positions as cached, once every layer has appended them.
    pub(crate) fn advance(&mut self, new: usize) {
        self.len += new;
    }
}
