//! Rates of the decode kernels in isolation (weights streamed once per call):
//! `cargo bench -p vipllava-model --bench stream_kernels` (set `RAYON_NUM_THREADS`;
//! `STREAM_KERNELS=rows` for the file-order table alone, `STREAM_KERNELS=rows-batch` for its
//! products of a few activation rows, `STREAM_KERNELS=rows-step` for the products of whole
//! decode steps of the 1.1B Llama, `STREAM_KERNELS=gemm` for the
//! many-row bf16 table alone, `STREAM_KERNELS=amx-gemm` for its AMX column alone,
//! `STREAM_KERNELS=amx-tile` for the AMX block loop alone (`AMX_THREADS`, `AMX_MISALIGN`),
//! `STREAM_KERNELS=f16-amx` for the f16 AMX products in both weight orders,
//! `STREAM_KERNELS=f32-gemm` for the many-row f32 table alone, `STREAM_KERNELS=f16-gemm`
//! for the many-row f16 products (the f32 gemm against AVX2's f16 dot products),
//! `STREAM_KERNELS=prefill-attention` and
//! `STREAM_KERNELS=decode-attention` for the attention tables alone, `STREAM_KERNELS=gate`
//! for the MLP gates (SiLU times `up`, quick GELU) at prefill sizes,
//! `STREAM_KERNELS=packed-memory` for packed q4/q8 products over weights larger than the
//! caches, `STREAM_KERNELS=q4-gemm` for many-row q4 products: dequantized into the f32 gemm
//! against int8 activations).
//! Prints numbers only; BENCHMARKS.md (history #7) quotes them.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a demo program: failing loudly is fine

use std::hint::black_box;
use std::time::Instant;

use burn::tensor::{bf16, f16};
use vipllava_model::kernels::bf16_dot::{bf16_dot_available, matmul_bf16};
use vipllava_model::kernels::int8::{ColumnBlocks, Int8Rows, matmul_int8, vnni_available};
use vipllava_model::kernels::packed::{Bits, PackedWeight};
use vipllava_model::kernels::{matmul_q8_columns, matmul_stream, matmul_stream_q8};

/// Median seconds per call over `calls` calls, after one warm-up call.
fn time(calls: usize, mut f: impl FnMut()) -> f64 {
    f();
    let mut times: Vec<f64> = (0..calls)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed().as_secs_f64()
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[calls / 2]
}

/// The median over interleaved rounds of column `c` (seconds per call), in milliseconds.
fn median_ms<const C: usize>(rounds: &[[f64; C]], c: usize) -> f64 {
    let mut v: Vec<f64> = rounds.iter().map(|r| r[c]).collect();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2] * 1e3
}

/// The many-row products of a prefill: the 1.1B Llama's (617 rows, the prompt with the
/// image) and CLIP-L's (577 rows), as `(m, k, n)`.
const PREFILL_PRODUCTS: [(usize, usize, usize); 7] = [
    (617, 2048, 5632),
    (617, 5632, 2048),
    (617, 2048, 2048),
    (617, 2048, 256),
    (577, 1024, 4096),
    (577, 4096, 1024),
    (577, 1024, 1024),
];

/// The many-row tables' activations `[m, k]` and weight `[k, n]` (small values whose
/// products are not exact).
fn prefill_operands(m: usize, k: usize, n: usize) -> (Vec<f32>, Vec<f32>) {
    let x = (0..m * k).map(|i| ((i % 17) as f32 - 8.0) * 0.05).collect();
    let w = (0..k * n).map(|i| ((i % 13) as f32 - 6.0) * 0.01).collect();
    (x, w)
}

/// A `[k, n]` weight in a checkpoint's `[n, k]` order.
fn checkpoint_order<T: Copy>(w: &[T], k: usize, n: usize) -> Vec<T> {
    (0..n * k).map(|i| w[(i % k) * n + i / k]).collect()
}

