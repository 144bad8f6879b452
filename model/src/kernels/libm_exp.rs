//! The single-precision exponential of glibc (`expf`) as a loop the compiler vectorizes, for
//! the f32 gates that keep the bits of Burn's ops ([`super::sigmoid_gated`]): Burn's `exp`
//! calls the platform's `expf` one value at a time, 3 of every 100 samples of an f32 prefill.
//!
//! glibc (since 2.27, from Arm's optimized-routines; musl took the same code) computes
//! `exp(x) = 2^(k/32) * 2^(r/32)` in double precision: `k` the nearest integer to
//! `32 x / ln 2`, the 32 powers `2^(i/32)` from a table, a cubic for the rest, one rounding to
//! f32 at the end. Every step is an IEEE operation on doubles, so the same steps here give the
//! same bits, provided they are the same steps: glibc's x86-64 build picks a variant compiled
//! with fused multiply-adds on CPUs with FMA and AVX2, and the compiler fused both uses of
//! `32 x / ln 2` as well as the cubic's three multiply-adds (read from its machine code). That
//! variant is the one reproduced here. Its bits differ from the variant without FMA at only two
//! f32 arguments of the main path; [`matches_std`] checks at run time that the platform's `expf`
//! agrees on a spread of arguments and on those two, and the callers keep `f32::exp` otherwise.

/// `32 / ln 2`, rounded to double.
const INV_LN2_N: f64 = f64::from_bits(0x4047_1547_652b_82fe);
/// `1.5 * 2^52`: added to a double below `2^51` in magnitude, it leaves the nearest integer
/// (ties to even) in the low bits of the sum.
const SHIFT: f64 = f64::from_bits(0x4338_0000_0000_0000);
/// The cubic's coefficients for `2^(r/32)` (scaled by powers of 32).
const C0: f64 = f64::from_bits(0x3ebc_6af8_4b91_2394);
const C1: f64 = f64::from_bits(0x3f2e_bfce_50fa_c4f3);
const C2: f64 = f64::from_bits(0x3f96_2e42_ff0c_52d6);

/// The bits of `2^(i/32)` less `i << 47`: adding `k << 47` for an integer `k` with `k % 32 ==
/// i` scales the value by `2^(k/32 - i/32)`, a power of two, through the exponent field.
const POWERS: [u64; 32] = [
    0x3ff0000000000000,
    0x3fefd9b0d3158574,
    0x3fefb5586cf9890f,
    0x3fef9301d0125b51,
    0x3fef72b83c7d517b,
    0x3fef54873168b9aa,
    0x3fef387a6e756238,
    0x3fef1e9df51fdee1,
    0x3fef06fe0a31b715,
    0x3feef1a7373aa9cb,
    0x3feedea64c123422,
    0x3feece086061892d,
    0x3feebfdad5362a27,
    0x3feeb42b569d4f82,
    0x3feeab07dd485429,
    0x3feea47eb03a5585,
    0x3feea09e667f3bcd,
    0x3fee9f75e8ec5f74,
    0x3feea11473eb0187,
    0x3feea589994cce13,
    0x3feeace5422aa0db,
    0x3feeb737b0cdc5e5,
    0x3feec49182a3f090,
    0x3feed503b23e255d,
    0x3feee89f995ad3ad,
    0x3feeff76f2fb5e47,
    0x3fef199bdd85529c,
    0x3fef3720dcef9069,
    0x3fef5818dcfba487,
    0x3fef7c97337b9b5f,
    0x3fefa4afa2a490da,
    0x3fefd0765b6e4540,
];

/// The arguments from here to [`MAIN_PATH_TO`] are the ones [`exp_into`] computes itself: glibc
/// takes its main path for them (at exactly -88 and 88 after its checks for overflow,
/// underflow, infinities and NaN). Its main path goes on down to about -103.97 and up to 88.72;
/// those rare arguments, and the rest, go to `f32::exp`.
const MAIN_PATH_FROM: f32 = -88.0;
/// See [`MAIN_PATH_FROM`].
const MAIN_PATH_TO: f32 = 88.0;

/// The two f32 arguments in `[-88, 88]` where glibc's variants with and without FMA round to
/// different results (found by comparing the two over every f32 of the range): -63.09946 and
/// 32.56463. The run-time check includes them, so that it tells the variant reproduced here
/// from the other (which glibc runs on CPUs without FMA or AVX2, or when told to by
/// `GLIBC_TUNABLES`, while Rust's feature detection still reports both).
const VARIANTS_DIFFER_AT: [u32; 2] = [0xc27c_65d9, 0x4202_422f];

/// Whether [`exp_into`] computes `expf(x)` itself.
#[inline(always)]
fn on_main_path(x: f32) -> bool {
    (MAIN_PATH_FROM..=MAIN_PATH_TO).contains(&x)
}

