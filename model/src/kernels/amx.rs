//! Intel AMX tiles for the bf16 gemm ([`super::bf16_gemm`]), the bf16 prefill attention
//! ([`super::attention`]), the bf16 and f16 decode products of a batch ([`super::rows`]) and
//! its q8/q4 ones with int8 activations ([`Int8Tiles`], [`super::packed`]): one `tdpbf16ps`
//! multiplies a
//! 16 x 32 bf16 block by a 32 x 16 one into 16 x 16 f32 sums, 16 times the work of a
//! `vdpbf16ps`. Sapphire Rapids and later Xeons have them; PyTorch's CPU bf16 gemm (oneDNN)
//! uses them, so without them a bf16 prefill cannot keep up there.
//!
//! Stable Rust has no AMX intrinsics yet, so the few instructions are inline assembly on the
//! eight tile registers, which the compiler never allocates. Linux hands out the tile state
//! only to a process that asks for it (`arch_prctl(ARCH_REQ_XCOMP_PERM)`), once.

/// Sixteen `prefetcht0` of the lines 2048..3072 bytes past the operand register `$r`: one
/// tile two steps ahead of the block loop, spread over its products.
#[rustfmt::skip]
macro_rules! pf16 {
    ($r:literal) => {
        concat!(
            "prefetcht0 [{", $r, "} + 2048]\n", "prefetcht0 [{", $r, "} + 2112]\n",
            "prefetcht0 [{", $r, "} + 2176]\n", "prefetcht0 [{", $r, "} + 2240]\n",
            "prefetcht0 [{", $r, "} + 2304]\n", "prefetcht0 [{", $r, "} + 2368]\n",
            "prefetcht0 [{", $r, "} + 2432]\n", "prefetcht0 [{", $r, "} + 2496]\n",
            "prefetcht0 [{", $r, "} + 2560]\n", "prefetcht0 [{", $r, "} + 2624]\n",
            "prefetcht0 [{", $r, "} + 2688]\n", "prefetcht0 [{", $r, "} + 2752]\n",
            "prefetcht0 [{", $r, "} + 2816]\n", "prefetcht0 [{", $r, "} + 2880]\n",
            "prefetcht0 [{", $r, "} + 2944]\n", "prefetcht0 [{", $r, "} + 3008]\n",
        )
    };
}

/// Bytes of one tile row: 16 f32 sums, or 16 bf16 pairs.
pub const ROW_BYTES: usize = 64;
/// Rows of one tile.
pub const TILE_ROWS: usize = 16;

/// Whether this CPU has AMX-TILE and AMX-BF16 and the kernel let this process use them
/// (checked once; off with `VIPLLAVA_AMX=0`, which keeps the `vdpbf16ps` gemm).
pub fn amx_bf16_available() -> bool {
    static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVAILABLE.get_or_init(|| amx_usable(AMX_BF16))
}

/// Whether this CPU has AMX-TILE and AMX-INT8 and the kernel let this process use them
/// (checked once; off with `VIPLLAVA_AMX=0` as well, which keeps the VNNI decode products).
pub fn amx_int8_available() -> bool {
    static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVAILABLE.get_or_init(|| amx_usable(AMX_INT8))
}

/// Whether `VIPLLAVA_AMX` allows the tiles, the CPU has AMX-TILE and `feature`, and Linux
/// gave this process the tile state.
fn amx_usable(feature: u32) -> bool {
    std::env::var("VIPLLAVA_AMX").map_or(true, |v| v != "0") && cpu_has_amx(feature) && request_tile_state()
}

/// CPUID leaf 7, sub-leaf 0, EDX bits: AMX-BF16, AMX-TILE, AMX-INT8.
const AMX_BF16: u32 = 1 << 22;
#[cfg(target_arch = "x86_64")]
const AMX_TILE: u32 = 1 << 24;
const AMX_INT8: u32 = 1 << 25;

/// Whether the CPU reports AMX-TILE and the `feature` bit of CPUID leaf 7's EDX.
#[cfg(target_arch = "x86_64")]
fn cpu_has_amx(feature: u32) -> bool {
    use std::arch::x86_64::{__cpuid, __cpuid_count};
    #[allow(unused_unsafe)]
    // SAFETY: CPUID exists on every x86_64 CPU; leaf 7 is read only when leaf 0 reports it.
    let edx = unsafe {
        if __cpuid(0).eax < 7 {
            return false;
        }
        __cpuid_count(7, 0).edx
    };
    edx & feature != 0 && edx & AMX_TILE != 0
}

#[cfg(not(target_arch = "x86_64"))]
fn cpu_has_amx(_feature: u32) -> bool {
    false
}

/// Asks Linux for the tile data state (XTILEDATA, feature 18) for this process.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn request_tile_state() -> bool {
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: arch_prctl with these arguments only changes which state this process may use.
    unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 }
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn request_tile_state() -> bool {
    false
}

/// Which configuration the calling thread's tiles hold, so that [`Tiles`] and [`Int8Tiles`]
/// never live on one thread at once (each one's methods assume its own configuration, and
/// each one's drop releases the tiles).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Configured {
    /// No tiles of this module live on the thread.
    Released,
    /// A [`Tiles`] lives.
    Full,
    /// An [`Int8Tiles`] lives.
    Int8,
}