fn main() {
    // `STREAM_KERNELS=<table>` prints that table alone.
    let alone: Option<fn()> = match std::env::var("STREAM_KERNELS").as_deref() {
        Ok("rows") => Some(rows_table),
        Ok("rows-batch") => Some(rows_batch_table),
        Ok("rows-step") => Some(rows_step_table),
        Ok("gemm") => Some(gemm_table),
        Ok("amx-gemm") => Some(amx_gemm_table),
        Ok("amx-tile") => Some(amx_tile_table),
        Ok("f16-amx") => Some(f16_amx_table),
        Ok("f32-gemm") => Some(f32_gemm_table),
        Ok("f16-gemm") => Some(f16_gemm_table),
        Ok("packed-memory") => Some(packed_memory_table),
        Ok("q4-gemm") => Some(q4_gemm_table),
        Ok("decode-attention") => Some(attention_table),
        Ok("prefill-attention") => Some(prefill_attention_table),
        Ok("gate") => Some(gate_table),
        _ => None,
    };
    if let Some(table) = alone {
        table();
        return;
    }
    println!(
        "VNNI: {}, packed int8 kernel: {:?}, AVX-512 BF16: {}",
        vnni_available(),
        vipllava_model::kernels::packed::Int8Kernel::best(),
        bf16_dot_available()
    );
    println!(
        "| k x n | bf16 ms | bf16 GB/s | bf16 x bf16 (vdpbf16ps) ms | q8 (row blocks, f32 x) ms | q8 (K blocks, f32 x) ms | q8 (K blocks, int8 x) ms | int8 x G values/s | q8 packed ms | q4 packed ms | q4 packed G values/s |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    // Llama-1B shapes: gate/up, down, q/o, k/v; 7B: gate/up.
    for (k, n) in [
        (2048, 5632),
        (5632, 2048),
        (2048, 2048),
        (2048, 256),
        (4096, 11008),
    ] {
        let x: Vec<f32> = (0..k).map(|i| (i % 7) as f32 * 0.1).collect();
        let w: Vec<bf16> = (0..k * n)
            .map(|i| bf16::from_f32((i % 13) as f32 * 0.01))
            .collect();
        let q: Vec<i8> = (0..k * n).map(|i| (i % 251) as i8).collect();
        // A power of two: f16-exact, as packing requires.
        let scales = vec![1.0f32 / 128.0; k * n / 32];
        let bf = time(21, || {
            black_box(matmul_stream(black_box(&x), black_box(&w), 1, k, n));
        });
        let xb: Vec<f32> = x.iter().map(|&v| bf16::from_f32(v).to_f32()).collect();
        let bf_dot = time(21, || {
            black_box(matmul_bf16(black_box(&xb), black_box(&w), 1, k, n).unwrap());
        });
        let q8 = time(21, || {
            black_box(matmul_stream_q8(
                black_box(&x),
                black_box(&q),
                &scales,
                32,
                1,
                k,
                n,
            ));
        });
        let w = ColumnBlocks {
            q: &q,
            scales: &scales,
            k,
            n,
            block: 32,
        };
        let columns = time(21, || {
            black_box(matmul_q8_columns(black_box(&x), &w, 1));
        });
        let int8 = time(21, || {
            let xq = Int8Rows::quantize(black_box(&x), 1, k, 32).unwrap();
            black_box(matmul_int8(&xq, &w));
        });
        let packed = |bits| {
            let q4: Vec<i8> = q.iter().map(|&v| v >> 4).collect();
            let values = if bits == Bits::Four { &q4 } else { &q };
            let packed = PackedWeight::pack(&ColumnBlocks { q: values, ..w }, bits).unwrap();
            time(21, || {
                let xq = Int8Rows::quantize(black_box(&x), 1, k, 32).unwrap();
                black_box(packed.matmul_int8(&xq));
            })
        };
        let (packed8, packed4) = (packed(Bits::Eight), packed(Bits::Four));
        let values = (k * n) as f64;
        println!(
            "| {k} x {n} | {:.3} | {:.1} | {:.3} | {:.3} | {:.3} | {:.3} | {:.1} | {:.3} | {:.3} | {:.1} |",
            bf * 1e3,
            values * 2.0 / bf / 1e9,
            bf_dot * 1e3,
            q8 * 1e3,
            columns * 1e3,
            int8 * 1e3,
            values / int8 / 1e9,
            packed8 * 1e3,
            packed4 * 1e3,
            values / packed4 / 1e9
        );
    }
    rows_table();
    attention_table();
}

/// Decode products with the weight in the file's `[n, k]` order (used in place from the
/// map) against the same values in Burn's `[k, n]` order, one activation row. Each call
/// reads another copy of the weight (512 MB in all), so weights come from memory as in a
/// real decode step, not from the cache.
fn rows_table() {
    use vipllava_model::kernels::rows::{matmul_rows, matmul_rows_bf16};

    /// `matmul_rows_bf16` with the signature of the others (its activations are bf16 values).
    fn bf16_dot(x: &[f32], w: &[bf16], rows: usize, k: usize, n: usize) -> Vec<f32> {
        matmul_rows_bf16(x, w, rows, k, n).unwrap()
    }

    println!();
    println!(
        "| k x n | bf16 [n,k] ms | bf16 [k,n] ms | bf16 x bf16 [n,k] ms | f32 [n,k] ms | f32 [k,n] ms | f16 [n,k] ms | f16 [k,n] ms |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for (k, n) in [
        (2048, 5632),
        (5632, 2048),
        (2048, 2048),
        (2048, 256),
        (4096, 11008),
    ] {
        let x: Vec<f32> = (0..k)
            .map(|i| bf16::from_f32((i % 7) as f32 * 0.1).to_f32())
            .collect();
        let copies = (512usize << 20).div_ceil(k * n * 4).max(2);
        let wf: Vec<Vec<f32>> = (0..copies)
            .map(|c| (0..k * n).map(|i| ((i + c) % 13) as f32 * 0.01).collect())
            .collect();
        let wb: Vec<Vec<bf16>> = wf
            .iter()
            .map(|w| w.iter().map(|&v| bf16::from_f32(v)).collect())
            .collect();
        let wh: Vec<Vec<f16>> = wf
            .iter()
            .map(|w| w.iter().map(|&v| f16::from_f32(v)).collect())
            .collect();
        type Kernel<T> = fn(&[f32], &[T], usize, usize, usize) -> Vec<f32>;
        let bf: [Kernel<bf16>; 3] = [matmul_rows::<bf16>, matmul_stream::<bf16>, bf16_dot];
        let f: [Kernel<f32>; 2] = [matmul_rows::<f32>, matmul_stream::<f32>];
        // Interleaved rounds, medians of the per-round medians.
        let mut rounds = [[0f64; 7]; 5];
        for round in rounds.iter_mut() {
            for (c, kernel) in bf.iter().enumerate() {
                let mut at = 0;
                round[c] = time(9, || {
                    at = (at + 1) % copies;
                    black_box(kernel(black_box(&x), black_box(&wb[at]), 1, k, n));
                });
            }
            for (c, kernel) in f.iter().enumerate() {
                let mut at = 0;
                round[3 + c] = time(9, || {
                    at = (at + 1) % copies;
                    black_box(kernel(black_box(&x), black_box(&wf[at]), 1, k, n));
                });
            }
            let mut at = 0;
            round[5] = time(9, || {
                at = (at + 1) % copies;
                black_box(matmul_rows::<f16>(black_box(&x), black_box(&wh[at]), 1, k, n));
            });
            round[6] = time(9, || {
                at = (at + 1) % copies;
                black_box(matmul_stream::<f16>(black_box(&x), black_box(&wh[at]), 1, k, n));
            });
        }
        let median = |c: usize| median_ms(&rounds, c);
        let mut cells: Vec<String> = (0..7).map(|c| format!("{:.3}", median(c))).collect();
        if !bf16_dot_available() {
            cells[2] = "(no AVX-512 BF16: the plain-Rust twin) ".to_string() + &cells[2];
        }
        println!("| {k} x {n} | {} |", cells.join(" | "));
    }
}

/// Decode products of a batch (1 to 16 activation rows, whole and partial groups) with the
/// weight in the file's `[n, k]` order, each call on another copy of the weight (from
/// memory, as in a decode step): milliseconds per call, and the time per activation row
/// against one row's (1.0: a row costs what a lone row costs; 1/rows: free rows). bf16 x
/// bf16 and f16 twice: as the engine runs them (AMX tiles from 4 and 6 rows where the CPU
/// has them) and with `vdpbf16ps` or f32 multiply-adds alone; without AVX-512 BF16 the first
/// bf16 column is the engine's path there (f32 multiply-adds) and the second is empty.
fn rows_batch_table() {
    use vipllava_model::kernels::rows::{
        matmul_rows, matmul_rows_bf16, matmul_rows_bf16_dots, matmul_rows_f16,
    };

    println!();
    if !bf16_dot_available() {
        println!(
            "(no AVX-512 BF16: the first bf16 column is the engine's f32 multiply-adds on bf16 weights)"
        );
    }
    println!(
        "| k x n | rows | bf16 x bf16 ms | per row / 1 row | bf16 vdpbf16ps ms | per row / 1 row | f16 ms | per row / 1 row | f16 FMA ms | per row / 1 row | f32 ms | per row / 1 row |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    // The 1.1B Llama's gate/up, down and q/o projections, then the 7B's gate/up and down.
    for (k, n) in [
        (2048, 5632),
        (5632, 2048),
        (2048, 2048),
        (4096, 11008),
        (11008, 4096),
    ] {
        let copies = (512usize << 20).div_ceil(k * n * 4).max(2);
        let wf: Vec<Vec<f32>> = (0..copies)
            .map(|c| (0..k * n).map(|i| ((i + c) % 13) as f32 * 0.01).collect())
            .collect();
        let wb: Vec<Vec<bf16>> = wf
            .iter()
            .map(|w| w.iter().map(|&v| bf16::from_f32(v)).collect())
            .collect();
        let wh: Vec<Vec<f16>> = wf
            .iter()
            .map(|w| w.iter().map(|&v| f16::from_f32(v)).collect())
            .collect();
        let mut single = [0f64; 5];
        for rows in [1, 2, 3, 4, 6, 8, 12, 16] {
            let x: Vec<f32> = (0..rows * k)
                .map(|i| bf16::from_f32((i % 7) as f32 * 0.1).to_f32())
                .collect();
            // Interleaved rounds, medians of the per-round medians.
            let mut rounds = [[0f64; 5]; 3];
            for round in rounds.iter_mut() {
                let mut at = 0;
                if bf16_dot_available() {
                    round[0] = time(7, || {
                        at = (at + 1) % copies;
                        black_box(matmul_rows_bf16(black_box(&x), black_box(&wb[at]), rows, k, n).unwrap());
                    });
                    round[1] = time(7, || {
                        at = (at + 1) % copies;
                        black_box(
                            matmul_rows_bf16_dots(black_box(&x), black_box(&wb[at]), rows, k, n).unwrap(),
                        );
                    });
                } else {
                    // The engine's bf16 path without `vdpbf16ps` (`kernels::linear`): f32
                    // multiply-adds on the widened weights; no second column.
                    round[0] = time(7, || {
                        at = (at + 1) % copies;
                        black_box(matmul_rows::<bf16>(black_box(&x), black_box(&wb[at]), rows, k, n));
                    });
                }
                round[2] = time(7, || {
                    at = (at + 1) % copies;
                    black_box(matmul_rows_f16(black_box(&x), black_box(&wh[at]), rows, k, n));
                });
                round[3] = time(7, || {
                    at = (at + 1) % copies;
                    black_box(matmul_rows::<f16>(black_box(&x), black_box(&wh[at]), rows, k, n));
                });
                round[4] = time(7, || {
                    at = (at + 1) % copies;
                    black_box(matmul_rows::<f32>(black_box(&x), black_box(&wf[at]), rows, k, n));
                });
            }
            let cells: Vec<String> = (0..5)
                .map(|c| {
                    if c == 1 && !bf16_dot_available() {
                        return "- | -".to_string();
                    }
                    let ms = median_ms(&rounds, c);
                    if rows == 1 {
                        single[c] = ms;
                    }
                    format!("{ms:.3} | {:.2}", ms / rows as f64 / single[c])
                })
                .collect();
            println!("| {k} x {n} | {rows} | {} |", cells.join(" | "));
        }
    }
}

/// The products of whole decode steps of the 1.1B Llama (22 layers, each with its own
/// weights: q, k, v, o, gate, up and down), in bf16 x bf16 and f16 (as the engine runs them,
/// then with `vdpbf16ps` or f32 multiply-adds alone, without AMX tiles) and f32, for 1-16
/// activation rows, as `vipllava bench` and `serve` run them; the attention and the rest are
/// left out; q8 and q4 with int8 activations too (the engine's kernel, then VNNI alone).
/// Without AVX-512 BF16, bf16 is timed once, as the engine runs it there: f32 multiply-adds
/// on the widened weights. f16 and f32 are timed through the prefill's f32 gemm as well,
/// where the CPU runs it.
/// Unlike `rows-batch`, every shape and its activations take their turn in the caches.
fn rows_step_table() {
    use vipllava_model::kernels::f32_gemm::f32_gemm_available;
    use vipllava_model::kernels::rows::{
        matmul_rows, matmul_rows_bf16, matmul_rows_bf16_dots, matmul_rows_f16,
    };

    const LAYERS: usize = 22;
    const SHAPES: [(usize, usize); 7] = [
        (2048, 2048),
        (2048, 256),
        (2048, 256),
        (2048, 2048),
        (2048, 5632),
        (2048, 5632),
        (5632, 2048),
    ];
    // `ROWS_STEP_ROWS=4,6,8` for other row counts.
    let rows_list: Vec<usize> = std::env::var("ROWS_STEP_ROWS")
        .ok()
        .and_then(|v| v.split(',').map(|r| r.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![1, 4, 8, 16]);
    // `ROWS_STEP_DTYPES=q8,q4` for some of bf16, f16, q8, q4 and f32.
    let dtypes = std::env::var("ROWS_STEP_DTYPES").ok();
    let wanted = |dtype: &str| {
        dtypes
            .as_deref()
            .is_none_or(|d| d.split(',').any(|d| d.trim() == dtype))
    };
    println!();
    println!("| dtype | rows | ms per step | tok/s (rows / step) |");
    println!("|---|---|---|---|");
    let weights_f32 = || -> Vec<Vec<f32>> {
        (0..LAYERS)
            .flat_map(|l| SHAPES.iter().map(move |&(k, n)| (l, k, n)))
            .map(|(l, k, n)| (0..k * n).map(|i| ((i + l) % 13) as f32 * 0.01).collect())
            .collect()
    };
    let inputs = |rows: usize| -> Vec<Vec<f32>> {
        SHAPES
            .iter()
            .map(|&(k, _)| {
                (0..rows * k)
                    .map(|i| bf16::from_f32((i % 7) as f32 * 0.1).to_f32())
                    .collect()
            })
            .collect()
    };
    /// One step: `product(activations, weight, k, n)` for every layer's weights in turn.
    fn each_layer<W>(weights: &[W], xs: &[Vec<f32>], mut product: impl FnMut(&[f32], &W, usize, usize)) {
        for (i, w) in weights.iter().enumerate() {
            let (k, n) = SHAPES[i % SHAPES.len()];
            product(black_box(&xs[i % SHAPES.len()]), w, k, n);
        }
    }
    /// A step's products with f32 multiply-adds on widened weights (`matmul_rows`).
    fn fma_step<T: vipllava_model::kernels::Widen + burn::tensor::Element>(
        weights: &[Vec<T>],
        xs: &[Vec<f32>],
        rows: usize,
    ) {
        each_layer(weights, xs, |x, w, k, n| {
            black_box(matmul_rows::<T>(x, w, rows, k, n));
        });
    }
    /// A step's products through the prefill's f32 gemm (`matmul_f32_gemm`, f16 weights
    /// widened as they are packed): what a batch would cost past
    /// `kernels::MAX_STREAM_ROWS`, where the engine leaves the row kernels.
    fn gemm_step<T: vipllava_model::kernels::Widen + burn::tensor::Element>(
        weights: &[Vec<T>],
        xs: &[Vec<f32>],
        rows: usize,
    ) {
        use vipllava_model::kernels::bf16_gemm::WeightOrder;
        use vipllava_model::kernels::f32_gemm::matmul_f32_gemm;
        each_layer(weights, xs, |x, w, k, n| {
            black_box(
                matmul_f32_gemm::<f32, T>(x, w, WeightOrder::OutputMajor, rows, k, n)
                    .expect("the f32 gemm runs on this CPU (checked by the caller)"),
            );
        });
    }
    type Step<'a> = (&'a str, &'a dyn Fn(&[Vec<f32>], usize));
    // The variants of one dtype interleaved in each round (medians of 3 rounds).
    let report = |variants: &[Step]| {
        for &rows in &rows_list {
            let xs = inputs(rows);
            let mut rounds = [[0f64; 4]; 3];
            for round in rounds.iter_mut() {
                for (c, (_, step)) in variants.iter().enumerate() {
                    round[c] = time(3, || step(&xs, rows));
                }
            }
            for (c, (dtype, _)) in variants.iter().enumerate() {
                let ms = median_ms(&rounds, c);
                println!("| {dtype} | {rows} | {ms:.1} | {:.1} |", rows as f64 / ms * 1e3);
            }
        }
    };
    if wanted("bf16") {
        let wb = converted(weights_f32(), bf16::from_f32);
        let engine = |xs: &[Vec<f32>], rows: usize| {
            each_layer(&wb, xs, |x, w, k, n| {
                black_box(matmul_rows_bf16(x, w, rows, k, n).unwrap());
            })
        };
        let dots = |xs: &[Vec<f32>], rows: usize| {
            each_layer(&wb, xs, |x, w, k, n| {
                black_box(matmul_rows_bf16_dots(x, w, rows, k, n).unwrap());
            })
        };
        let fmas = |xs: &[Vec<f32>], rows: usize| fma_step(&wb, xs, rows);
        if bf16_dot_available() {
            report(&[("bf16 x bf16", &engine), ("bf16 x bf16, vdpbf16ps", &dots)]);
        } else {
            // Without `vdpbf16ps` the engine widens the bf16 weights for f32 multiply-adds
            // (`kernels::linear`); the bf16 x bf16 twin is plain Rust there, one scalar
            // multiply-add per value, and no engine path.
            report(&[("bf16, f32 multiply-adds", &fmas)]);
        }
    }
    if wanted("f16") {
        let wh = converted(weights_f32(), f16::from_f32);
        let engine = |xs: &[Vec<f32>], rows: usize| {
            each_layer(&wh, xs, |x, w, k, n| {
                black_box(matmul_rows_f16(x, w, rows, k, n));
            })
        };
        let fmas = |xs: &[Vec<f32>], rows: usize| fma_step(&wh, xs, rows);
        let gemm = |xs: &[Vec<f32>], rows: usize| gemm_step(&wh, xs, rows);
        // The f16 prefill's dot products on AVX2 (`f16_gemm`), its f16 activations made
        // once per row count, outside the timing.
        let halves = std::cell::RefCell::new(std::collections::HashMap::<usize, Vec<Vec<f16>>>::new());
        let dot = |xs: &[Vec<f32>], rows: usize| {
            use vipllava_model::kernels::f16_gemm::matmul_f16_dot;
            let mut halves = halves.borrow_mut();
            let xh = halves.entry(rows).or_insert_with(|| {
                xs.iter()
                    .map(|x| x.iter().map(|&v| f16::from_f32(v)).collect())
                    .collect()
            });
            for (i, w) in wh.iter().enumerate() {
                let (k, n) = SHAPES[i % SHAPES.len()];
                black_box(matmul_f16_dot(black_box(&xh[i % SHAPES.len()]), w, rows, k, n));
            }
        };
        let mut variants: Vec<Step> = vec![("f16", &engine), ("f16, f32 multiply-adds", &fmas)];
        if f32_gemm_available() {
            variants.push(("f16, f32 gemm", &gemm));
        }
        if vipllava_model::kernels::f16_gemm::f16_dot_available() {
            variants.push(("f16, f16 dot products", &dot));
        }
        report(&variants);
    }
    if wanted("q8") || wanted("q4") {
        // q8 and q4 weights in blocks of 32 with int8 activations, as `--quantize q8|q4`
        // runs them: the engine's kernel (AMX tiles from `AMX_INT8_MIN_ROWS` rows where the
        // CPU has AMX-INT8), and VNNI alone beside it where the engine is AMX (elsewhere the
        // engine's kernel is the only one: VNNI itself, AVX2 or plain).
        use vipllava_model::kernels::int8::Int8Rows;
        use vipllava_model::kernels::packed::Int8Kernel;
        const BLOCK: usize = 32;
        for (bits, name, vnni_name) in [
            (Bits::Eight, "q8 x int8", "q8 x int8, VNNI"),
            (Bits::Four, "q4 x int8", "q4 x int8, VNNI"),
        ] {
            if !wanted(if bits == Bits::Eight { "q8" } else { "q4" }) {
                continue;
            }
            let (low, span) = if bits == Bits::Eight {
                (-127i32, 255usize)
            } else {
                (-8, 16)
            };
            let packed: Vec<PackedWeight> = (0..LAYERS)
                .flat_map(|l| SHAPES.iter().map(move |&(k, n)| (l, k, n)))
                .map(|(l, k, n)| {
                    let q: Vec<i8> = (0..k * n)
                        .map(|i| (low + ((i * 7 + l) % span) as i32) as i8)
                        .collect();
                    let scales: Vec<f32> = (0..k * n / BLOCK)
                        .map(|i| 0.01 + (i % 5) as f32 * 0.001)
                        .collect();
                    let scales: Vec<f32> = scales.iter().map(|&s| f16::from_f32(s).to_f32()).collect();
                    let columns = ColumnBlocks {
                        q: &q,
                        scales: &scales,
                        k,
                        n,
                        block: BLOCK,
                    };
                    PackedWeight::pack(&columns, bits).unwrap()
                })
                .collect();
            let step = |kernel: Int8Kernel| {
                let packed = &packed;
                move |xs: &[Vec<f32>], rows: usize| {
                    each_layer(packed, xs, |x, w, k, _| {
                        let xq = Int8Rows::quantize(x, rows, k, BLOCK).unwrap();
                        black_box(w.matmul_int8_on(&xq, kernel).unwrap());
                    })
                }
            };
            let (engine, vnni) = (step(Int8Kernel::best()), step(Int8Kernel::Vnni));
            let mut variants: Vec<Step> = vec![(name, &engine)];
            if Int8Kernel::best() == Int8Kernel::Amx {
                variants.push((vnni_name, &vnni));
            }
            report(&variants);
        }
    }
    if !wanted("f32") {
        return;
    }
    let wf = weights_f32();
    let gemm = |xs: &[Vec<f32>], rows: usize| gemm_step(&wf, xs, rows);
    let rows_kernel = |xs: &[Vec<f32>], rows: usize| fma_step(&wf, xs, rows);
    let mut variants: Vec<Step> = vec![("f32", &rows_kernel)];
    if f32_gemm_available() {
        variants.push(("f32, f32 gemm", &gemm));
    }
    report(&variants);
}

/// Each weight of `weights` in another dtype (the f32 copies freed as they go).
fn converted<T>(weights: Vec<Vec<f32>>, to: impl Fn(f32) -> T) -> Vec<Vec<T>> {
    weights
        .into_iter()
        .map(|w| w.into_iter().map(&to).collect())
        .collect()
}

/// Many-row bf16 products (prefill of a 617-token prompt, image encode of 577 patches): the
/// `vdpbf16ps` gemm and, where the CPU has them, AMX tiles, in both weight orders, against
/// what the engine did before, widening activations and weight to f32 for Burn's f32 gemm
/// and rounding back to bf16.
fn gemm_table() {
    use burn::tensor::{DType, Device, Tensor, TensorData};
    use vipllava_model::kernels::amx::amx_bf16_available;
    use vipllava_model::kernels::bf16_gemm::{
        WeightOrder, bf16_gemm_available, matmul_bf16_amx, matmul_bf16_vdpbf16ps,
    };

    let device = Device::flex();
    println!();
    println!(
        "AVX-512 BF16: {}, AMX-BF16: {}",
        bf16_gemm_available(),
        amx_bf16_available()
    );
    println!(
        "| m x k x n | widen + f32 gemm ms | vdpbf16ps [k,n] ms | vdpbf16ps [n,k] ms | AMX [k,n] ms | AMX [n,k] ms | GFLOP/s (best [n,k]) | widen / best [n,k] |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for (m, k, n) in PREFILL_PRODUCTS {
        let (x, w) = prefill_operands(m, k, n);
        let (x, w): (Vec<bf16>, Vec<bf16>) = (
            x.into_iter().map(bf16::from_f32).collect(),
            w.into_iter().map(bf16::from_f32).collect(),
        );
        let file = checkpoint_order(&w, k, n);
        let xt = Tensor::<2>::from_data(TensorData::new(x.clone(), [m, k]), &device);
        let wt = Tensor::<2>::from_data(TensorData::new(w.clone(), [k, n]), &device);
        let mut rounds = [[f64::NAN; 5]; 3];
        for round in rounds.iter_mut() {
            round[0] = time(3, || {
                let y = xt.clone().cast(DType::F32).matmul(wt.clone().cast(DType::F32));
                black_box(y.cast(DType::BF16).into_data());
            });
            if bf16_gemm_available() {
                round[1] = time(3, || {
                    black_box(matmul_bf16_vdpbf16ps(&x, &w, WeightOrder::InputMajor, m, k, n));
                });
                round[2] = time(3, || {
                    black_box(matmul_bf16_vdpbf16ps(
                        &x,
                        &file,
                        WeightOrder::OutputMajor,
                        m,
                        k,
                        n,
                    ));
                });
            }
            if amx_bf16_available() {
                round[3] = time(3, || {
                    black_box(matmul_bf16_amx(&x, &w, WeightOrder::InputMajor, m, k, n));
                });
                round[4] = time(3, || {
                    black_box(matmul_bf16_amx(&x, &file, WeightOrder::OutputMajor, m, k, n));
                });
            }
        }
        let median = |c: usize| median_ms(&rounds, c);
        if !bf16_gemm_available() {
            println!(
                "| {m} x {k} x {n} | {:.1} | (no AVX-512 BF16) | | | | | |",
                median(0)
            );
            continue;
        }
        let best = if amx_bf16_available() {
            median(4)
        } else {
            median(2)
        };
        let gflops = 2.0 * (m * k * n) as f64 / best / 1e6;
        let cell = |c: usize| {
            let v = median(c);
            if v.is_nan() {
                "(no AMX)".to_string()
            } else {
                format!("{v:.1}")
            }
        };
        println!(
            "| {m} x {k} x {n} | {} | {} | {} | {} | {} | {gflops:.0} | {:.2} |",
            cell(0),
            cell(1),
            cell(2),
            cell(3),
            cell(4),
            median(0) / best
        );
    }
}

/// The AMX column of [`gemm_table`] alone, checkpoint-order weights, five interleaved
/// rounds (quick to rerun while tuning the AMX gemm).
fn amx_gemm_table() {
    use vipllava_model::kernels::amx::amx_bf16_available;
    use vipllava_model::kernels::bf16_gemm::{WeightOrder, matmul_bf16_amx};

    if !amx_bf16_available() {
        println!("no AMX-BF16 on this CPU");
        return;
    }
    // A model's weights come from memory, not from the last-level cache (300 MB on the AMX
    // machine, more than one product's weight): the second column cycles through copies of
    // the weight that together hold twice that, each product reading the next copy.
    const FROM_MEMORY_BYTES: usize = 640 << 20;
    println!("| m x k x n | AMX [n,k] ms | GFLOP/s | weights from memory ms | GFLOP/s |");
    println!("|---|---|---|---|---|");
    for (m, k, n) in PREFILL_PRODUCTS {
        let (x, w) = prefill_operands(m, k, n);
        let (x, w): (Vec<bf16>, Vec<bf16>) = (
            x.into_iter().map(bf16::from_f32).collect(),
            w.into_iter().map(bf16::from_f32).collect(),
        );
        let file = checkpoint_order(&w, k, n);
        let copies: Vec<Vec<bf16>> = (0..FROM_MEMORY_BYTES.div_ceil(2 * k * n))
            .map(|_| file.clone())
            .collect();
        let mut next = 0;
        let mut rounds = [[f64::NAN; 2]; 5];
        for round in rounds.iter_mut() {
            round[0] = time(5, || {
                black_box(matmul_bf16_amx(&x, &file, WeightOrder::OutputMajor, m, k, n));
            });
            round[1] = time(copies.len().min(25), || {
                let w = &copies[next % copies.len()];
                next += 1;
                black_box(matmul_bf16_amx(&x, w, WeightOrder::OutputMajor, m, k, n));
            });
        }
        let (cached, memory) = (median_ms(&rounds, 0), median_ms(&rounds, 1));
        let gflops = |ms: f64| 2.0 * (m * k * n) as f64 / ms / 1e6;
        println!(
            "| {m} x {k} x {n} | {cached:.2} | {:.0} | {memory:.2} | {:.0} |",
            gflops(cached),
            gflops(memory)
        );
    }
}

/// Many-row f16 products on AMX tiles (three products of the values' bf16 halves), the
/// weights from memory as a model's are, in both weight orders: the checkpoint's `[n, k]`
/// (hub safetensors used in place) and Burn's `[k, n]` (a burnpack's).
fn f16_amx_table() {
    use vipllava_model::kernels::amx::amx_bf16_available;
    use vipllava_model::kernels::bf16_gemm::{WeightOrder, matmul_bf16_amx, matmul_f16_amx};

    if !amx_bf16_available() {
        println!("no AMX-BF16 on this CPU");
        return;
    }
    const FROM_MEMORY_BYTES: usize = 640 << 20;
    println!("| m x k x n | f16 [n,k] ms | f16 [k,n] ms | bf16 [n,k] ms | f16 / bf16 |");
    println!("|---|---|---|---|---|");
    // The 1.1B's and CLIP-L's products, then the 7B Llama's.
    let llama_7b = [(617, 4096, 11008), (617, 11008, 4096), (617, 4096, 4096)];
    for (m, k, n) in PREFILL_PRODUCTS.into_iter().chain(llama_7b) {
        let (x, w) = prefill_operands(m, k, n);
        let (x, w): (Vec<f16>, Vec<f16>) = (
            x.into_iter().map(f16::from_f32).collect(),
            w.into_iter().map(f16::from_f32).collect(),
        );
        let copies = FROM_MEMORY_BYTES.div_ceil(2 * k * n);
        let orders = [
            (WeightOrder::OutputMajor, vec![checkpoint_order(&w, k, n); copies]),
            (WeightOrder::InputMajor, vec![w; copies]),
        ];
        // The same values as bf16 (f16 values in this range are bf16 values times 1 + a
        // few bits; the time does not depend on them): what the f16 product costs over it.
        let xb: Vec<bf16> = x.iter().map(|v| bf16::from_f32(v.to_f32())).collect();
        // The f16 weight already in the checkpoint's order (the first order's), as bf16.
        let wb: Vec<bf16> = orders[0].1[0]
            .iter()
            .map(|v| bf16::from_f32(v.to_f32()))
            .collect();
        let wb = vec![wb; copies];
        let mut next = 0;
        let mut rounds = [[f64::NAN; 3]; 5];
        for round in rounds.iter_mut() {
            for (c, (order, weights)) in orders.iter().enumerate() {
                round[c] = time(copies.min(15), || {
                    next += 1;
                    black_box(matmul_f16_amx(&x, &weights[next % copies], *order, m, k, n));
                });
            }
            round[2] = time(copies.min(15), || {
                next += 1;
                black_box(matmul_bf16_amx(
                    &xb,
                    &wb[next % copies],
                    WeightOrder::OutputMajor,
                    m,
                    k,
                    n,
                ));
            });
        }
        let [f16_file, f16_burn, bf16_file] = [0, 1, 2].map(|c| median_ms(&rounds, c));
        println!(
            "| {m} x {k} x {n} | {f16_file:.2} | {f16_burn:.2} | {bf16_file:.2} | {:.2} |",
            f16_file / bf16_file
        );
    }
}

/// The AMX block loop ([`Tiles::block`]) alone, in `AMX_THREADS` threads (default 1) at
/// once, on operands from L1-sized to L2-sized: GFLOP/s per thread. `AMX_MISALIGN=16`
/// starts the operand tiles 16 bytes past a cache line (what a plain `Vec` gave).
fn amx_tile_table() {
    use vipllava_model::kernels::amx::Tiles;

    if Tiles::new().is_none() {
        println!("no AMX-BF16 on this CPU");
        return;
    }
    let env = |name: &str, default: usize| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let threads = env("AMX_THREADS", 1);
    let misalign = env("AMX_MISALIGN", 0);
    // bf16 bits of small values; the loop's time does not depend on them.
    let operand = |len: usize| -> Vec<u16> {
        (0..len)
            .map(|i| bf16::from_f32((i % 200) as f32 * 0.01 - 1.0).to_bits())
            .collect()
    };
    // A copy of `values` that starts `misalign` bytes past a cache line.
    let placed = |values: Vec<u16>| -> (Vec<u16>, usize) {
        let mut buffer = vec![0u16; values.len() + 64];
        let start = (64 - buffer.as_ptr() as usize % 64) % 64 / 2 + misalign / 2;
        buffer[start..start + values.len()].copy_from_slice(&values);
        (buffer, start)
    };
    println!("| steps | 32-row blocks (A) | 32-column blocks (B) | GFLOP/s per thread ({threads} threads) |");
    println!("|---|---|---|---|");
    for (steps, row_blocks, col_blocks) in [
        (8, 1, 1),
        (64, 1, 1),
        (64, 1, 8),
        (64, 20, 8),
        (16, 20, 8),
        (64, 20, 1),
    ] {
        let tile = steps * 512; // bf16 values of one 16-row operand over `steps` steps
        let (a, a0) = placed(operand(row_blocks * 2 * tile));
        let (b, b0) = placed(operand(col_blocks * 2 * tile));
        let (a, b) = (&a[a0..], &b[b0..]);
        let reps = (4_000_000 / (row_blocks * col_blocks * steps)).max(1);
        let one_thread = || {
            let tiles = Tiles::new().expect("AMX checked above");
            let mut c = vec![0f32; row_blocks * col_blocks * 1024];
            time(5, || {
                for _ in 0..reps {
                    for r in 0..row_blocks {
                        for t in 0..col_blocks {
                            let ap = [
                                a[2 * r * tile..].as_ptr().cast(),
                                a[(2 * r + 1) * tile..].as_ptr().cast(),
                            ];
                            let bp = [
                                b[2 * t * tile..].as_ptr().cast(),
                                b[(2 * t + 1) * tile..].as_ptr().cast(),
                            ];
                            let cp = c[(r * col_blocks + t) * 1024..].as_mut_ptr().cast::<u8>();
                            // SAFETY: each operand holds `steps` 1 KB tiles past its start, `c`
                            // 32 rows of 128 bytes for this block; the thread's own buffers.
                            unsafe { tiles.block(ap, bp, Some((cp.cast_const(), 128)), (cp, 128), steps) };
                        }
                    }
                }
            })
        };
        let slowest = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..threads).map(|_| scope.spawn(one_thread)).collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("bench thread"))
                .fold(0.0, f64::max)
        });
        let flops = 2.0 * 32.0 * 32.0 * 32.0 * (steps * row_blocks * col_blocks * reps) as f64;
        println!(
            "| {steps} | {row_blocks} | {col_blocks} | {:.0} |",
            flops / slowest / 1e9
        );
    }
}

