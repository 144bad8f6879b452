//! Causal-LM loss (transformers' `ForCausalLMLoss` with `ignore_index = -100`).

use burn::tensor::activation::log_softmax;
use burn::tensor::{DType, Int, Tensor, TensorData};

use crate::data::IGNORE_INDEX;

/// Mean cross-entropy over target tokens, next-token shifted: position `t` of `logits`
/// (`[batch, seq, vocab]`) predicts `labels[b][t + 1]`; labels equal to `-100` are
/// ignored. Logits are upcast to f32 first. Returns the loss (shape `[1]`) and the number
/// of targets; `None` when there is no target.
pub fn causal_lm_loss(logits: Tensor<3>, labels: &[Vec<i64>]) -> Option<(Tensor<1>, usize)> {
    let [b, t, v] = logits.dims();
    let mut rows = Vec::new();
    let mut targets = Vec::new();
    for (i, row) in labels.iter().enumerate().take(b) {
        for j in 0..t.saturating_sub(1) {
            let l = row.get(j + 1).copied().unwrap_or(IGNORE_INDEX);
            if l != IGNORE_INDEX {
                rows.push((i * t + j) as i64);
                targets.push(l);
            }
        }
    }
    let n = rows.len();
    if n == 0 {
        return None;
    }
    let device = logits.device();
    let logits = if logits.dtype() == DType::F32 {
        logits
    } else {
        logits.cast(DType::F32)
    };
    let flat = logits.reshape([b * t, v]);
    let rows = Tensor::<1, Int>::from_data(TensorData::new(rows, [n]), &device);
    let picked = flat.select(0, rows); // [n, v]
    let lsm = log_softmax(picked, 1);
    let targets = Tensor::<2, Int>::from_data(TensorData::new(targets, [n, 1]), &device);
    let nll = lsm.gather(1, targets).neg(); // [n, 1]
    Some((nll.mean().reshape([1]), n))
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Device;

    #[test]
    fn uniform_logits_give_log_vocab_and_ignored_labels_count_nothing() {
        let device = Device::flex();
        let logits = Tensor::<3>::zeros([2, 3, 8], &device);
        let labels = vec![vec![5, 1, -100], vec![-100, -100, 7]];
        let (loss, n) = causal_lm_loss(logits.clone(), &labels).unwrap();
        assert_eq!(n, 2); // labels[0][1] and labels[1][2]; labels[*][0] is never a target
        let v = loss.into_data().convert::<f32>().try_to_vec::<f32>().unwrap()[0];
        assert!((v - 8f32.ln()).abs() < 1e-6, "{v}");
        assert!(causal_lm_loss(logits, &[vec![1, -100, -100], vec![-100; 3]]).is_none());
    }
}
