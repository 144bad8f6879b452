//! Prompts of different lengths in one forward pass: left padding as transformers
//! recommends for VipLlava, with the key mask and position ids that make each row compute
//! what it would compute alone.

/// Prompts laid out as a `[rows, longest]` batch.
#[derive(Debug, Clone, PartialEq)]
pub struct LeftPadded {
    /// One row per prompt: `longest - len` pad ids, then the prompt.
    pub rows: Vec<Vec<u32>>,
    /// `[rows][longest]`, `true` for real tokens; `None` when no row is padded.
    pub key_mask: Option<Vec<Vec<bool>>>,
    /// transformers' `cumsum(mask) - 1`, with 1 at padding positions.
    pub positions: Vec<Vec<i64>>,
}

impl LeftPadded {
    /// Left-pads `prompts` with `pad`.
    pub fn new<'a>(prompts: impl IntoIterator<Item = &'a [u32]>, pad: u32) -> Self {
        let prompts: Vec<&[u32]> = prompts.into_iter().collect();
        let longest = prompts.iter().map(|p| p.len()).max().unwrap_or(0);
        let mut rows = Vec::with_capacity(prompts.len());
        let mut mask = Vec::with_capacity(prompts.len());
        let mut positions = Vec::with_capacity(prompts.len());
        for prompt in &prompts {
            let n_pad = longest - prompt.len();
            let mut row = vec![pad; n_pad];
            row.extend_from_slice(prompt);
            rows.push(row);
            mask.push((0..longest).map(|j| j >= n_pad).collect());
            positions.push(
                (0..longest)
                    .map(|j| if j < n_pad { 1 } else { (j - n_pad) as i64 })
                    .collect(),
            );
        }
        let padded = prompts.iter().any(|p| p.len() != longest);
        Self {
            rows,
            key_mask: padded.then_some(mask),
            positions,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pads_on_the_left_with_cumsum_positions() {
        let batch = LeftPadded::new([&[5u32, 6, 7][..], &[8u32][..]], 0);
        assert_eq!(batch.rows, vec![vec![5, 6, 7], vec![0, 0, 8]]);
        assert_eq!(
            batch.key_mask,
            Some(vec![vec![true, true, true], vec![false, false, true]])
        );
        assert_eq!(batch.positions, vec![vec![0, 1, 2], vec![1, 1, 0]]);
        let same = LeftPadded::new([&[1u32, 2][..], &[3u32, 4][..]], 0);
        assert_eq!(same.key_mask, None);
    }
}