/// Many-row f32 products (f32 prefill, image encode): Flex's f32 gemm on a checkpoint-order
/// weight (what the engine did before) against [`matmul_f32_gemm`] in both weight orders,
/// 3 interleaved rounds, medians.
fn f32_gemm_table() {
    use burn::tensor::{Device, Tensor, TensorData};
    use vipllava_model::kernels::bf16_gemm::WeightOrder;
    use vipllava_model::kernels::f32_gemm::{f32_gemm_available, matmul_f32_gemm};

    let device = Device::flex();
    println!();
    println!("f32 gemm (AVX-512 F or AVX2 + FMA): {}", f32_gemm_available());
    println!(
        "| m x k x n | Flex [n,k] ms | ours [k,n] ms | ours [n,k] ms | GFLOP/s (ours [n,k]) | Flex / ours [n,k] |"
    );
    println!("|---|---|---|---|---|---|");
    for (m, k, n) in PREFILL_PRODUCTS {
        let (x, w) = prefill_operands(m, k, n);
        let file = checkpoint_order(&w, k, n);
        let xt = Tensor::<2>::from_data(TensorData::new(x.clone(), [m, k]), &device);
        // The checkpoint's `[n, k]` rows seen as `[k, n]`, as the loader hands them out.
        let ft = Tensor::<2>::from_data(TensorData::new(file.clone(), [n, k]), &device).swap_dims(0, 1);
        let mut rounds = [[f64::NAN; 3]; 3];
        for round in rounds.iter_mut() {
            round[0] = time(3, || {
                black_box(xt.clone().matmul(ft.clone()).into_data());
            });
            if f32_gemm_available() {
                round[1] = time(3, || {
                    black_box(matmul_f32_gemm(&x, &w, WeightOrder::InputMajor, m, k, n));
                });
                round[2] = time(3, || {
                    black_box(matmul_f32_gemm(&x, &file, WeightOrder::OutputMajor, m, k, n));
                });
            }
        }
        let median = |c: usize| median_ms(&rounds, c);
        if !f32_gemm_available() {
            println!("| {m} x {k} x {n} | {:.1} | (no f32 gemm) | | | |", median(0));
            continue;
        }
        let gflops = 2.0 * (m * k * n) as f64 / median(2) / 1e6;
        println!(
            "| {m} x {k} x {n} | {:.1} | {:.1} | {:.1} | {gflops:.0} | {:.2} |",
            median(0),
            median(1),
            median(2),
            median(0) / median(2)
        );
    }
}