thread_local! {
    static CONFIGURED: std::cell::Cell<Configured> = const { std::cell::Cell::new(Configured::Released) };
}

/// The tile configuration every kernel here but [`Int8Tiles`] uses: palette 1, all eight
/// tiles 16 rows of 64 bytes. In [`Tiles::block`] tiles 0-3 hold a 32 x 32 block of sums,
/// 4-5 two 16-row blocks of activations, 6-7 two 16-column blocks of weight pairs; the
/// attention kernels
/// ([`Tiles::scores16x64`], [`Tiles::values16x64`]) give 0-3 (or 0) to sums, 4-5 to
/// queries or probabilities, 5-7 to keys or values; the decode products give 0-1 to sums,
/// 4-5 ([`Tiles::weight_rows16`]) or 2-4 ([`Tiles::f16_block32`]) to weight rows, 6-7 or
/// 5-7 to activations. [`Int8Tiles`] loads a configuration of its own.
#[repr(C, align(64))]
struct TileConfig([u8; 64]);

impl TileConfig {
    const fn full() -> Self {
        let mut bytes = [0u8; 64];
        bytes[0] = 1;
        let mut t = 0;
        while t < 8 {
            bytes[16 + 2 * t] = ROW_BYTES as u8;
            bytes[48 + t] = TILE_ROWS as u8;
            t += 1;
        }
        Self(bytes)
    }
}

static CONFIG: TileConfig = TileConfig::full();

/// The tile registers of the calling thread, configured for the kernels here while it lives
/// and released when dropped.
pub struct Tiles(std::marker::PhantomData<*const ()>);