/// glibc's `expf` of `x` on its main path ([`on_main_path`]; other arguments give other
/// values than `expf`'s). Inlined into loops that the compiler vectorizes.
#[inline(always)]
fn main_path(x: f32) -> f32 {
    let xd = f64::from(x);
    let kd = INV_LN2_N.mul_add(xd, SHIFT);
    let ki = kd.to_bits();
    let kd = kd - SHIFT;
    let r = INV_LN2_N.mul_add(xd, -kd);
    let scale = f64::from_bits(POWERS[(ki % 32) as usize].wrapping_add(ki << 47));
    let z = r.mul_add(C0, C1);
    let r2 = r * r;
    let y = r.mul_add(C2, 1.0);
    (z.mul_add(r2, y) * scale) as f32
}

/// `out[i] = expf(x[i])` with the bits of glibc's FMA variant: the main path for every value
/// in one vectorizable loop, then `f32::exp` for the rare arguments off it (beyond 88 in
/// magnitude, NaN; none at all in most calls). Fast where compiled with FMA (inside a
/// [`super::Vectorized`] task's `run`); the same bits as `f32::exp` where [`matches_std`].
#[inline(always)]
pub(super) fn exp_into(x: &[f32], out: &mut [f32]) {
    assert_eq!(x.len(), out.len());
    for (o, &v) in out.iter_mut().zip(x) {
        *o = main_path(v.clamp(MAIN_PATH_FROM, MAIN_PATH_TO));
    }
    let off_path = x.iter().fold(false, |any, &v| any | !on_main_path(v));
    if off_path {
        for (o, &v) in out.iter_mut().zip(x) {
            if !on_main_path(v) {
                *o = v.exp();
            }
        }
    }
}

/// [`exp_into`] as [`super::Vectorized`] work.
struct ExpInto<'a>(&'a [f32], &'a mut [f32]);

impl super::Vectorized for ExpInto<'_> {
    type Output = ();

    #[inline(always)]
    fn run(self) {
        exp_into(self.0, self.1)
    }
}

/// [`exp_into`] compiled for the best vector extension the CPU has ([`super::vectorized`],
/// with FMA).
fn exp_vectorized(x: &[f32], out: &mut [f32]) {
    super::vectorized(ExpInto(x, out))
}

/// Whether [`exp_into`] gives the bits of `f32::exp` on this machine: on Linux with glibc
/// and a CPU with FMA and AVX2 (where glibc picks the variant reproduced here), checked once
/// against `f32::exp` on [`check_arguments`] (65540 arguments over every binade of the main
/// path, and the two where glibc's variants differ). `false` elsewhere (another C library, or
/// glibc's variant without FMA), where the callers keep `f32::exp`.
pub(super) fn matches_std() -> bool {
    static MATCHES: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *MATCHES.get_or_init(|| {
        #[cfg(all(target_arch = "x86_64", target_os = "linux", target_env = "gnu"))]
        {
            use std::arch::is_x86_feature_detected as has;
            has!("fma") && has!("avx2") && agrees_with_std(&check_arguments(), exp_vectorized)
        }
        #[cfg(not(all(target_arch = "x86_64", target_os = "linux", target_env = "gnu")))]
        {
            false
        }
    })
}

/// The arguments of the run-time check: 32768 magnitudes whose bits step evenly from zero up
/// to 88, each with both signs (every binade of the main path), the bounds 88 and -88, and
/// [`VARIANTS_DIFFER_AT`].
fn check_arguments() -> Vec<f32> {
    const HALF: u64 = 1 << 15;
    let top = u64::from(88f32.to_bits());
    let magnitudes = (0..HALF).map(|i| f32::from_bits((i * top / HALF) as u32));
    let special = [88.0, -88.0]
        .into_iter()
        .chain(VARIANTS_DIFFER_AT.map(f32::from_bits));
    magnitudes.flat_map(|v| [v, -v]).chain(special).collect()
}