/// Many-row f16 products (an f16 prefill's on AVX2): the f32 gemm with the f16 weight
/// widened as packed against the dot products of f16 rows (`f16_gemm`), both on the
/// checkpoint's `[n, k]` weight and f16 activations, 3 interleaved rounds, medians.
fn f16_gemm_table() {
    use burn::tensor::f16;
    use vipllava_model::kernels::bf16_gemm::WeightOrder;
    use vipllava_model::kernels::f16_gemm::{f16_dot_available, matmul_f16_dot};
    use vipllava_model::kernels::f32_gemm::matmul_f32_gemm;

    println!();
    println!("f16 dot products (AVX2): {}", f16_dot_available());
    println!("| m x k x n | f32 gemm ms | f16 dot ms | f32 gemm GFLOP/s | f16 dot GFLOP/s | gemm / dot |");
    println!("|---|---|---|---|---|---|");
    // The prefill's products, then the 7B's MLP (the hub checkpoint's own dtype is f16).
    let shapes = PREFILL_PRODUCTS
        .into_iter()
        .chain([(617, 4096, 11008), (617, 11008, 4096)]);
    for (m, k, n) in shapes {
        let (x, w) = prefill_operands(m, k, n);
        let x: Vec<f16> = x.iter().map(|&v| f16::from_f32(v)).collect();
        let file: Vec<f16> = checkpoint_order(&w, k, n)
            .iter()
            .map(|&v| f16::from_f32(v))
            .collect();
        let mut rounds = [[f64::NAN; 2]; 3];
        for round in rounds.iter_mut() {
            round[0] = time(3, || {
                black_box(matmul_f32_gemm(&x, &file, WeightOrder::OutputMajor, m, k, n));
            });
            if f16_dot_available() {
                round[1] = time(3, || {
                    black_box(matmul_f16_dot(&x, &file, m, k, n));
                });
            }
        }
        let median = |c: usize| median_ms(&rounds, c);
        let gflops = |c: usize| 2.0 * (m * k * n) as f64 / median(c) / 1e6;
        println!(
            "| {m} x {k} x {n} | {:.1} | {:.1} | {:.0} | {:.0} | {:.2} |",
            median(0),
            median(1),
            gflops(0),
            gflops(1),
            median(0) / median(1)
        );
    }
}

