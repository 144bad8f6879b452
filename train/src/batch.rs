//! Which samples each step sees, and samples as one padded model input.

use burn::tensor::{DType, Device, Int, Tensor, TensorData};
use vipllava_model::{ForwardInput, VipLlavaConfig};

use crate::config::TrainConfig;
use crate::data::{EncodedSample, IGNORE_INDEX, SampleEncoder};

/// `(epoch, micro-batches of sample indices)` for every step: each epoch visits the `n`
/// samples in order (or in a permutation seeded by `seed` and the epoch when `shuffle` is
/// set), cut into micro-batches of `batch_size`, `grad_accum` of them a step.
pub fn schedule(n: usize, config: &TrainConfig) -> Vec<(usize, Vec<Vec<usize>>)> {
    let mut steps = Vec::new();
    for epoch in 0..config.epochs {
        let mut order: Vec<usize> = (0..n).collect();
        if config.shuffle {
            use rand::seq::SliceRandom;
            use rand::{SeedableRng, rngs::StdRng};
            let mut rng =
                StdRng::seed_from_u64(config.seed.wrapping_mul(1_000_003).wrapping_add(epoch as u64));
            order.shuffle(&mut rng);
        }
        let micro: Vec<Vec<usize>> = order.chunks(config.batch_size).map(<[usize]>::to_vec).collect();
        for group in micro.chunks(config.grad_accum) {
            steps.push((epoch + 1, group.to_vec()));
        }
    }
    if let Some(max) = config.max_steps {
        steps.truncate(max);
    }
    steps
}

/// The padding token: the tokenizer's when it is a usable text token, else EOS.
pub fn pad_id(encoder: &SampleEncoder, model_config: &VipLlavaConfig) -> u32 {
    encoder
        .tokenizer
        .pad_token_id
        .filter(|&p| (p as usize) < model_config.text.vocab_size && p != encoder.image_token_id)
        .unwrap_or(encoder.eos_token_id)
}

/// A micro-batch as model input.
pub struct Batch {
    /// Token ids (right-padded with a key mask when the lengths differ) and pixels.
    pub input: ForwardInput,
    /// Labels per row, padded with [`IGNORE_INDEX`].
    pub labels: Vec<Vec<i64>>,
    /// Input tokens, padding excluded.
    pub tokens: usize,
}

/// Collates `rows` (at least one) into one input: right-padded with `pad_id`, with a key mask
/// when the lengths differ, pixels cast to `dtype`.
pub fn collate(rows: &[&EncodedSample], pad_id: u32, dtype: DType, device: &Device) -> Batch {
    let t = rows.iter().map(|r| r.input_ids.len()).max().unwrap_or(0);
    let b = rows.len();
    let mut ids = Vec::with_capacity(b * t);
    let mut labels = Vec::with_capacity(b);
    let mut mask = Vec::with_capacity(b);
    let mut tokens = 0;
    for r in rows {
        let n = r.input_ids.len();
        tokens += n;
        ids.extend(r.input_ids.iter().map(|&i| i as i64));
        ids.extend(std::iter::repeat_n(pad_id as i64, t - n));
        let mut l = r.labels.clone();
        l.resize(t, IGNORE_INDEX);
        labels.push(l);
        mask.push((0..t).map(|j| j < n).collect::<Vec<bool>>());
    }
    let p0 = &rows[0].pixel_values;
    let mut pix = Vec::with_capacity(b * p0.data.len());
    for r in rows {
        pix.extend_from_slice(&r.pixel_values.data);
    }
    let pixels = Tensor::<4>::from_data(
        TensorData::new(pix, [b, p0.channels, p0.height, p0.width]),
        device,
    );
    let pixels = if dtype == DType::F32 {
        pixels
    } else {
        pixels.cast(dtype)
    };
    let input_ids = Tensor::<2, Int>::from_data(TensorData::new(ids, [b, t]), device);
    let mut input = ForwardInput::new(input_ids).with_pixels(pixels);
    if mask.iter().any(|m| m.iter().any(|x| !x)) {
        input.key_mask = Some(mask);
    }
    Batch {
        input,
        labels,
        tokens,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_cuts_epochs_into_steps() {
        let mut c = TrainConfig::new("m", "d", "o");
        c.epochs = 2;
        c.batch_size = 2;
        c.grad_accum = 2;
        let s = schedule(5, &c);
        assert_eq!(s.len(), 4);
        assert_eq!(s[0], (1, vec![vec![0, 1], vec![2, 3]]));
        assert_eq!(s[1], (1, vec![vec![4]]));
        assert_eq!(s[3].0, 2);
        c.shuffle = true;
        let shuffled = schedule(5, &c);
        assert_eq!(shuffled, schedule(5, &c), "seeded");
        c.max_steps = Some(3);
        assert_eq!(schedule(5, &c).len(), 3);
    }
}