impl Tiles {
    /// Loads the configuration; `None` where [`amx_bf16_available`] is false, or while an
    /// [`Int8Tiles`] lives on this thread (its configuration is another).
    pub fn new() -> Option<Self> {
        if !amx_bf16_available() || CONFIGURED.with(|c| c.get()) == Configured::Int8 {
            return None;
        }
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU has AMX-TILE and the process holds the tile state (checked
        // above); the configuration is 64 valid bytes.
        unsafe {
            std::arch::asm!("ldtilecfg [{}]", in(reg) CONFIG.0.as_ptr(), options(nostack, readonly));
        }
        CONFIGURED.with(|c| c.set(Configured::Full));
        Some(Self(std::marker::PhantomData))
    }

    /// `c += a . b` for a 32 x 32 block of f32 sums over `steps` groups of 16 pairs. Each
    /// operand tile is 1 KB in a row (16 rows of 64 bytes), group `s` at byte `1024 s`:
    /// `a[0]`/`a[1]` the two 16-row blocks of activation pairs, `b[0]`/`b[1]` the two
    /// 16-column blocks of weight pairs (row `p`: pair `p` of 16 columns). The sums start
    /// from the 32 rows of 32 f32 at `from` (`(address, bytes between rows)`), or from zero
    /// where `from` is `None`, and end in the 32 rows at `to`, which may be `from` itself
    /// (then uninitialized memory is fine without `from`). The loop asks for the operand
    /// lines two steps (2 KB) ahead: the hardware prefetcher alone left the tile loads
    /// waiting on L2.
    ///
    /// # Safety
    /// Each of `a` and `b` must hold `1024 steps` bytes, `from` and `to` 32 rows of 128
    /// bytes at their strides that no one else writes (`to`: uses) meanwhile.
    pub unsafe fn block(
        &self,
        a: [*const u8; 2],
        b: [*const u8; 2],
        from: Option<(*const u8, usize)>,
        to: (*mut u8, usize),
        steps: usize,
    ) {
        #[cfg(not(target_arch = "x86_64"))]
        unreachable!("no tiles outside x86_64 ({a:?} {b:?} {from:?} {to:?} {steps})");
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the tiles were configured by `new` on this thread (`Tiles` is neither
        // Send nor Sync); the reads and writes stay inside the bounds above. The three
        // blocks of assembly share the tile registers, which no compiled code touches.
        unsafe {
            sums_from(from, true);
            if steps > 0 {
                std::arch::asm!(
                    "2:",
                    "tileloadd tmm4, [{a0} + {row}*1]",
                    "tileloadd tmm6, [{b0} + {row}*1]",
                    "tileloadd tmm5, [{a1} + {row}*1]",
                    "tileloadd tmm7, [{b1} + {row}*1]",
                    "tdpbf16ps tmm0, tmm4, tmm6",
                    pf16!("b0"),
                    "tdpbf16ps tmm1, tmm4, tmm7",
                    pf16!("b1"),
                    "tdpbf16ps tmm2, tmm5, tmm6",
                    pf16!("a0"),
                    "tdpbf16ps tmm3, tmm5, tmm7",
                    pf16!("a1"),
                    "add {a0}, 1024",
                    "add {a1}, 1024",
                    "add {b0}, 1024",
                    "add {b1}, 1024",
                    "dec {steps}",
                    "jnz 2b",
                    a0 = inout(reg) a[0] => _,
                    a1 = inout(reg) a[1] => _,
                    b0 = inout(reg) b[0] => _,
                    b1 = inout(reg) b[1] => _,
                    row = in(reg) ROW_BYTES,
                    steps = inout(reg) steps => _,
                    options(nostack, readonly),
                );
            }
            sums_to(to, true);
        }
    }

    /// [`Tiles::block`] for a 16 x 32 block: one 16-row tile of activations (`a`) against
    /// the two weight tiles, two tiles of sums, the first 16 of the 32 rows at `from` and
    /// `to`. For the last rows of a product that end in the first half of a 32-row block
    /// (577 = 18 x 32 + 1 in CLIP-L, 617 = 19 x 32 + 9 in the 1.1B prefill): half the work of
    /// a whole block, most of which was zero rows.
    ///
    /// # Safety
    /// As [`Tiles::block`], with 16 rows of 128 bytes at `from` and `to`.
    pub unsafe fn block16(
        &self,
        a: *const u8,
        b: [*const u8; 2],
        from: Option<(*const u8, usize)>,
        to: (*mut u8, usize),
        steps: usize,
    ) {
        #[cfg(not(target_arch = "x86_64"))]
        unreachable!("no tiles outside x86_64 ({a:?} {b:?} {from:?} {to:?} {steps})");
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as in `block`: the tiles were configured on this thread, the reads and
        // writes stay inside the bounds above, and only these blocks touch the tiles.
        unsafe {
            sums_from(from, false);
            if steps > 0 {
                std::arch::asm!(
                    "2:",
                    "tileloadd tmm4, [{a0} + {row}*1]",
                    "tileloadd tmm6, [{b0} + {row}*1]",
                    "tileloadd tmm7, [{b1} + {row}*1]",
                    "tdpbf16ps tmm0, tmm4, tmm6",
                    pf16!("b0"),
                    "tdpbf16ps tmm1, tmm4, tmm7",
                    pf16!("b1"),
                    pf16!("a0"),
                    "add {a0}, 1024",
                    "add {b0}, 1024",
                    "add {b1}, 1024",
                    "dec {steps}",
                    "jnz 2b",
                    a0 = inout(reg) a => _,
                    b0 = inout(reg) b[0] => _,
                    b1 = inout(reg) b[1] => _,
                    row = in(reg) ROW_BYTES,
                    steps = inout(reg) steps => _,
                    options(nostack, readonly),
                );
            }
            sums_to(to, false);
        }
    }

    /// Sums of 16 weight rows against up to 16 activation rows, for the decode products of a
    /// batch ([`super::rows`]): `sums[j][r] = w_j . x_r` over `groups` groups of 32 values.
    /// The weight rows are the checkpoint's `[n, k]` rows, read where they lie: row `j`'s
    /// group `g` is the 64 bytes at `w + j w_stride + 64 g`, so 16 rows form one tile.
    /// `x` holds one 1 KB tile of activation pairs per group (row `p`: values `2p, 2p + 1`
    /// of the 16 activation rows, as pairs), group `g` at `1024 g`. Even and odd groups go
    /// to two tiles of sums (one chain would wait on itself), stored to `sums[0]` and
    /// `sums[1]` (16 rows of 16 f32: weight row by activation row); the caller adds them.
    ///
    /// Each weight row is a stream of its own; the loop asks for each row's lines
    /// `prefetch` bytes ahead (hints only, which may point past the weight).
    ///
    /// # Safety
    /// `w` must hold 16 rows of `64 groups` bytes at stride `w_stride`, `x` `1024 groups`
    /// bytes.
    pub unsafe fn weight_rows16(
        &self,
        w: *const u8,
        w_stride: usize,
        x: *const u8,
        groups: usize,
        prefetch: usize,
        sums: &mut [[f32; 256]; 2],
    ) {
        #[cfg(not(target_arch = "x86_64"))]
        unreachable!("no tiles outside x86_64 ({w:?} {w_stride} {x:?} {groups} {prefetch} {sums:?})");
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the tiles were configured by `new` on this thread; the reads stay inside
        // the bounds above (the prefetches are hints, which never fault); the stores write
        // `sums`, 2 x 1 KB. The blocks of assembly share the tile registers, which no
        // compiled code touches.
        unsafe {
            use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
            let ahead = |g: usize| {
                for j in 0..TILE_ROWS {
                    let line = w.wrapping_add(j * w_stride + 64 * g + prefetch).cast::<i8>();
                    _mm_prefetch::<_MM_HINT_T0>(line);
                    _mm_prefetch::<_MM_HINT_T0>(line.wrapping_add(64));
                }
            };
            std::arch::asm!("tilezero tmm0", "tilezero tmm1", options(nostack, nomem));
            let mut g = 0;
            while g + 2 <= groups {
                ahead(g);
                std::arch::asm!(
                    "tileloadd tmm4, [{w} + {ws}*1]",
                    "tileloadd tmm6, [{x} + {row}*1]",
                    "tdpbf16ps tmm0, tmm4, tmm6",
                    "tileloadd tmm5, [{w} + {ws}*1 + 64]",
                    "tileloadd tmm7, [{x} + {row}*1 + 1024]",
                    "tdpbf16ps tmm1, tmm5, tmm7",
                    w = in(reg) w.add(64 * g),
                    ws = in(reg) w_stride,
                    x = in(reg) x.add(1024 * g),
                    row = in(reg) ROW_BYTES,
                    options(nostack, readonly),
                );
                g += 2;
            }
            if g < groups {
                std::arch::asm!(
                    "tileloadd tmm4, [{w} + {ws}*1]",
                    "tileloadd tmm6, [{x} + {row}*1]",
                    "tdpbf16ps tmm0, tmm4, tmm6",
                    w = in(reg) w.add(64 * g),
                    ws = in(reg) w_stride,
                    x = in(reg) x.add(1024 * g),
                    row = in(reg) ROW_BYTES,
                    options(nostack, readonly),
                );
            }
            std::arch::asm!(
                "tilestored [{even} + {row}*1], tmm0",
                "tilestored [{odd} + {row}*1], tmm1",
                even = in(reg) sums[0].as_mut_ptr(),
                odd = in(reg) sums[1].as_mut_ptr(),
                row = in(reg) ROW_BYTES,
                options(nostack),
            );
        }
    }

    /// Zeroes the two tiles of sums of [`Tiles::f16_block32`] and [`Tiles::f16_block16`].
    ///
    /// # Safety
    /// No other `Tiles` of this thread may have been dropped since this one was made (its
    /// `tilerelease` clears the configuration, and the instruction would then fault), as for
    /// every method here.
    pub unsafe fn f16_sums_zero(&self) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the tiles were configured by `new` on this thread (and are still, the
        // caller's promise); no memory is touched.
        unsafe {
            std::arch::asm!("tilezero tmm0", "tilezero tmm1", options(nostack, nomem));
        }
    }

    /// One block of 32 inputs of an f16 decode product split into bf16 halves
    /// ([`super::rows::matmul_rows_f16`]) for 32 weight rows: `sums[h] += a[3h + g] . b[g]`
    /// over the block's three groups `g` of 16 pairs, for the two halves `h` of the weight
    /// rows (tiles 0 and 1: 16 weight rows by 16 activation rows each), zeroed by
    /// [`Tiles::f16_sums_zero`] and stored by [`Tiles::f16_sums_store`]. `a` holds six 1 KB
    /// tiles of weight pairs (row `j`: weight row `j` of the half), `b` three 1 KB tiles of
    /// activation pairs (row `p`: pair `p` of the 16 activation rows), loaded once for both
    /// halves: the activations come from L2, and with a pass per 16 weight rows their
    /// traffic was three times the weight's.
    ///
    /// # Safety
    /// `a` must hold 6 KB and `b` 3 KB.
    pub unsafe fn f16_block32(&self, a: *const u8, b: *const u8) {
        #[cfg(not(target_arch = "x86_64"))]
        unreachable!("no tiles outside x86_64 ({a:?} {b:?})");
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the tiles were configured by `new` on this thread; the reads stay inside
        // the bounds above; only these blocks of assembly touch the tile registers.
        unsafe {
            std::arch::asm!(
                "tileloadd tmm5, [{b} + {row}*1]",
                "tileloadd tmm2, [{a} + {row}*1]",
                "tdpbf16ps tmm0, tmm2, tmm5",
                "tileloadd tmm3, [{a} + {row}*1 + 3072]",
                "tdpbf16ps tmm1, tmm3, tmm5",
                "tileloadd tmm6, [{b} + {row}*1 + 1024]",
                "tileloadd tmm4, [{a} + {row}*1 + 1024]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tileloadd tmm2, [{a} + {row}*1 + 4096]",
                "tdpbf16ps tmm1, tmm2, tmm6",
                "tileloadd tmm7, [{b} + {row}*1 + 2048]",
                "tileloadd tmm3, [{a} + {row}*1 + 2048]",
                "tdpbf16ps tmm0, tmm3, tmm7",
                "tileloadd tmm4, [{a} + {row}*1 + 5120]",
                "tdpbf16ps tmm1, tmm4, tmm7",
                a = in(reg) a,
                b = in(reg) b,
                row = in(reg) ROW_BYTES,
                options(nostack, readonly),
            );
        }
    }

    /// [`Tiles::f16_block32`] for 16 weight rows: `sums[0] += a[g] . b[g]`, `a` three 1 KB
    /// tiles.
    ///
    /// # Safety
    /// `a` and `b` must hold 3 KB each.
    pub unsafe fn f16_block16(&self, a: *const u8, b: *const u8) {
        #[cfg(not(target_arch = "x86_64"))]
        unreachable!("no tiles outside x86_64 ({a:?} {b:?})");
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as in `f16_block32`.
        unsafe {
            std::arch::asm!(
                "tileloadd tmm5, [{b} + {row}*1]",
                "tileloadd tmm2, [{a} + {row}*1]",
                "tdpbf16ps tmm0, tmm2, tmm5",
                "tileloadd tmm6, [{b} + {row}*1 + 1024]",
                "tileloadd tmm3, [{a} + {row}*1 + 1024]",
                "tdpbf16ps tmm0, tmm3, tmm6",
                "tileloadd tmm7, [{b} + {row}*1 + 2048]",
                "tileloadd tmm4, [{a} + {row}*1 + 2048]",
                "tdpbf16ps tmm0, tmm4, tmm7",
                a = in(reg) a,
                b = in(reg) b,
                row = in(reg) ROW_BYTES,
                options(nostack, readonly),
            );
        }
    }

    /// Stores the two tiles of sums of [`Tiles::f16_block32`] to `sums`.
    ///
    /// # Safety
    /// As [`Tiles::f16_sums_zero`].
    pub unsafe fn f16_sums_store(&self, sums: &mut [[f32; 256]; 2]) {
        #[cfg(not(target_arch = "x86_64"))]
        unreachable!("no tiles outside x86_64 ({sums:?})");
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the tiles were configured by `new` on this thread (and are still, the
        // caller's promise); each store writes 1 KB of `sums`.
        unsafe {
            std::arch::asm!(
                "tilestored [{s} + {row}*1], tmm0",
                "tilestored [{s} + {row}*1 + 1024], tmm1",
                s = in(reg) sums.as_mut_ptr(),
                row = in(reg) ROW_BYTES,
                options(nostack),
            );
        }
    }

    /// Attention scores of 16 query rows against 64 keys: `out[r][j] = q_r . k_j` in f32,
    /// over `groups` groups of 32 dimensions. `q` is 16 rows of bf16 (`q_stride` bytes
    /// apart, 64 bytes per group); `keys` holds per group four 1 KB tiles of 16 keys each
    /// (row `p`: dimensions `2p, 2p + 1` of the 16 keys, as pairs), group `g` at `4096 g`;
    /// `out` is 16 rows of 64 f32 (256 bytes apart).
    ///
    /// # Safety
    /// `q` must hold 16 rows of `64 groups` bytes at stride `q_stride`, `keys` `4096 groups`
    /// bytes, `out` 16 KB that no one else uses meanwhile; `groups > 0`.
    pub unsafe fn scores16x64(
        &self,
        q: *const u8,
        q_stride: usize,
        keys: *const u8,
        groups: usize,
        out: *mut f32,
    ) {
        assert!(groups > 0);
        #[cfg(not(target_arch = "x86_64"))]
        unreachable!("no tiles outside x86_64 ({q:?} {q_stride} {keys:?} {out:?})");
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the tiles were configured by `new` on this thread; the reads and writes
        // stay inside the bounds above.
        unsafe {
            std::arch::asm!(
                "tilezero tmm0",
                "tilezero tmm1",
                "tilezero tmm2",
                "tilezero tmm3",
                "2:",
                "tileloadd tmm4, [{q} + {q_stride}*1]",
                "tileloadd tmm5, [{k} + {row}*1]",
                "tdpbf16ps tmm0, tmm4, tmm5",
                "tileloadd tmm6, [{k} + {row}*1 + 1024]",
                "tdpbf16ps tmm1, tmm4, tmm6",
                "tileloadd tmm7, [{k} + {row}*1 + 2048]",
                "tdpbf16ps tmm2, tmm4, tmm7",
                "tileloadd tmm5, [{k} + {row}*1 + 3072]",
                "tdpbf16ps tmm3, tmm4, tmm5",
                "add {q}, 64",
                "add {k}, 4096",
                "dec {groups}",
                "jnz 2b",
                "tilestored [{out} + {out_stride}*1], tmm0",
                "tilestored [{out} + {out_stride}*1 + 64], tmm1",
                "tilestored [{out} + {out_stride}*1 + 128], tmm2",
                "tilestored [{out} + {out_stride}*1 + 192], tmm3",
                q = inout(reg) q => _,
                k = inout(reg) keys => _,
                groups = inout(reg) groups => _,
                q_stride = in(reg) q_stride,
                row = in(reg) ROW_BYTES,
                out = in(reg) out,
                out_stride = in(reg) 4 * ROW_BYTES,
                options(nostack),
            );
        }
    }

    /// `o += p . v` for 16 rows of attention outputs over 64 keys: `p` is 16 rows of 64
    /// bf16 probabilities (128 bytes apart); `values` holds two halves of 32 keys, each
    /// `col_tiles` 1 KB tiles of 16 dimensions (row `p`: keys `2p, 2p + 1` of the half as
    /// pairs), the second half `1024 col_tiles` bytes after the first; `o` is 16 rows of
    /// `16 col_tiles` f32, `o_stride` bytes apart.
    ///
    /// # Safety
    /// `p` must hold 16 rows of 128 bytes, `values` `2048 col_tiles` bytes, `o` 16 rows of
    /// `64 col_tiles` bytes at stride `o_stride` that no one else uses meanwhile;
    /// `col_tiles` a positive multiple of 4 (four sums at a time: two products into one
    /// tile of sums wait for each other, four tiles keep the unit busy).
    pub unsafe fn values16x64(
        &self,
        p: *const u8,
        values: *const u8,
        o: *mut f32,
        o_stride: usize,
        col_tiles: usize,
    ) {
        assert!(col_tiles > 0 && col_tiles.is_multiple_of(4));
        #[cfg(not(target_arch = "x86_64"))]
        unreachable!("no tiles outside x86_64 ({p:?} {values:?} {o:?} {o_stride})");
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the tiles were configured by `new` on this thread; the reads and writes
        // stay inside the bounds above.
        unsafe {
            std::arch::asm!(
                "tileloadd tmm4, [{p} + {p_stride}*1]",
                "tileloadd tmm5, [{p} + {p_stride}*1 + 64]",
                "2:",
                "tileloadd tmm0, [{o} + {o_stride}*1]",
                "tileloadd tmm1, [{o} + {o_stride}*1 + 64]",
                "tileloadd tmm2, [{o} + {o_stride}*1 + 128]",
                "tileloadd tmm3, [{o} + {o_stride}*1 + 192]",
                "tileloadd tmm6, [{v} + {row}*1]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tileloadd tmm7, [{v} + {row}*1 + 1024]",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tileloadd tmm6, [{v} + {row}*1 + 2048]",
                "tdpbf16ps tmm2, tmm4, tmm6",
                "tileloadd tmm7, [{v} + {row}*1 + 3072]",
                "tdpbf16ps tmm3, tmm4, tmm7",
                "tileloadd tmm6, [{v2} + {row}*1]",
                "tdpbf16ps tmm0, tmm5, tmm6",
                "tileloadd tmm7, [{v2} + {row}*1 + 1024]",
                "tdpbf16ps tmm1, tmm5, tmm7",
                "tileloadd tmm6, [{v2} + {row}*1 + 2048]",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tileloadd tmm7, [{v2} + {row}*1 + 3072]",
                "tdpbf16ps tmm3, tmm5, tmm7",
                "tilestored [{o} + {o_stride}*1], tmm0",
                "tilestored [{o} + {o_stride}*1 + 64], tmm1",
                "tilestored [{o} + {o_stride}*1 + 128], tmm2",
                "tilestored [{o} + {o_stride}*1 + 192], tmm3",
                "add {o}, 256",
                "add {v}, 4096",
                "add {v2}, 4096",
                "sub {tiles}, 4",
                "jnz 2b",
                p = in(reg) p,
                p_stride = in(reg) 2 * ROW_BYTES,
                v = inout(reg) values => _,
                v2 = inout(reg) values.add(1024 * col_tiles) => _,
                o = inout(reg) o => _,
                o_stride = in(reg) o_stride,
                row = in(reg) ROW_BYTES,
                tiles = inout(reg) col_tiles => _,
                options(nostack),
            );
        }
    }
}

/// The sums of [`Tiles::block`] (`both_halves`: tiles 0-3, 32 rows) or [`Tiles::block16`]
/// (tiles 0-1, 16 rows) loaded from the rows of 32 f32 at `from` (`(address, bytes between
/// rows)`), or zeroed.
///
/// # Safety
/// The tiles must be configured on this thread; `from` must hold the rows.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn sums_from(from: Option<(*const u8, usize)>, both_halves: bool) {
    // SAFETY: as this function's; the tile registers are touched by no compiled code.
    unsafe {
        match from {
            Some((c, ldc)) => {
                std::arch::asm!(
                    "tileloadd tmm0, [{c} + {ldc}*1]",
                    "tileloadd tmm1, [{c} + {ldc}*1 + 64]",
                    c = in(reg) c,
                    ldc = in(reg) ldc,
                    options(nostack, readonly),
                );
                if both_halves {
                    std::arch::asm!(
                        "tileloadd tmm2, [{c} + {ldc}*1]",
                        "tileloadd tmm3, [{c} + {ldc}*1 + 64]",
                        c = in(reg) c.add(TILE_ROWS * ldc),
                        ldc = in(reg) ldc,
                        options(nostack, readonly),
                    );
                }
            }
            None => {
                std::arch::asm!("tilezero tmm0", "tilezero tmm1", options(nostack, nomem));
                if both_halves {
                    std::arch::asm!("tilezero tmm2", "tilezero tmm3", options(nostack, nomem));
                }
            }
        }
    }
}

/// The sums of [`sums_from`] stored to the rows at `to`.
///
/// # Safety
/// The tiles must be configured on this thread; `to` must hold the rows, used by no one
/// else meanwhile.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn sums_to((c, ldc): (*mut u8, usize), both_halves: bool) {
    // SAFETY: as this function's.
    unsafe {
        std::arch::asm!(
            "tilestored [{c} + {ldc}*1], tmm0",
            "tilestored [{c} + {ldc}*1 + 64], tmm1",
            c = in(reg) c,
            ldc = in(reg) ldc,
            options(nostack),
        );
        if both_halves {
            std::arch::asm!(
                "tilestored [{c} + {ldc}*1], tmm2",
                "tilestored [{c} + {ldc}*1 + 64], tmm3",
                c = in(reg) c.add(TILE_ROWS * ldc),
                ldc = in(reg) ldc,
                options(nostack),
            );
        }
    }
}

/// The tile registers of the calling thread configured for int8 block products (the q8/q4
/// decode products of a batch, [`super::packed`]): tiles 0-3 hold four independent sets of
/// `rows` x 16 int32 sums, tiles 4-5 `rows` activation rows of `k_step` signed bytes, tiles
/// 6-7 `k_step / 4` rows of 16 weight columns of four unsigned bytes (the order `vpdpbusd`
/// reads, in which the packed q8 weights lie already). Four sets of sums let four products
/// run at once: one product's load, multiply and store wait on each other. Released when
/// dropped; a thread holds one configuration at a time, so no [`Tiles`] may be used while
/// this lives.
pub struct Int8Tiles {
    k_step: usize,
    _thread: std::marker::PhantomData<*const ()>,
}

/// The sets of sums of [`Int8Tiles`].
pub const INT8_SLOTS: usize = 4;

impl Int8Tiles {
    /// Configures the tiles for `rows` (1-16) activation rows and `k_step` (4-64, a multiple
    /// of 4) inputs per product; `None` where [`amx_int8_available`] is false, the shape
    /// does not fit a tile, or tiles of either kind live on this thread already.
    pub fn new(rows: usize, k_step: usize) -> Option<Self> {
        if !amx_int8_available()
            || CONFIGURED.with(|c| c.get()) != Configured::Released
            || !(1..=TILE_ROWS).contains(&rows)
            || !(4..=64).contains(&k_step)
            || !k_step.is_multiple_of(4)
        {
            return None;
        }
        let tiles = Self {
            k_step,
            _thread: std::marker::PhantomData,
        };
        tiles.load(rows);
        CONFIGURED.with(|c| c.set(Configured::Int8));
        Some(tiles)
    }