/// Many-row q8 and q4 products (a prefill's): the packed weight dequantized into the f32
/// gemm's panels against the activations quantized to int8 and the int8 gemm (AMX-INT8, or
/// q4 on AVX2 without VNNI; quantization included, and alone), 3 interleaved rounds,
/// medians. `INT8_GEMM_BITS=8` or `4` picks one width.
fn q4_gemm_table() {
    use vipllava_model::kernels::f32_gemm::matmul_f32_gemm_packed;

    let widths: Vec<(Bits, &str)> = match std::env::var("INT8_GEMM_BITS").as_deref() {
        Ok("8") => vec![(Bits::Eight, "q8")],
        Ok("4") => vec![(Bits::Four, "q4")],
        _ => vec![(Bits::Eight, "q8"), (Bits::Four, "q4")],
    };
    println!();
    println!(
        "| weights | m x k x n | f32 gemm, dequantized in the pack ms | int8 gemm ms (with quantization) | quantization alone ms | f32 / int8 | int8 GFLOP/s |"
    );
    println!("|---|---|---|---|---|---|---|");
    for &(bits, name) in &widths {
        for &(m, k, n) in &PREFILL_PRODUCTS[..6] {
            let (x, _) = prefill_operands(m, k, 0);
            let q: Vec<i8> = (0..k * n)
                .map(|i| match bits {
                    Bits::Four => ((i * 7 + i / 3) % 16) as i8 - 8,
                    Bits::Eight => ((i * 7 + i / 3) % 256) as u8 as i8,
                })
                .collect();
            let scales: Vec<f32> = (0..k * n / 32).map(|i| 0.01 + (i % 5) as f32 * 0.001).collect();
            let scales: Vec<f32> = scales
                .iter()
                .map(|&s| burn::tensor::f16::from_f32(s).to_f32())
                .collect();
            let columns = ColumnBlocks {
                q: &q,
                scales: &scales,
                k,
                n,
                block: 32,
            };
            let w = PackedWeight::pack(&columns, bits).unwrap();
            if !w.int8_gemm_applies() {
                println!(
                    "| {name} | {m} x {k} x {n} | | (the int8 gemm needs AMX-INT8, or AVX2 without VNNI for q4) | | | |"
                );
                continue;
            }
            let mut rounds = [[f64::NAN; 3]; 3];
            for round in rounds.iter_mut() {
                round[0] = time(3, || {
                    black_box(matmul_f32_gemm_packed(&x, &w, m, false));
                });
                round[1] = time(3, || {
                    let xq = Int8Rows::quantize(&x, m, k, 32).unwrap();
                    black_box(w.matmul_int8_gemm(&xq));
                });
                round[2] = time(3, || {
                    black_box(Int8Rows::quantize(&x, m, k, 32));
                });
            }
            let median = |c: usize| median_ms(&rounds, c);
            println!(
                "| {name} | {m} x {k} x {n} | {:.1} | {:.1} | {:.1} | {:.2} | {:.0} |",
                median(0),
                median(1),
                median(2),
                median(0) / median(1),
                2.0 * (m * k * n) as f64 / median(1) / 1e6
            );
        }
    }
}

