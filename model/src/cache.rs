//! The decoder's key/value cache.

use burn::tensor::{DType, Element, Int, Tensor, TensorData, bf16, f16};
use burn_flex::Flex;

use crate::kernels::is_plain_flex;

/// Positions of room a CPU (Flex) cache buffer is given past what it holds, so that the
/// next decode steps write their keys and values in place instead of copying the cache.
const HEADROOM: usize = 128;

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
/// step instead of re-running the prefix. On the CPU a layer's tensors are buffers with
/// room for more positions ([`HEADROOM`]): a step writes its position in place (when no
/// clone of the cache shares the buffer) and attention reads a view of the filled part,
/// so a step copies nothing; other devices concatenate.
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
        let (pk, pv) = self.layers[layer].take().unzip();
        let (kb, k) = extend(pk, k, self.len);
        let (vb, v) = extend(pv, v, self.len);
        self.layers[layer] = Some((kb, vb));
        (k, v)
    }

    /// Cuts every layer's buffer to the cached positions (views, no copy).
    fn trim(&mut self) {
        let len = self.len;
        for (k, v) in self.layers.iter_mut().flatten() {
            if k.dims()[2] != len {
                *k = k.clone().narrow(2, 0, len);
                *v = v.clone().narrow(2, 0, len);
            }
        }
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
        self.trim();
        other.trim();
        for (slot, theirs) in self.layers.iter_mut().zip(other.layers) {
            if let (Some((k, v)), Some((ok, ov))) = (slot.as_mut(), theirs) {
                *k = Tensor::cat(vec![k.clone(), ok], 0);
                *v = Tensor::cat(vec![v.clone(), ov], 0);
            }
        }
        Ok(pads)
    }
}

/// `cached` (a layer's buffer holding `len` positions, or nothing) followed by `new`
/// `[b, h, n, d]`: returns the buffer to keep and the `len + n` positions to attend over.
fn extend(cached: Option<Tensor<4>>, new: Tensor<4>, len: usize) -> (Tensor<4>, Tensor<4>) {
    let n = new.dims()[2];
    if !is_plain_flex(&new.device()) {
        let all = match cached {
            Some(c) => Tensor::cat(vec![c.narrow(2, 0, len), new], 2),
            None => new,
        };
        return (all.clone(), all);
    }
    let buffer = match cached.map(|c| write_in_place(c, &new, len)) {
        Some((buffer, true)) => buffer,
        other => {
            // No room, shared with a clone, or the first positions: a new buffer.
            let room = zero_positions(&new, HEADROOM);
            let parts = match other {
                Some((c, _)) if len > 0 => vec![c.narrow(2, 0, len), new, room],
                _ => vec![new, room],
            };
            Tensor::cat(parts, 2)
        }
    };
    let view = buffer.clone().narrow(2, 0, len + n);
    (buffer, view)
}

/// Writes `new [b, h, n, d]` at positions `len..len + n` of `buffer [b, h, cap, d]` when the
/// buffer is a whole contiguous Flex tensor with room that nothing else shares. Returns the
/// buffer and whether it was written (unchanged otherwise).
fn write_in_place(buffer: Tensor<4>, new: &Tensor<4>, len: usize) -> (Tensor<4>, bool) {
    let [b, h, cap, d] = buffer.dims();
    let [nb, nh, n, nd] = new.dims();
    let dtype = buffer.dtype();
    let fits = (nb, nh, nd) == (b, h, d) && len + n <= cap && new.dtype() == dtype;
    if !fits || !matches!(dtype, DType::F32 | DType::BF16 | DType::F16) || !is_plain_flex(&buffer.device()) {
        return (buffer, false);
    }
    let Ok(mut flex) = buffer.clone().try_into_primitive::<Flex>() else {
        return (buffer, false);
    };
    let layout = flex.layout();
    let whole = layout.is_contiguous() && layout.start_offset() == 0;
    drop(buffer);
    let data = new.clone().into_data();
    let written = whole
        && match dtype {
            DType::F32 => copy_positions::<f32>(&mut flex, &data, [b, h, cap, d], len, n),
            DType::BF16 => copy_positions::<bf16>(&mut flex, &data, [b, h, cap, d], len, n),
            DType::F16 => copy_positions::<f16>(&mut flex, &data, [b, h, cap, d], len, n),
            _ => false,
        };
    (Tensor::from_primitive::<Flex>(flex), written)
}

