//! What one forward call takes: new token ids (on the device and, ideally, on the host),
//! optional images, positions, padding mask and which logits to compute.

use burn::tensor::{Device, Int, Tensor, TensorData};

use crate::error::ForwardError;

/// Which positions get logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogitsMode {
    /// Every position `[batch, seq, vocab]`.
    #[default]
    All,
    /// The last position only `[batch, 1, vocab]` (what generation needs).
    LastOnly,
}

/// One forward call: new token ids, optional images (prefill only), positions.
pub struct ForwardInput {
    /// `[batch, seq]` token ids of the new tokens.
    pub input_ids: Tensor<2, Int>,
    /// The same ids on the host, row-major (batch, then sequence), as the caller already
    /// has them. With them the model checks the vocabulary and finds the image-token
    /// positions on the host and never reads `input_ids` back from the device (a sync per
    /// decode step on GPU backends). `None` (what [`ForwardInput::new`] gives) reads the
    /// ids back once per call.
    pub host_ids: Option<Vec<i64>>,
    /// `[images, 3, H, W]` pixels, required when the ids hold image tokens.
    pub pixel_values: Option<Tensor<4>>,
    /// Position ids `[batch][seq]`; `None` = `cache.len() .. cache.len() + seq` for every row.
    pub positions: Option<Vec<Vec<i64>>>,
    /// Padding mask `[batch][cached + new]` (`true` = real token); `None` = no padding.
    pub key_mask: Option<Vec<Vec<bool>>>,
    /// Which logits to compute.
    pub logits: LogitsMode,
}

impl ForwardInput {
    /// Ids already on the device only (the model reads them back once), default
    /// positions, all logits.
    pub fn new(input_ids: Tensor<2, Int>) -> Self {
        Self {
            input_ids,
            host_ids: None,
            pixel_values: None,
            positions: None,
            key_mask: None,
            logits: LogitsMode::All,
        }
    }

    /// Host ids `[batch * seq]` (row-major), uploaded to `device` and kept on the host so
    /// that the forward pass never reads them back; default positions, all logits.
    pub fn from_ids(ids: Vec<i64>, batch: usize, device: &Device) -> Result<Self, ForwardError> {
        if batch == 0 || !ids.len().is_multiple_of(batch) {
            return Err(ForwardError::BadInput(format!(
                "{} token ids do not fill {batch} equal rows",
                ids.len()
            )));
        }
        let shape = [batch, ids.len() / batch];
        let input_ids = Tensor::from_data(TensorData::new(ids.clone(), shape), device);
        Ok(Self {
            host_ids: Some(ids),
            ..Self::new(input_ids)
        })
    }

    /// Adds pixel values.
    pub fn with_pixels(mut self, pixel_values: Tensor<4>) -> Self {
        self.pixel_values = Some(pixel_values);
        self
    }

    /// Selects which logits to compute.
    pub fn with_logits(mut self, mode: LogitsMode) -> Self {
        self.logits = mode;
        self
    }
}