/// Prefill attention (bf16 queries, keys and values): Burn's (Flex's) attention against
/// [`prefill_attention`] on the 1.1B Llama's causal GQA shape, the CLIP tower's shape and
/// the 7B Llama's, 3 interleaved rounds, medians.
fn prefill_attention_table() {
    use burn::tensor::module::attention;
    use burn::tensor::ops::AttentionModuleOptions;
    use burn::tensor::{DType, Device, Distribution, Tensor};
    use vipllava_model::kernels::attention::prefill_attention;

    let device = Device::flex();
    println!();
    println!("| heads / kv heads x rows x head dim, mask | Flex ms | ours ms | Flex / ours |");
    println!("|---|---|---|---|");
    for (heads, kv_heads, t, d, causal) in [
        (32, 4, 617, 64, true),
        (16, 16, 577, 64, false),
        (32, 32, 641, 128, true),
    ] {
        let random = |h: usize| {
            Tensor::<4>::random([1, h, t, d], Distribution::Normal(0.0, 1.0), &device).cast(DType::BF16)
        };
        let (q, k, v) = (random(heads), random(kv_heads), random(kv_heads));
        let options = AttentionModuleOptions {
            is_causal: causal,
            ..Default::default()
        };
        let mut rounds = [[0f64; 2]; 3];
        for round in rounds.iter_mut() {
            round[0] = time(5, || {
                let y = attention(q.clone(), k.clone(), v.clone(), None, None, options);
                black_box(y.into_data());
            });
            round[1] = time(5, || {
                black_box(prefill_attention(&q, &k, &v, None, &options).unwrap().into_data());
            });
        }
        let median = |c: usize| median_ms(&rounds, c);
        let mask = if causal { "causal" } else { "none" };
        println!(
            "| {heads} / {kv_heads} x {t} x {d}, {mask} | {:.1} | {:.1} | {:.2} |",
            median(0),
            median(1),
            median(0) / median(1)
        );
    }
}