/// Copies `data [b, h, n, d]` into positions `len..len + n` of the contiguous `flex`
/// `[b, h, cap, d]`; false (nothing written) when the storage is shared or of another type.
fn copy_positions<E: Element + bytemuck::Pod>(
    flex: &mut burn_flex::FlexTensor,
    data: &TensorData,
    [b, h, cap, d]: [usize; 4],
    len: usize,
    n: usize,
) -> bool {
    let Ok(src) = data.as_slice::<E>() else {
        return false;
    };
    let Some(dst) = flex.try_storage_mut::<E>() else {
        return false;
    };
    for row in 0..b * h {
        let from = &src[row * n * d..(row + 1) * n * d];
        let at = (row * cap + len) * d;
        dst[at..at + n * d].copy_from_slice(from);
    }
    true
}

/// `n` zero positions (in the tensor's own dtype) before `t`'s positions, `[b, h, n + len, d]`.
fn pad_front(t: Tensor<4>, n: usize) -> Tensor<4> {
    let zeros = zero_positions(&t, n);
    Tensor::cat(vec![zeros, t], 2)
}

/// `[b, h, n, d]` zeros in the dtype and on the device of `like` (`[b, h, _, d]`).
fn zero_positions(like: &Tensor<4>, n: usize) -> Tensor<4> {
    let [b, h, _, d] = like.dims();
    like.clone()
        .slice([0..b, 0..h, 0..1, 0..d])
        .zeros_like()
        .repeat_dim(2, n)
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
        k.narrow(2, 0, c.len())
            .into_data()
            .convert::<f32>()
            .try_into_vec::<f32>()
            .expect("f32")
    }

    /// One decode position appended, as the decoder does (the views go out of scope).
    fn step(c: &mut KvCache, key: f32) {
        let (k, v) = c.append(0, layer(&[&[key]]), layer(&[&[key * 10.0]]));
        assert_eq!(k.dims()[2], c.len() + 1);
        drop((k, v));
        c.advance(1);
    }

    fn storage(c: &KvCache) -> *const u8 {
        let (k, _) = c.layers[0].clone().expect("layer 0");
        k.try_into_primitive::<Flex>().expect("flex").bytes().as_ptr()
    }

    /// Decode steps write into the buffer they were given room in; a clone of the cache (a
    /// conversation snapshot) makes the next step copy instead, so neither sees the other's
    /// positions.
    #[test]
    fn decode_steps_write_in_place_and_clones_stay_apart() {
        let mut c = cache(&[&[1.0, 2.0]]);
        let (k, _) = c.layers[0].clone().expect("layer 0");
        assert_eq!(k.dims()[2], 2 + HEADROOM);
        drop(k);
        let buffer = storage(&c);
        step(&mut c, 3.0);
        assert_eq!(storage(&c), buffer, "the step copied the cache");
        let mut snapshot = c.clone();
        step(&mut c, 4.0);
        assert_ne!(storage(&c), buffer, "a shared buffer was written");
        step(&mut snapshot, 5.0);
        assert_eq!(keys(&c), vec![1.0, 2.0, 3.0, 4.0]);
        assert_eq!(keys(&snapshot), vec![1.0, 2.0, 3.0, 5.0]);
        let (_, v) = c.layers[0].clone().expect("layer 0");
        let values: Vec<f32> = v
            .narrow(2, 0, 4)
            .into_data()
            .convert::<f32>()
            .try_into_vec()
            .expect("f32");
        assert_eq!(values, vec![10.0, 20.0, 30.0, 40.0]);
        // Filling the room moves to a bigger buffer with the same contents.
        for i in 0..HEADROOM {
            step(&mut c, 100.0 + i as f32);
        }
        assert_eq!(c.len(), 4 + HEADROOM);
        assert_eq!(&keys(&c)[..4], &[1.0, 2.0, 3.0, 4.0]);
        assert_eq!(keys(&c)[4 + HEADROOM - 1], 100.0 + (HEADROOM - 1) as f32);
    }

    #[test]
    fn rows_are_joined_padded_selected_and_trimmed() {
        let mut a = cache(&[&[1.0, 2.0, 3.0]]);
        let b = cache(&[&[4.0], &[5.0]]);
        assert_eq!(a.append_rows(b).expect("join"), (0, 2));
        assert_eq!((a.rows(), a.len()), (3, 3));
        assert_eq!(keys(&a), vec![1.0, 2.0, 3.0, 0.0, 0.0, 4.0, 0.0, 0.0, 5.0]);
        let (_, v) = a.layers[0].clone().expect("layer 0");
        assert_eq!(v.narrow(2, 0, a.len()).dims(), [3, 1, 3, 1]);

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