/// Whether `exp` (arguments, results) and `f32::exp` agree bit for bit on every value of `x`.
fn agrees_with_std(x: &[f32], mut exp: impl FnMut(&[f32], &mut [f32])) -> bool {
    let mut got = vec![0f32; x.len()];
    exp(x, &mut got);
    got.iter()
        .zip(x)
        .all(|(g, &v)| g.to_bits() == std::hint::black_box(v).exp().to_bits())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// [`exp_into`] compiled for `level` (plain Rust, where `mul_add` is a call into software;
    /// AVX2 + FMA; AVX-512 + FMA, which [`matches_std`] checks); whether the CPU has it.
    fn exp_at(level: super::super::Simd, x: &[f32], out: &mut [f32]) -> bool {
        use super::super::Simd;
        #[cfg(target_arch = "x86_64")]
        use std::arch::is_x86_feature_detected as has;
        match level {
            Simd::Plain => exp_into(x, out),
            #[cfg(target_arch = "x86_64")]
            Simd::Avx2 if has!("avx2") && has!("fma") => {
                // SAFETY: the CPU has AVX2 and FMA (the guard).
                unsafe { super::super::run_avx2(ExpInto(x, out)) }
            }
            #[cfg(target_arch = "x86_64")]
            Simd::Avx512 if has!("avx512f") && has!("avx512bw") && has!("fma") => {
                // SAFETY: the CPU has AVX-512 F and BW and FMA (the guard).
                unsafe { super::super::run_avx512(ExpInto(x, out)) }
            }
            _ => return false,
        }
        true
    }

    /// `f` on every value, as the slice function that [`agrees_with_std`] takes.
    fn each(f: impl Fn(f32) -> f32) -> impl FnMut(&[f32], &mut [f32]) {
        move |x, out| {
            for (o, &v) in out.iter_mut().zip(x) {
                *o = f(v);
            }
        }
    }

    /// On the machines the project's CI runs (Linux, glibc, x86-64 with FMA and AVX2), the
    /// loop has the bits of `f32::exp` at every instruction level the CPU has, on every 61st
    /// f32 from -88 to 88 (about 37 million arguments, every binade of both signs; every
    /// 613th for plain Rust, whose `mul_add` is a call) and off the main path; elsewhere the
    /// callers keep `f32::exp`, which this checks too.
    #[test]
    fn exp_into_has_the_bits_of_the_platform_expf() {
        use super::super::Simd;
        if !matches_std() {
            #[cfg(all(target_arch = "x86_64", target_os = "linux", target_env = "gnu"))]
            assert!(
                !(std::arch::is_x86_feature_detected!("fma") && std::arch::is_x86_feature_detected!("avx2")),
                "glibc on an FMA and AVX2 CPU should run the reproduced variant"
            );
            return;
        }
        let top = 88f32.to_bits();
        let off_path = [
            -88.000_01,
            -100.0,
            -103.5,
            -104.0,
            -1e30,
            f32::MIN,
            f32::NEG_INFINITY,
            f32::NAN,
            88.000_01,
            88.5,
            89.0,
            f32::INFINITY,
        ];
        // Magnitudes per chunk (each with both signs).
        const CHUNK: u32 = 1 << 19;
        for level in [Simd::Plain, Simd::Avx2, Simd::Avx512] {
            let step = if level == Simd::Plain { 613 } else { 61 };
            let mut ran = true;
            let mut first = 0u32;
            while ran && first <= top {
                let chunk: Vec<f32> = (0..CHUNK)
                    .map(|i| first.saturating_add(i * step))
                    .take_while(|&bits| bits <= top)
                    .map(f32::from_bits)
                    .flat_map(|v| [v, -v])
                    .collect();
                let agrees = agrees_with_std(&chunk, |x, out| ran = exp_at(level, x, out));
                assert!(
                    agrees || !ran,
                    "{level:?}: a value between {} and {}",
                    chunk[0],
                    chunk[chunk.len() - 1]
                );
                first = first.saturating_add(CHUNK * step);
            }
            if !ran {
                eprintln!("{level:?}: not on this CPU, skipped");
                continue;
            }
            let mut got = [0f32; 12];
            assert!(exp_at(level, &off_path, &mut got));
            for (g, v) in got.iter().zip(off_path) {
                // Through `black_box`: LLVM folds the exponential of a constant with its own
                // arithmetic, which is not glibc's.
                let want = std::hint::black_box(v).exp();
                assert!(
                    g.to_bits() == want.to_bits() || g.is_nan() && want.is_nan(),
                    "{level:?} {v}: {g} vs {want}"
                );
            }
        }
    }

    /// The run-time check tells glibc's exponential from a near one: the correctly rounded
    /// exponential of the f64 argument, rounded to f32 (what a C library that rounds
    /// correctly would give, but for rare double roundings), differs from glibc's at some of
    /// the check's 65540 arguments (8 here), so [`matches_std`] would keep `f32::exp` on such
    /// a platform.
    #[test]
    fn the_check_tells_a_correctly_rounded_exp_apart() {
        if !matches_std() {
            return;
        }
        let rounded_once = each(|v| f64::from(v).exp() as f32);
        assert!(!agrees_with_std(&check_arguments(), rounded_once));
    }

    /// The same steps without fused multiply-adds (glibc's variant for CPUs without FMA)
    /// differ from the platform's `expf` exactly at [`VARIANTS_DIFFER_AT`] (which the
    /// run-time check therefore includes), and agree with it on the rest of the check's
    /// arguments. These two values pin the fused remainder `r`: unfused there, the tests fail;
    /// unfusing `kd` or the cubic instead changes no result among the tests' arguments.
    #[test]
    fn the_check_tells_glibcs_variant_without_fma_apart() {
        if !matches_std() {
            return;
        }
        let unfused = |v: f32| {
            let xd = f64::from(v);
            let z = INV_LN2_N * xd;
            let kd = z + SHIFT;
            let ki = kd.to_bits();
            let kd = kd - SHIFT;
            let r = z - kd;
            let scale = f64::from_bits(POWERS[(ki % 32) as usize].wrapping_add(ki << 47));
            let y = (r * C0 + C1) * (r * r) + (r * C2 + 1.0);
            (y * scale) as f32
        };
        let arguments = check_arguments();
        let (spread, differ) = arguments.split_at(arguments.len() - VARIANTS_DIFFER_AT.len());
        assert!(agrees_with_std(spread, each(unfused)));
        for &v in differ {
            assert!(!agrees_with_std(&[v], each(unfused)), "{v}");
        }
    }
}
