//! The `vipllava` command line.

mod cli;

/// mimalloc instead of the system allocator: glibc maps every buffer above 32 MB fresh from
/// the OS and unmaps it on free, so each widened weight of a bf16 prefill and each loaded
/// tensor paid first-touch page faults and zeroing (BENCHMARKS.md, history #10). Only the
/// binary sets it: library users keep their own allocator.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// How long freed memory stays with the process before mimalloc hands it back to the OS, in
/// milliseconds. Its default of 1000 ms returned the buffers of one prefill layer before the
/// next layers asked for the same sizes again, so a bf16 prefill spent 15% of its samples in
/// the kernel zeroing fresh pages (`clear_page_erms`); 10 s keeps them for the whole prefill
/// and still returns them once a command or a server falls idle (BENCHMARKS.md, round 26).
/// `MIMALLOC_PURGE_DELAY` in the environment wins.
const PURGE_DELAY_MS: std::ffi::c_long = 10_000;

/// mimalloc 3's `mi_option_purge_delay` (its `mimalloc.h`; `libmimalloc-sys` names no
/// constant for it) and that option's default there, which [`keep_freed_memory`] checks
/// before it sets anything: another numbering leaves the allocator as it is.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
const MI_DEFAULT_PURGE_DELAY_MS: std::ffi::c_long = 1000;

/// Sets [`PURGE_DELAY_MS`] unless the environment chose a purge delay.
fn keep_freed_memory() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
        return;
    }
    // SAFETY: reads and sets one of mimalloc's options, which may happen after allocations;
    // it runs first in `main`, before any other thread exists (the option calls are not
    // meant to race each other); an option outside mimalloc's range is refused by
    // `mi_option_get` / `mi_option_set` themselves.
    unsafe {
        if libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) == MI_DEFAULT_PURGE_DELAY_MS {
            libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, PURGE_DELAY_MS);
        }
    }
}

fn main() -> std::process::ExitCode {
    keep_freed_memory();
    cli::run()
}
