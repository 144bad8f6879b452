//! Token selection: greedy or sampled, in transformers' logits-processor order.

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

use super::options::GenerationOptions;

/// Picks tokens from logits, in transformers' order: repetition penalty, then (when
/// sampling) temperature, top-k, top-p, and a draw from the softmax.
#[derive(Debug)]
pub struct TokenSelector {
    options: GenerationOptions,
    rng: StdRng,
}

impl TokenSelector {
    /// A selector seeded from the options.
    pub fn new(options: GenerationOptions) -> Self {
        let rng = StdRng::seed_from_u64(options.seed);
        Self { options, rng }
    }

    /// The next token given the last position's logits and every id so far.
    pub fn select(&mut self, logits: &mut [f32], history: &[u32]) -> u32 {
        let penalty = self.options.repetition_penalty;
        if penalty != 1.0 {
            let mut seen = history.to_vec();
            seen.sort_unstable();
            seen.dedup();
            for id in seen {
                if let Some(l) = logits.get_mut(id as usize) {
                    *l = if *l < 0.0 { *l * penalty } else { *l / penalty };
                }
            }
        }
        if !self.options.do_sample {
            return argmax(logits);
        }
        let t = self.options.temperature;
        for l in logits.iter_mut() {
            *l /= t;
        }
        let mut order: Vec<usize> = (0..logits.len()).collect();
        order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
        let mut keep = order.len();
        if let Some(k) = self.options.top_k.filter(|&k| k > 0 && k < keep) {
            // Keep ties with the k-th value, as transformers' `< topk.min` filter does.
            let kth = logits[order[k - 1]];
            keep = order.iter().take_while(|&&i| logits[i] >= kth).count();
        }
        let max = logits[order[0]];
        let probs: Vec<f64> = order[..keep]
            .iter()
            .map(|&i| ((logits[i] - max) as f64).exp())
            .collect();
        let total: f64 = probs.iter().sum();
        if self.options.top_p < 1.0 {
            // Smallest prefix whose mass reaches top_p (at least one token).
            let mut mass = 0.0;
            let mut n = 0;
            for p in &probs {
                mass += p / total;
                n += 1;
                if mass >= self.options.top_p as f64 {
                    break;
                }
            }
            keep = n.max(1);
        }
        let total: f64 = probs[..keep].iter().sum();
        let mut draw = self.rng.random::<f64>() * total;
        for (j, p) in probs[..keep].iter().enumerate() {
            draw -= p;
            if draw <= 0.0 {
                return order[j] as u32;
            }
        }
        order[keep - 1] as u32
    }
}

/// Index of the first maximum (as `torch.argmax`); NaN never wins.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0usize;
    let mut best_value = f32::NEG_INFINITY;
    for (i, &l) in logits.iter().enumerate() {
        if l > best_value {
            best = i;
            best_value = l;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_first_max_and_penalty_applies() {
        let opts = GenerationOptions::default();
        let mut s = TokenSelector::new(opts.clone());
        assert_eq!(s.select(&mut [1.0, 3.0, 3.0, -1.0], &[]), 1);
        let mut s = TokenSelector::new(GenerationOptions {
            repetition_penalty: 2.0,
            ..opts
        });
        // 3.0 / 2 = 1.5 < 2.0: token 2 wins once token 1 is penalised.
        assert_eq!(s.select(&mut [0.0, 3.0, 2.0], &[1, 1]), 2);
    }

    #[test]
    fn sampling_respects_top_k_and_seed() {
        let opts = GenerationOptions {
            do_sample: true,
            top_k: Some(2),
            seed: 7,
            ..Default::default()
        };
        let draw = |seed| {
            let mut s = TokenSelector::new(GenerationOptions { seed, ..opts.clone() });
            (0..50)
                .map(|_| s.select(&mut [5.0, 4.9, -10.0, 4.8], &[]))
                .collect::<Vec<_>>()
        };
        let a = draw(7);
        assert!(a.iter().all(|&t| t == 0 || t == 1), "{a:?}");
        assert!(a.contains(&0) && a.contains(&1));
        assert_eq!(a, draw(7), "same seed, same draws");
        let mut s = TokenSelector::new(GenerationOptions {
            top_p: 0.1,
            top_k: None,
            ..opts
        });
        assert!((0..20).all(|_| s.select(&mut [5.0, 4.0, 3.0], &[]) == 0));
    }
}