    /// Configures the tiles for `rows` (1-16) activation rows instead, with the same
    /// `k_step`: a gemm's last group of fewer rows. `false` (nothing changed) outside
    /// that range.
    pub fn set_rows(&mut self, rows: usize) -> bool {
        if !(1..=TILE_ROWS).contains(&rows) {
            return false;
        }
        self.load(rows);
        true
    }

    /// Loads the configuration for `rows` (1-16) rows and this `k_step`.
    fn load(&self, rows: usize) {
        let mut config = TileConfig([0; 64]);
        config.0[0] = 1;
        for t in 0..8 {
            let (tile_rows, bytes) = match t {
                0..4 => (rows, ROW_BYTES),
                4 | 5 => (rows, self.k_step),
                _ => (self.k_step / 4, ROW_BYTES),
            };
            config.0[16 + 2 * t] = bytes as u8;
            config.0[48 + t] = tile_rows as u8;
        }
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU has AMX-TILE and the process holds the tile state (checked by
        // `new`, the only way to an `Int8Tiles`); the configuration is 64 valid bytes
        // (palette 1, rows and bytes in range: `new` and `set_rows` checked them).
        unsafe {
            std::arch::asm!("ldtilecfg [{}]", in(reg) config.0.as_ptr(), options(nostack, readonly));
        }
    }

    /// Sums `slot` (0-3) `= sum over s of a_s . b_s` for `steps` steps of `k_step` inputs,
    /// with `tdpbsud` (signed activations by unsigned weights, exact int32 sums): step `s`
    /// of the activations is at `a + s k_step` (rows `a_stride` bytes apart), of the weights
    /// `k_step / 4` rows of 64 bytes from `b + 16 s k_step`. Even slots load their operands
    /// into tiles 4 and 6, odd ones into 5 and 7. [`Int8Tiles::store`] writes the sums.
    /// (Starting the sums from memory instead of zero, to fold in an offset, made a product
    /// about 1.4x as slow: BENCHMARKS.md, round 41.)
    ///
    /// # Safety
    /// `slot < 4`; the reads must stay inside `a` and `b` as described; no other tile
    /// configuration may have been loaded on this thread since this one.
    #[inline(always)]
    pub unsafe fn product(&self, slot: usize, a: *const u8, a_stride: usize, b: *const u8, steps: usize) {
        #[cfg(not(target_arch = "x86_64"))]
        unreachable!("no tiles outside x86_64 ({slot} {a:?} {a_stride} {b:?} {steps})");
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the tiles were configured by `new` on this thread (and are still, the
        // caller's promise); the reads stay inside the bounds above.
        unsafe {
            macro_rules! product {
                ($c:literal, $a:literal, $b:literal) => {{
                    std::arch::asm!(concat!("tilezero tmm", $c), options(nostack, nomem));
                    for s in 0..steps {
                        std::arch::asm!(
                            concat!("tileloadd tmm", $a, ", [{a} + {stride}*1]"),
                            concat!("tileloadd tmm", $b, ", [{b} + {row}*1]"),
                            concat!("tdpbsud tmm", $c, ", tmm", $a, ", tmm", $b),
                            a = in(reg) a.add(s * self.k_step),
                            stride = in(reg) a_stride,
                            b = in(reg) b.add(16 * s * self.k_step),
                            row = in(reg) ROW_BYTES,
                            options(nostack, readonly),
                        );
                    }
                }};
            }
            match slot {
                0 => product!("0", "4", "6"),
                1 => product!("1", "5", "7"),
                2 => product!("2", "4", "6"),
                _ => product!("3", "5", "7"),
            }
        }
    }

    /// Stores sums `slot` (0-3) of [`Int8Tiles::product`] as rows of 64 bytes at `sums`.
    ///
    /// # Safety
    /// `slot < 4` and `sums` must have room for the configured rows; no other tile
    /// configuration may have been loaded on this thread since this one.
    #[inline(always)]
    pub unsafe fn store(&self, slot: usize, sums: *mut u8) {
        #[cfg(not(target_arch = "x86_64"))]
        unreachable!("no tiles outside x86_64 ({slot} {sums:?})");
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as this function's.
        unsafe {
            macro_rules! store {
                ($c:literal) => {
                    std::arch::asm!(
                        concat!("tilestored [{s} + {row}*1], tmm", $c),
                        s = in(reg) sums,
                        row = in(reg) ROW_BYTES,
                        options(nostack),
                    )
                };
            }
            match slot {
                0 => store!("0"),
                1 => store!("1"),
                2 => store!("2"),
                _ => store!("3"),
            }
        }
    }
}

/// Releases the calling thread's tiles (the drop of [`Tiles`] and of [`Int8Tiles`]).
///
/// # Safety
/// The tiles must have been configured on this thread.
unsafe fn release() {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: as this function's.
    unsafe {
        std::arch::asm!("tilerelease", options(nostack, nomem));
    }
    CONFIGURED.with(|c| c.set(Configured::Released));
}

impl Drop for Int8Tiles {
    fn drop(&mut self) {
        // SAFETY: the tiles were configured by `new` on this thread.
        unsafe { release() };
    }
}

impl Drop for Tiles {
    fn drop(&mut self) {
        // SAFETY: the tiles were configured by `new` on this thread.
        unsafe { release() };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A thread never holds both kinds of tiles: each refuses while the other lives, and
    /// either is made again once the other is dropped.
    #[test]
    fn one_kind_of_tiles_per_thread() {
        if !amx_bf16_available() || !amx_int8_available() {
            eprintln!("no AMX-BF16 and AMX-INT8 on this CPU: skipped");
            return;
        }
        let full = Tiles::new().expect("tiles");
        assert!(
            Int8Tiles::new(16, 32).is_none(),
            "int8 tiles beside the full configuration"
        );
        drop(full);
        let int8 = Int8Tiles::new(16, 32).expect("int8 tiles");
        assert!(Tiles::new().is_none(), "full tiles beside the int8 configuration");
        assert!(Int8Tiles::new(12, 64).is_none(), "two int8 configurations");
        drop(int8);
        assert!(Tiles::new().is_some(), "tiles once the int8 ones are dropped");
    }

    #[test]
    fn one_block_sums_pairs_of_products() {
        let Some(tiles) = Tiles::new() else {
            eprintln!("no AMX-BF16 on this CPU: skipped");
            return;
        };
        // a[r][v] = r % 8 + (v % 8) / 8, b[v][c] = c - v / 4: bf16-exact, and so are the
        // products and every partial sum in f32, whatever the order. Two steps of 16 pairs.
        let steps = 2;
        let k = 32 * steps;
        let to_bits = |v: f32| burn::tensor::bf16::from_f32(v).to_bits();
        let x = |r: usize, v: usize| to_bits((r % 8) as f32 + (v % 8) as f32 / 8.0);
        let w = |v: usize, c: usize| to_bits(c as f32 - v as f32 / 4.0);
        // Tile layout: per 16-row (16-column) half and step, 16 rows of 16 pairs.
        let mut a = [vec![0u16; steps * 512], vec![0u16; steps * 512]];
        let mut b = [vec![0u16; steps * 512], vec![0u16; steps * 512]];
        for half in 0..2 {
            for s in 0..steps {
                for i in 0..16 {
                    for j in 0..16 {
                        for h in 0..2 {
                            let v = 32 * s + 2 * j + h;
                            a[half][s * 512 + i * 32 + 2 * j + h] = x(16 * half + i, v);
                            let v = 32 * s + 2 * i + h;
                            b[half][s * 512 + i * 32 + 2 * j + h] = w(v, 16 * half + j);
                        }
                    }
                }
            }
        }
        let mut c = vec![1f32; 32 * 32];
        // SAFETY: the sizes above match the documented bounds.
        unsafe {
            tiles.block(
                [a[0].as_ptr().cast(), a[1].as_ptr().cast()],
                [b[0].as_ptr().cast(), b[1].as_ptr().cast()],
                Some((c.as_ptr().cast(), 128)),
                (c.as_mut_ptr().cast(), 128),
                steps,
            );
        }
        // The 16-row block of the first half: the same first 16 rows.
        let mut half = vec![1f32; 16 * 32];
        // SAFETY: as above, 16 rows of sums.
        unsafe {
            tiles.block16(
                a[0].as_ptr().cast(),
                [b[0].as_ptr().cast(), b[1].as_ptr().cast()],
                Some((half.as_ptr().cast(), 128)),
                (half.as_mut_ptr().cast(), 128),
                steps,
            );
        }
        assert_eq!(half[..], c[..16 * 32], "the 16-row block");
        for r in 0..32 {
            for col in 0..32 {
                let want: f64 = 1.0
                    + (0..k)
                        .map(|v| ((r % 8) as f64 + (v % 8) as f64 / 8.0) * (col as f64 - v as f64 / 4.0))
                        .sum::<f64>();
                assert_eq!(c[r * 32 + col] as f64, want, "({r}, {col})");
            }
        }
    }
}