/// The MLP gates of a prefill in f32 and bf16 ([`sigmoid_gated`]): the 1.1B Llama's SiLU
/// times `up` (617 x 5632) and CLIP-L's quick GELU (577 x 4096). Each call starts from a
/// shared tensor, so it includes the copy that the model's fresh product outputs skip.
///
/// [`sigmoid_gated`]: vipllava_model::kernels::sigmoid_gated
fn gate_table() {
    use burn::tensor::{DType, Device, Distribution, Tensor};
    use vipllava_model::kernels::{SigmoidGate, sigmoid_gated};

    let device = Device::flex();
    println!();
    println!("| gate, rows x columns | f32 ms | f32 ns/value | bf16 ms | bf16 ns/value |");
    println!("|---|---|---|---|---|");
    for (gate, rows, cols) in [
        (SigmoidGate::Silu, 617, 5632),
        (SigmoidGate::QuickGelu, 577, 4096),
    ] {
        let x = Tensor::<2>::random([rows, cols], Distribution::Normal(0.0, 2.0), &device);
        let up = Tensor::<2>::random([rows, cols], Distribution::Normal(0.0, 1.0), &device);
        let with_up = matches!(gate, SigmoidGate::Silu);
        let mut rounds = [[0f64; 2]; 5];
        for round in rounds.iter_mut() {
            for (c, dtype) in [DType::F32, DType::BF16].into_iter().enumerate() {
                let (x, up) = (x.clone().cast(dtype), up.clone().cast(dtype));
                round[c] = time(9, || {
                    let y = sigmoid_gated(x.clone(), gate, with_up.then_some(&up)).unwrap();
                    black_box(y);
                });
            }
        }
        let ns = |c: usize| median_ms(&rounds, c) * 1e6 / (rows * cols) as f64;
        println!(
            "| {gate:?}{}, {rows} x {cols} | {:.2} | {:.2} | {:.2} | {:.2} |",
            if with_up { " x up" } else { "" },
            median_ms(&rounds, 0),
            ns(0),
            median_ms(&rounds, 1),
            ns(1)
        );
    }
}

