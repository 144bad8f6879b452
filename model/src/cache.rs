//! The decoder's key/value cache.

use burn::tensor::{Int, Tensor, TensorData};

/// Two caches that cannot be joined row-wise, or a row that is not there.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CacheError {
    /// The caches come from models with different layer counts, or one of them has a
    /// layer the other lacks.
    #[error("the caches hold different layers ({0} vs {1})")]
    Layers(usize, usize),
    /// A row index past the batch.
    #[error("row {row} is not in a batch of {rows}")]
    NoRow {
        /// The index asked for.
        row: usize,
        /// Rows in the cache.
        rows: usize,
    },
}

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

    /// Rows (sequences) in the cache; 0 when empty.
    pub fn rows(&self) -> usize {
        self.layers
            .iter()
            .flatten()
            .next()
            .map_or(0, |(k, _)| k.dims()[0])
    }

    /// Keeps the batch rows `rows`, in that order (an empty list empties the cache).
    pub fn select_rows(&mut self, rows: &[usize]) -> Result<(), CacheError> {
        if rows.is_empty() {
            self.clear();
            return Ok(());
        }
        let batch = self.rows();
        if let Some(&row) = rows.iter().find(|&&r| r >= batch) {
            return Err(CacheError::NoRow { row, rows: batch });
        }
        if rows.iter().copied().eq(0..batch) {
            return Ok(());
        }
        let ids: Vec<i64> = rows.iter().map(|&r| r as i64).collect();
        for (k, v) in self.layers.iter_mut().flatten() {
            let index = Tensor::<1, Int>::from_data(TensorData::new(ids.clone(), [ids.len()]), &k.device());
            *k = k.clone().select(0, index.clone());
            *v = v.clone().select(0, index);
        }
        Ok(())
    }

    /// Puts `n` zero positions in front of every row (a caller masks them out).
    pub fn left_pad(&mut self, n: usize) {
        if n == 0 || self.len == 0 {
            return;
        }
        for (k, v) in self.layers.iter_mut().flatten() {
            *k = pad_front(k.clone(), n);
            *v = pad_front(v.clone(), n);
        }
        self.len += n;
    }

    /// Forgets the first `n` positions of every row (e.g. padding no row needs any more).
    pub fn drop_front(&mut self, n: usize) {
        if n == 0 {
            return;
        }
        if n >= self.len {
            self.clear();
            return;
        }
        for (k, v) in self.layers.iter_mut().flatten() {
            let [b, h, len, d] = k.dims();
            *k = k.clone().slice([0..b, 0..h, n..len, 0..d]);
            *v = v.clone().slice([0..b, 0..h, n..len, 0..d]);
        }
        self.len -= n;
    }

    /// Appends the rows of `other` after this cache's rows. The shorter side is left-padded
    /// with zero positions first; returns how many were put in front of (this cache's rows,
    /// `other`'s rows), for the caller's key mask.
    pub fn append_rows(&mut self, mut other: KvCache) -> Result<(usize, usize), CacheError> {
        if self.is_empty() {
            *self = other;
            return Ok((0, 0));
        }
        if other.is_empty() {
            return Ok((0, 0));
        }
        let (mine, theirs) = (
            self.layers.iter().flatten().count(),
            other.layers.iter().flatten().count(),
        );
        if self.layers.len() != other.layers.len() || mine != theirs || mine != self.layers.len() {
            return Err(CacheError::Layers(mine, theirs));
        }
        let pads = (
            other.len.saturating_sub(self.len),
            self.len.saturating_sub(other.len),
        );
        self.left_pad(pads.0);
        other.left_pad(pads.1);
        for (slot, theirs) in self.layers.iter_mut().zip(other.layers) {
            if let (Some((k, v)), Some((ok, ov))) = (slot.as_mut(), theirs) {
                *k = Tensor::cat(vec![k.clone(), ok], 0);
                *v = Tensor::cat(vec![v.clone(), ov], 0);
            }
        }
        Ok(pads)
    }
}

/// `n` zero positions (in the tensor's own dtype) before `t`'s positions, `[b, h, n + len, d]`.
fn pad_front(t: Tensor<4>, n: usize) -> Tensor<4> {
    let [b, h, _, d] = t.dims();
    let zeros = t
        .clone()
        .slice([0..b, 0..h, 0..1, 0..d])
        .zeros_like()
        .repeat_dim(2, n);
    Tensor::cat(vec![zeros, t], 2)
}

#[cfg(test)]
mod tests {
    use burn::tensor::Device;

    use super::*;

    fn layer(rows: &[&[f32]]) -> Tensor<4> {
        let len = rows[0].len();
        let data: Vec<f32> = rows.iter().flat_map(|r| r.iter().copied()).collect();
        Tensor::from_data(TensorData::new(data, [rows.len(), 1, len, 1]), &Device::flex())
    }

    fn cache(rows: &[&[f32]]) -> KvCache {
        let mut c = KvCache::new();
        c.append(0, layer(rows), layer(rows).mul_scalar(10.0));
        c.advance(rows[0].len());
        c
    }

    fn keys(c: &KvCache) -> Vec<f32> {
        let (k, _) = c.layers[0].clone().expect("layer 0");
        k.into_data().convert::<f32>().try_into_vec::<f32>().expect("f32")
    }

    #[test]
    fn rows_are_joined_padded_selected_and_trimmed() {
        let mut a = cache(&[&[1.0, 2.0, 3.0]]);
        let b = cache(&[&[4.0], &[5.0]]);
        assert_eq!(a.append_rows(b).expect("join"), (0, 2));
        assert_eq!((a.rows(), a.len()), (3, 3));
        assert_eq!(keys(&a), vec![1.0, 2.0, 3.0, 0.0, 0.0, 4.0, 0.0, 0.0, 5.0]);
        let (_, v) = a.layers[0].clone().expect("layer 0");
        assert_eq!(v.dims(), [3, 1, 3, 1]);

        // A longer newcomer pads the batch instead.
        let mut short = cache(&[&[7.0]]);
        assert_eq!(short.append_rows(cache(&[&[8.0, 9.0]])).expect("join"), (1, 0));
        assert_eq!(keys(&short), vec![0.0, 7.0, 8.0, 9.0]);

        a.select_rows(&[2, 1]).expect("select");
        assert_eq!(keys(&a), vec![0.0, 0.0, 5.0, 0.0, 0.0, 4.0]);
        a.drop_front(2);
        assert_eq!((a.rows(), a.len()), (2, 1));
        assert_eq!(keys(&a), vec![5.0, 4.0]);
        assert_eq!(a.select_rows(&[2]), Err(CacheError::NoRow { row: 2, rows: 2 }));
        a.select_rows(&[]).expect("empty");
        assert!(a.is_empty());
        assert_eq!(a.rows(), 0);
    }
}
