//! The contour band of a mask image: an exact Euclidean distance transform
//! (Felzenszwalb & Huttenlocher), which no path rasteriser offers.

use image::GrayImage;

use super::MASK_THRESHOLD;

/// Coverage of the band of the mask region (pixels above the threshold) within `lw` pixels
/// of its outside, from an exact Euclidean distance transform (the image border counts as
/// outside); the inner edge of the band is anti-aliased.
pub(super) fn contour_band(mask: &GrayImage, lw: f32) -> Vec<u8> {
    let (w, h) = (mask.width() as usize, mask.height() as usize);
    let d2 = outside_distance_sq(mask);
    let mut out = vec![0u8; w * h];
    for (o, (&v, &d)) in out.iter_mut().zip(mask.as_raw().iter().zip(d2.iter())) {
        if v > MASK_THRESHOLD {
            // Boundary pixels have distance 1: full coverage up to `lw`, fading over a pixel.
            let c = (lw + 1.0 - (d as f32).sqrt()).clamp(0.0, 1.0);
            *o = (c * 255.0).round() as u8;
        }
    }
    out
}

/// Squared Euclidean distance from each pixel to the nearest pixel outside the mask region,
/// with a one-pixel outside frame around the image (Felzenszwalb & Huttenlocher).
fn outside_distance_sq(mask: &GrayImage) -> Vec<f64> {
    let (w, h) = (mask.width() as usize, mask.height() as usize);
    let (pw, ph) = (w + 2, h + 2);
    let inf = 1e20;
    let mut g = vec![0.0f64; pw * ph];
    for y in 0..h {
        for x in 0..w {
            if mask.as_raw()[y * w + x] > MASK_THRESHOLD {
                g[(y + 1) * pw + x + 1] = inf;
            }
        }
    }
    let mut f = vec![0.0; pw.max(ph)];
    let mut d = vec![0.0; pw.max(ph)];
    for x in 0..pw {
        for y in 0..ph {
            f[y] = g[y * pw + x];
        }
        edt_1d(&f[..ph], &mut d[..ph]);
        for y in 0..ph {
            g[y * pw + x] = d[y];
        }
    }
    for y in 0..ph {
        f[..pw].copy_from_slice(&g[y * pw..(y + 1) * pw]);
        edt_1d(&f[..pw], &mut d[..pw]);
        g[y * pw..(y + 1) * pw].copy_from_slice(&d[..pw]);
    }
    let mut out = Vec::with_capacity(w * h);
    for y in 0..h {
        out.extend_from_slice(&g[(y + 1) * pw + 1..(y + 1) * pw + 1 + w]);
    }
    out
}

/// 1-D squared distance transform of sampled function `f` (lower envelope of parabolas).
fn edt_1d(f: &[f64], d: &mut [f64]) {
    let n = f.len();
    if n == 0 {
        return;
    }
    let mut v = vec![0usize; n];
    let mut z = vec![0.0f64; n + 1];
    let mut k = 0usize;
    z[0] = f64::NEG_INFINITY;
    z[1] = f64::INFINITY;
    let sq = |q: usize| (q * q) as f64;
    for q in 1..n {
        loop {
            let p = v[k];
            let s = ((f[q] + sq(q)) - (f[p] + sq(p))) / (2.0 * (q as f64 - p as f64));
            if s <= z[k] && k > 0 {
                k -= 1;
            } else {
                k += 1;
                v[k] = q;
                z[k] = s;
                z[k + 1] = f64::INFINITY;
                break;
            }
        }
    }
    k = 0;
    for (q, dq) in d.iter_mut().enumerate() {
        while z[k + 1] < q as f64 {
            k += 1;
        }
        let p = v[k];
        let diff = q as f64 - p as f64;
        *dq = diff * diff + f[p];
    }
}