/// Decode attention (one query row) over a bf16 KV cache, 1.1B and 7B head layouts.
fn attention_table() {
    use burn::tensor::ops::AttentionModuleOptions;
    use burn::tensor::{DType, Device, Distribution, Tensor};
    use vipllava_model::kernels::attention::decode_attention;

    let device = Device::flex();
    println!();
    println!("| heads / kv heads x context x head dim | decode attention ms (bf16 cache) |");
    println!("|---|---|");
    for (heads, kv_heads, total, d) in [(32, 4, 750, 64), (32, 32, 641, 128)] {
        let random = |h: usize, t: usize| {
            Tensor::<4>::random([1, h, t, d], Distribution::Normal(0.0, 1.0), &device).cast(DType::BF16)
        };
        let (q, k, v) = (random(heads, 1), random(kv_heads, total), random(kv_heads, total));
        let options = AttentionModuleOptions {
            is_causal: true,
            ..Default::default()
        };
        let ms = time(41, || {
            black_box(decode_attention(&q, &k, &v, None, &options).unwrap());
        });
        println!("| {heads} / {kv_heads} x {total} x {d} | {:.3} |", ms * 1e3);
    }
}

/// Packed q8/q4 products (one row, int8 activations) over a set of weights larger than the
/// caches, as a decode step reads them: the 1.1B Llama's MLP and attention shapes, 22 layers'
/// worth, each weight read once per pass. Prints read rates from memory.
fn packed_memory_table() {
    println!();
    println!("| bits | weights MB | ms per pass | GB/s |");
    println!("|---|---|---|---|");
    let shapes = [
        (2048, 5632),
        (2048, 5632),
        (5632, 2048),
        (2048, 2048),
        (2048, 2048),
    ];
    for bits in [Bits::Four, Bits::Eight] {
        let mut weights = Vec::new();
        for layer in 0..22 {
            for &(k, n) in &shapes {
                let q: Vec<i8> = (0..k * n).map(|i| ((i + layer) % 15) as i8 - 7).collect();
                let scales = vec![1.0f32 / 128.0; k * n / 32];
                let w = ColumnBlocks {
                    q: &q,
                    scales: &scales,
                    k,
                    n,
                    block: 32,
                };
                weights.push(PackedWeight::pack(&w, bits).unwrap());
            }
        }
        let inputs: Vec<Int8Rows> = [2048, 5632]
            .iter()
            .map(|&k| {
                let x: Vec<f32> = (0..k).map(|i| (i % 7) as f32 * 0.1).collect();
                Int8Rows::quantize(&x, 1, k, 32).unwrap()
            })
            .collect();
        let bytes: usize = weights.iter().map(|w| w.resident_bytes()).sum();
        let seconds = time(5, || {
            for w in &weights {
                let x = if w.k() == 2048 { &inputs[0] } else { &inputs[1] };
                black_box(w.matmul_int8(x).unwrap());
            }
        });
        println!(
            "| {} | {:.0} | {:.1} | {:.2} |",
            if bits == Bits::Four { 4 } else { 8 },
            bytes as f64 / 1e6,
            seconds * 1e3,
            bytes as f64 / seconds / 1e9
        );
    }
    // bf16 weights in the checkpoint's `[n, k]` order with bf16 activations, as a bf16
    // decode step reads them.
    let weights: Vec<(usize, usize, Vec<bf16>)> = (0..22)
        .flat_map(|layer| {
            shapes.iter().map(move |&(k, n)| {
                let w = (0..k * n)
                    .map(|i| bf16::from_f32(((i + layer) % 13) as f32 * 0.01 - 0.06))
                    .collect();
                (k, n, w)
            })
        })
        .collect();
    let inputs: Vec<Vec<f32>> = [2048, 5632]
        .iter()
        .map(|&k| {
            (0..k)
                .map(|i| bf16::from_f32((i % 7) as f32 * 0.1).to_f32())
                .collect()
        })
        .collect();
    let bytes: usize = weights.iter().map(|(_, _, w)| 2 * w.len()).sum();
    let seconds = time(5, || {
        for (k, n, w) in &weights {
            let x = if *k == 2048 { &inputs[0] } else { &inputs[1] };
            black_box(vipllava_model::kernels::rows::matmul_rows_bf16(x, w, 1, *k, *n));
        }
    });
    println!(
        "| bf16 [n,k], bf16 x | {:.0} | {:.1} | {:.2} |",
        bytes as f64 / 1e6,
        seconds * 1e3,
        bytes as f64 / seconds / 1e9
    );
}
